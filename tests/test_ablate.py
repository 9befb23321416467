"""The conditioning sweep (varedit_jax/ablate.py): plan-only rows from the real configs, flag errors, and a reduced
sweep on the toy task (train, evaluate, table, grids, resume without redoing work)."""
import json
import os
import subprocess
import sys

import pytest

from helpers import REPO_ROOT, small_flags
from varedit_jax import ablate, conditioning, configlib, toy_eval

SMALL = small_flags(total_steps=2, checkpoint_every=2)


@pytest.mark.parametrize("name", ["varedit_2b_256", "varedit_tiny"])
def test_plan_only_lengths_are_the_papers(name):
    config = configlib.load(REPO_ROOT / f"configs/{name}.py")
    rows = {r["conditioning"]: r for r in ablate.plan_rows(config, conditioning.EDITING_MODES)}
    assert {s: r["input_length"] for s, r in rows.items()} == {"full": 1042, "finest": 777, "sar": 777}
    assert len({r["parameters"] for r in rows.values()}) == 1  # the conditioning modes add no parameters
    assert float(rows["full"]["train_flops_per_step"]) > float(rows["sar"]["train_flops_per_step"]) > 0
    assert float(rows["sar"]["flops_per_edit"]) == float(rows["finest"]["flops_per_edit"]) > 0


def test_plan_only_cli_prints_a_table(capsys):
    assert ablate.main(["--config", str(REPO_ROOT / "configs/varedit_8b_512.py"), "--plan-only"]) == 0
    out = capsys.readouterr().out
    assert "| sar | 3545 |" in out and "| full | 5042 |" in out


@pytest.mark.parametrize("flags,message", [(["--conditioning", "full,best"], "unknown conditioning"),
                                           (["--seeds", "0,x"], "integers"),
                                           (["--config.nonexistent=1"], "nonexistent")])
def test_bad_flags_exit_2(flags, message, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "varedit_jax.ablate", "--plan-only", *flags], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr


@pytest.mark.slow
def test_reduced_sweep_writes_the_table_and_resumes(tmp_path, monkeypatch):
    args = ["--workdir", str(tmp_path / "sweep"), "--conditioning", "full,finest,sar", "--eval-pairs", "4", *SMALL]
    assert ablate.main(args) == 0
    table = json.loads((tmp_path / "sweep" / "results.json").read_text())
    rows = {r["conditioning"]: r for r in table["rows"]}
    assert set(rows) == {"full", "finest", "sar", "copy_source", "oracle"}
    assert {s: rows[s]["input_length"] for s in conditioning.EDITING_MODES} == {"full": 1042, "finest": 777, "sar": 777}
    for s in conditioning.EDITING_MODES:
        assert rows[s]["steps"] == 2 and rows[s]["train_step_s"] > 0 and rows[s]["s_per_edit"] > 0
        assert all(0 <= rows[s][k] <= 10 for k in toy_eval.COLUMNS)
        assert (tmp_path / "sweep" / "grids" / f"{s}_seed0.png").is_file()
    assert rows["copy_source"]["preservation"] == 10 and (tmp_path / "sweep" / "curves.png").is_file()
    assert (tmp_path / "sweep" / "results.md").read_text().count("\n| ") >= 5
    evals = {s: (tmp_path / "sweep" / s / "seed0" / "eval.json").stat().st_mtime_ns for s in conditioning.EDITING_MODES}
    assert ablate.main(args) == 0  # resumes: nothing retrained, nothing re-evaluated
    assert evals == {s: (tmp_path / "sweep" / s / "seed0" / "eval.json").stat().st_mtime_ns for s in conditioning.EDITING_MODES}
    assert json.loads((tmp_path / "sweep" / "results.json").read_text())["rows"] == table["rows"]
