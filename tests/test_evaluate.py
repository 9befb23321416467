"""`python -m varedit_jax.evaluate` end to end: the session's trained checkpoint on small benchmark-format folders
written here (EMU-Edit parquet, PIE-Bench mapping_file.json + RLE masks, ImgEdit-Bench JSON + prompts, GEdit-Bench
Arrow, the toy records), tiny random metric models in their released layouts, and a fake judge on 127.0.0.1."""
import json
import math
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from helpers import FakeServer, small_flags
from data_pipelines import benchmarks as bm
from data_pipelines.records import encode_png
from varedit_jax import ablate, editor, evaluate
from varedit_jax.eval import bench_judges, scores

pa = pytest.importorskip("pyarrow", reason="EMU-Edit / GEdit-Bench need the data extra (pyarrow)")
import pyarrow.parquet as pq  # noqa: E402
from test_eval_benchmarks import _emu_table, _gedit_table  # noqa: E402
from test_eval_clip import write_clip_folder  # noqa: E402
from test_eval_models import write_dino_folder, write_lpips_file  # noqa: E402

SUCCESS = {"add a hat": 8, "make it night": 3, "remove the dog": 0, "add a bird": 6}  # canned GPT-Suc.; Over. 6
RUBRIC = "Brief reasoning: fine.\nPrompt Compliance: 4\nVisual Naturalness: 3\nPhysical & Detail Integrity: 4\n"


def _route(text, body):
    """Canned judge replies: GEdit's PQ prompt, ImgEdit's prompts (they start with "IMGEDIT"), Figure 9 by SUCCESS."""
    if text == bench_judges.PQ_PROMPT:
        return '{"score": [7, 9], "reasoning": "natural"}'
    if text.startswith("IMGEDIT"):
        return RUBRIC
    instruction = text.rsplit("Editing instruction: ", 1)[-1].strip()
    return json.dumps({"score": [SUCCESS.get(instruction, 5), 6], "reasoning": "ok"})


@pytest.fixture(scope="module")
def judge():
    server = FakeServer(route=_route)
    yield server
    server.close()


def _image(seed, size=(48, 40)):
    return np.random.default_rng(seed).integers(0, 256, size + (3,), dtype=np.uint8)


def write_benchmarks(root, models: bool = True):
    """Small copies of the four benchmarks in their released layouts (and tiny metric models) in ROOT."""
    (root / "emu" / "data").mkdir(parents=True)
    rows = [("add a hat", encode_png(_image(1)), "add"), ("make it night", encode_png(_image(2)), "global"),
            ("remove the dog", encode_png(_image(3)), "remove"), ("", encode_png(_image(4)), "add")]
    pq.write_table(_emu_table(rows), root / "emu" / "data" / "test-00000-of-00001.parquet")
    pie = root / "pie" / "annotation_images" / "0_random_140"
    pie.mkdir(parents=True)
    mapping = {}
    for i in range(2):
        Image.fromarray(_image(10 + i, (512, 512))).save(pie / f"{i}.png")
        mapping[f"00000000000{i}"] = {"image_path": f"0_random_140/{i}.png", "original_prompt": "a [cat]",
                                      "editing_prompt": "a [dog]", "editing_instruction": "make the cat a dog",
                                      "editing_type_id": str(i), "blended_word": "cat dog",
                                      "mask": [512 * 200 + 100, 300, 512 * 201 + 100, 300]}
    (root / "pie" / "mapping_file.json").write_text(json.dumps(mapping))
    imgedit = root / "imgedit"
    (imgedit / "animal").mkdir(parents=True)
    edits = {}
    for i, (kind, instruction) in enumerate([("add", "add a bird"), ("add", "add a hat"), ("remove", "remove the dog"),
                                             ("action", "make it jump")]):
        Image.fromarray(_image(20 + i)).save(imgedit / "animal" / f"{i}.jpg")
        edits[str(i)] = {"id": f"animal/{i}.jpg", "prompt": instruction, "edit_type": kind}
    (imgedit / "basic_edit.json").write_text(json.dumps(edits))
    (imgedit / "prompts.json").write_text(json.dumps({k: f"IMGEDIT {k} rubric. Instruction: <edit_prompt>."
                                                      for k in ("add", "remove", "action")}))
    (root / "gedit" / "train").mkdir(parents=True)
    table = _gedit_table([("subject-add", "k1", "add a bird", "en", encode_png(_image(30))),
                          ("subject-add", "k2", "add a hat", "en", encode_png(_image(31))),
                          ("color_alter", "k3", "make it night", "en", encode_png(_image(32))),
                          ("subject-add", "k1", "添加一只鸟", "cn", encode_png(_image(30)))])
    table = table.set_column(table.schema.get_field_index("Intersection_exist"), "Intersection_exist",
                             pa.array([True, False, True, True]))
    with pa.ipc.new_stream(str(root / "gedit" / "train" / "data-00000-of-00001.arrow"), table.schema) as w:
        w.write_table(table)
    if models:
        write_clip_folder(root / "clip")
        write_dino_folder(root / "dino")
        write_lpips_file(root / "lpips.safetensors")
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_benchmarks(tmp_path_factory.mktemp("benchmarks"))


def _run(trained_run, tmp, benchmark, data, *extra):
    workdir, _ = trained_run
    return evaluate.main(["--checkpoint", str(workdir), "--benchmark", benchmark, "--data", str(data),
                          "--out", str(tmp), *extra])


def _results(out):
    return {r["category"]: r for r in json.loads((out / "results.json").read_text())["rows"]}


def _samples(out):
    return [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]


def test_emu_edit_with_clip_dino_and_judge_then_resume(trained_run, data, judge, tmp_path, monkeypatch):
    out = tmp_path / "emu"
    flags = ["--clip", str(data / "clip"), "--dino", str(data / "dino"), "--judge", judge.url,
             "--judge-model", "fake"]
    assert _run(trained_run, out, "emu_edit", data / "emu", *flags) == 0
    rows = _samples(out)
    assert [r["id"] for r in rows] == ["emu_edit:test:0", "emu_edit:test:1", "emu_edit:test:2"]
    assert json.loads((out / "skipped.jsonl").read_text())["reason"] == bm.EMPTY_INSTRUCTION
    for r in rows:
        output = np.asarray(Image.open(out / "images" / r["output"]))
        assert output.shape == (48, 40, 3)  # at the source's size (official pad / crop back)
        assert -1 <= r["clip_i"] <= 1 and -1 <= r["clip_out"] <= 1 and -1 <= r["dino"] <= 1
        assert 0 < r["l1"] < 1 and r["gpt_overedit"] == 6
        assert r["gpt_balance"] == pytest.approx(float(scores.balance(r["gpt_success"], 6)))
    table = _results(out)
    assert list(table) == ["add", "global", "remove", "overall"]
    overall = table["overall"]
    assert overall["n"] == 3 and overall["s_per_edit"] > 0
    assert overall["GPT-Suc."] == pytest.approx(11 / 3)  # 8, 3, 0
    assert overall["GPT-Bal."] == pytest.approx(np.mean([scores.balance(s, 6) for s in (8, 3, 0)]))
    assert overall["CLIP-Dir"] == pytest.approx(np.mean([r["clip_dir"] for r in rows]))
    assert table["remove"]["GPT-Bal."] == 0.0
    assert (out / "grid.png").is_file() and "| overall | 3 |" in (out / "results.md").read_text()
    # resuming: nothing is edited or judged again
    requests, mtimes = len(judge.requests), {p: p.stat().st_mtime_ns for p in (out / "images").iterdir()}
    monkeypatch.setattr(editor.Editor, "from_checkpoint", lambda *a, **k: pytest.fail("re-edited"))
    assert _run(trained_run, out, "emu_edit", data / "emu", *flags) == 0
    assert len(judge.requests) == requests and _samples(out) == rows
    # other metric models: the outputs are re-scored from their PNGs, not re-edited
    assert _run(trained_run, out, "emu_edit", data / "emu", "--clip", str(data / "clip")) == 0
    assert {p: p.stat().st_mtime_ns for p in (out / "images").iterdir()} == mtimes
    rescored = _samples(out)
    assert [r["scored_with"] for r in rescored] == [["clip"]] * 3
    assert all(r["gpt_success"] is None and r["dino"] is None for r in rescored)
    assert rescored[0]["clip_i"] == pytest.approx(rows[0]["clip_i"], abs=1e-6)
    # other sampling settings for the same OUT are refused
    assert _run(trained_run, out, "emu_edit", data / "emu", "--seed", "3") == 2


def test_pie_bench_metrics_and_limit(trained_run, data, tmp_path):
    out = tmp_path / "pie"
    assert _run(trained_run, out, "pie_bench", data / "pie", "--clip", str(data / "clip"), "--dino",
                str(data / "dino"), "--lpips", str(data / "lpips.safetensors"), "--limit", "1") == 0
    [row] = _samples(out)
    assert row["category"] == "random" and row["output"] == "000000000000.png"
    assert 0 <= row["structure_distance"] and row["psnr"] > 0 and 0 < row["mse"] < 1 and -1 <= row["ssim"] <= 1
    assert row["lpips"] > 0 and 0 <= row["clip_whole"] <= 1 and 0 <= row["clip_edit"] <= 1  # CLIPScore / 100
    assert _results(out)["overall"]["PSNR"] == pytest.approx(row["psnr"])


def test_imgedit_and_gedit_through_the_judge(trained_run, data, judge, tmp_path):
    out = tmp_path / "imgedit"
    assert _run(trained_run, out, "imgedit_bench", data / "imgedit", "--judge", judge.url) == 0
    table = _results(out)
    assert table["Add"]["Score"] == pytest.approx(3.67) and table["Add"]["n"] == 2  # mean of 4, 3, 4 -> 3.67
    assert table["overall"]["Score"] == pytest.approx(3.67)  # the mean over types
    assert {r["output"] for r in _samples(out)} == {"0.png", "1.png", "2.png", "3.png"}  # ImgEdit's <key>.png
    out = tmp_path / "gedit"
    assert _run(trained_run, out, "gedit", data / "gedit", "--judge", judge.url) == 0
    table = _results(out)
    sc = {"add a bird": 6, "add a hat": 6, "make it night": 3}  # min(Suc., Over. = 6)
    add = [math.sqrt(sc[i] * 7) for i in ("add a bird", "add a hat")]
    assert table["subject-add/en"]["G_SC"] == 6 and table["subject-add/en"]["G_PQ"] == 7
    assert table["overall/en"]["G_O"] == pytest.approx((np.mean(add) + math.sqrt(3 * 7)) / 2)  # mean over groups
    assert table["intersection/en"]["G_O"] == pytest.approx((add[0] + math.sqrt(21)) / 2)
    assert table["overall/cn"]["n"] == 1
    assert (out / "images" / "subject-add" / "cn" / "k1.png").is_file()  # GEdit's own layout


def test_toy_defaults_to_the_checkpoints_eval_set_and_bad_input(trained_run, tmp_path, capsys):
    workdir, _ = trained_run
    out = tmp_path / "toy"
    assert evaluate.main(["--checkpoint", str(workdir), "--benchmark", "toy", "--out", str(out), "--limit", "8"]) == 0
    overall = _results(out)["overall"]
    assert overall["n"] == 8 and 0 <= overall["Success"] <= 10 and 0 <= overall["Balance"] <= 10
    assert "| overall | 8 |" in capsys.readouterr().out
    assert evaluate.main(["--checkpoint", str(workdir), "--benchmark", "emu_edit", "--out", str(tmp_path / "x")]) == 2
    assert "needs --data" in capsys.readouterr().err
    assert evaluate.main(["--checkpoint", str(workdir), "--benchmark", "pie_bench", "--data", str(tmp_path / "no"),
                          "--out", str(tmp_path / "y")]) == 2
    assert "mapping_file.json" in capsys.readouterr().err
    assert evaluate.main(["--checkpoint", str(tmp_path / "nothing"), "--benchmark", "toy", "--out",
                          str(tmp_path / "z")]) == 2


@pytest.mark.slow
def test_ablate_scores_runs_on_a_benchmark(trained_run, data, tmp_path):
    workdir, _ = trained_run
    shutil.copytree(workdir, tmp_path / "sweep" / "sar" / "seed0")  # finished: the sweep trains nothing
    assert ablate.main(["--workdir", str(tmp_path / "sweep"), "--conditioning", "sar", "--benchmark", "emu_edit",
                        "--data", str(data / "emu"), "--clip", str(data / "clip"),
                        *small_flags(total_steps=4, checkpoint_every=2)]) == 0
    [row] = json.loads((tmp_path / "sweep" / "results.json").read_text())["rows"]
    assert row["conditioning"] == "sar" and row["n"] == 3 and -1 <= row["CLIP-Dir"] <= 1
    assert os.path.isfile(tmp_path / "sweep" / "sar" / "seed0" / "eval_emu_edit" / "results.json")
