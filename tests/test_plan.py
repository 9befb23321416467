"""The AOT fit planner (varedit_jax/plan.py): the real train step compiles for a TPU slice on this CPU-only host
(libtpu's topology description; the `tpu` extra), with the memory it reports consistent with the shardings."""
import json
import os
import subprocess
import sys

import pytest

from helpers import REPO_ROOT
from varedit_jax import conditioning, configlib, metrics, plan, schedules

SMALL = {"model.embed_dim": 64, "model.depth": 2, "model.num_heads": 2, "model.block_chunks": 1, "batch_size": 8}


def _config(**extra):
    return configlib.override(configlib.load(REPO_ROOT / "configs/varedit_tiny.py"), {**SMALL, **extra})


def test_the_tiny_step_compiles_for_two_v5p_8_slices_with_fsdp_and_tensor_sharding():
    """The multi-slice topology (2 x v5p-8 over DCN): parameters sharded over fsdp x tensor within a slice (a copy
    per slice), the batch over dcn x fsdp."""
    pytest.importorskip("libtpu", reason="TPU topologies need libtpu (the tpu extra)")
    config = _config(**{"mesh.shape": (1, 2, 2), "mesh.slices": 2})
    report = plan.plan(config, "v5p-8")
    assert report["topology"]["devices"] == 8 and report["topology"]["slices"] == 2
    assert report["config"]["mesh"] == {"dcn": 2, "data": 1, "fsdp": 2, "tensor": 2}
    b = report["bytes_per_device"]
    full = report["parameters"] * 4  # fp32 master weights
    assert full / 4 <= b["params"] < full / 2  # sharded over fsdp x tensor (a few small vectors replicated)
    assert b["optimizer"] == pytest.approx(2 * b["params"], rel=0.01)  # Adam mu and nu, sharded alike
    assert b["batch"] > 0 and b["xla_temporaries"] > 0 and b["peak"] >= b["xla_arguments"]
    assert report["fits"] and 0 < report["hbm_fraction"] < 0.01
    flops = report["flops_per_step_per_device"]
    assert flops["compiled"] > 0 and flops["analytic"] == pytest.approx(plan.analytic_flops(config, "1.0") / 8)
    assert plan.summary(report).startswith("2 x v5p-8 (8 devices, mesh {'dcn': 2, 'data': 1, 'fsdp': 2, 'tensor': 2})")
    init = report["init_bytes_per_device"]  # the initialisation, sharded: the state's share, no gathered copy
    assert 0 < init["state"] <= b["xla_arguments"]  # (TPU layouts pad the tiny dims: compare XLA with XLA)
    assert init["peak"] <= 1.1 * init["state"] + 16 * 2 ** 20 and "  init: " in plan.summary(report)
    json.dumps(report)  # the --json output is plain JSON


def test_analytic_flops_count_forward_and_backward_of_every_sample():
    config = _config(**{"model.remat": "none"})
    layout = conditioning.sequence_layout("sar", schedules.scale_schedule("1.0", config.pn), "1.0")
    one = metrics.transformer_flops(config.model, layout, config.text.max_len)
    assert plan.analytic_flops(config, "1.0") == pytest.approx(8 * 3 * one)
    assert plan.analytic_flops(_config(**{"model.remat": "full"}), "1.0") == pytest.approx(8 * 4 * one)
    deeper = metrics.transformer_flops(configlib.override(config, {"model.depth": 4}).model, layout, 32)
    head = 2 * layout.n_target * 64 * 2 * config.model.bits
    assert deeper - head == pytest.approx(2 * (one - head))  # linear in depth, head once
    assert one > 4 * layout.length ** 2 * 64 * 2  # the dense attention scores alone


def test_cli_reports_and_refuses_bad_input(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    bad = subprocess.run([sys.executable, "-m", "varedit_jax.plan", "--config", "configs/varedit_tiny.py",
                          "--topology", "v3-7"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "v3-7" in bad.stderr
    bad = subprocess.run([sys.executable, "-m", "varedit_jax.plan", "--config", "configs/varedit_tiny.py",
                          "--topology", "v5p-8", "--template", "7.5"], cwd=REPO_ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode == 2 and "error" in bad.stderr
    bad = subprocess.run([sys.executable, "-m", "varedit_jax.plan", "--config", "configs/varedit_tiny.py",
                          "--topology", "v5p-8", "--slices", "0"], cwd=REPO_ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode == 2 and "slices must be >= 1, got 0" in bad.stderr


def test_a_step_that_cannot_fit_is_reported_not_raised():
    pytest.importorskip("libtpu", reason="TPU topologies need libtpu (the tpu extra)")
    report = plan.plan(configlib.load(REPO_ROOT / "configs/varedit_8b_512.py"), "v5p-8")  # 8B, batch 1536, 4 chips
    assert report["fits"] is False and "RESOURCE_EXHAUSTED" in report["compile_error"]
    assert report["bytes_per_device"]["xla_temporaries"] > report["topology"]["hbm_bytes_per_device"]
    assert "DOES NOT FIT" in plan.summary(report)
