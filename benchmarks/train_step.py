"""Train-step speed of the real trainer step (`varedit_jax.trainer.Trainer`) on this machine, and the AOT planner's
TPU memory per device; JSON output.

Sections (`--sections`, comma-separated):
  tiny     `configs/varedit_tiny.py` as `launch/train.sh` trains it (SAR, 777 tokens per sample, batch 8, fp32; frozen
           toy tokenizer and toy T5 run inside the step).
  slice2b  a 2B-shaped slice: VAREdit-2B widths (C 2048, 16 heads, FFN 8192, full-block remat) with `--slice_depth`
           blocks, the d32 tokenizer at 256 px inside the step, cached flan-T5-XL-width text features (64 tokens),
           batch `--slice_batch`, fp32 compute (bf16 is emulated on CPUs).
  plan     `python -m varedit_jax.plan` for 2B@256 (configs/varedit_2b_256.py, batch 1536) on v5p-128 and 8B@512
           (configs/varedit_8b_512.py, batch 1536) on v5p-256, as configured and with 12 gradient-accumulation
           micro-steps, each in its own process (needs libtpu); with the initialisation's bytes per chip (random
           init + optimizer state + EMA, created sharded).
Step rows: compile seconds, median step seconds over `--steps` steps after one warm-up step, tokens/s/device
(sequence tokens incl. source rows) and MFU = model FLOPs (forward + backward of the transformer,
`metrics.transformer_flops`) / step time / device peak (on a CPU a measured fp32 1024^2 matmul rate, also recorded).
The frozen models' weights are random (speed does not depend on them).

  python benchmarks/train_step.py [--sections tiny,slice2b,plan] [--out benchmarks/results/train_step.json]
"""
import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import common  # noqa: E402
from varedit_jax import configlib, image_tokenizer, metrics, text, transformer  # noqa: E402
from varedit_jax import trainer as trainer_lib  # noqa: E402

TEMPLATE = "1.0"
PLANS = (("2b_256", "configs/varedit_2b_256.py", "v5p-128", []),
         ("8b_512", "configs/varedit_8b_512.py", "v5p-256", []),
         ("8b_512 grad_accum 12", "configs/varedit_8b_512.py", "v5p-256", ["--config.grad_accum=12"]))


def random_batch(trainer: trainer_lib.Trainer, vocab: int) -> dict:
    """A global batch of the step's shapes: images in [-1, 1], full text masks, random ids / features."""
    rng = np.random.default_rng(0)
    out = {}
    for k, spec in trainer.batch_spec(TEMPLATE).items():
        if k in ("source", "target"):
            value = rng.uniform(-1, 1, spec.shape).astype(np.float32)
        elif k == "text_mask":
            value = np.ones(spec.shape, bool)
        elif k == "text_ids":
            value = rng.integers(1, vocab, spec.shape).astype(np.int32)
        else:
            value = rng.standard_normal(spec.shape).astype(np.float32)
        out[k] = jax.device_put(value, spec.sharding)
    return out


def bench_step(name: str, config, steps: int, peak: float) -> dict:
    """Compiles the trainer's step for `config` on every local device and times `steps` steps."""
    mesh = trainer_lib.make_mesh(config)
    image_tok = image_tokenizer.ImageTokenizer(configlib.load(config.image_tokenizer.config).model, rngs=nnx.Rngs(0))
    text_cfg = configlib.load(config.text.config).model
    text_cfg.dtype = config.text.dtype
    encoder = text.T5Encoder(text_cfg, rngs=nnx.Rngs(0))
    trainer = trainer_lib.Trainer(config, mesh, image_tok, encoder)
    state = trainer.init_state(transformer.param_dict(transformer.build(config.model, seed=0)))
    frozen = trainer.place_frozen(image_tok, encoder)
    batch = random_batch(trainer, text_cfg.vocab_size)
    with jax.set_mesh(mesh):
        t0 = time.perf_counter()
        step = trainer.step_fn(TEMPLATE).lower(state, frozen, batch).compile()
        compile_s = time.perf_counter() - t0
        times = []
        for i in range(steps + 1):
            t0 = time.perf_counter()
            state, out = step(state, frozen, batch)
            loss = float(jax.device_get(out["loss"]))
            if i:
                times.append(time.perf_counter() - t0)
    seconds = statistics.median(times)
    layout = trainer_lib.sequence_layout(config, TEMPLATE)
    model_flops = config.batch_size * 3 * metrics.transformer_flops(config.model, layout, config.text.max_len)
    devices = jax.device_count()
    row = {"name": name, "devices": devices, "mesh": dict(mesh.shape), "batch": config.batch_size,
           "tokens_per_sample": layout.length, "dtype": config.model.dtype, "remat": config.model.remat,
           "depth": config.model.depth, "embed_dim": config.model.embed_dim,
           "parameters": int(sum(np.size(x) for x in jax.tree.leaves(state.params))),
           "text": "cached features" if config.text.cache else "T5 in the step",
           "compile_s": round(compile_s, 2), "step_s": round(seconds, 4), "step_s_all": [round(t, 4) for t in times],
           "tokens_per_s_per_device": round(config.batch_size * layout.length / seconds / devices, 1),
           "model_gflop_per_step": round(model_flops / 1e9, 2),
           "xla_gflop_per_step_per_device": round((metrics.compiled_flops(step) or float("nan")) / 1e9, 2),
           "mfu": round(model_flops / devices / seconds / peak, 4), "loss": loss}
    print(json.dumps(row), flush=True)
    return row


def section_tiny(steps: int, peak: float) -> list[dict]:
    config = configlib.load(REPO / "configs/varedit_tiny.py")
    config.mesh.shape = (-1, 1, 1)
    return [bench_step("varedit_tiny (sar, batch 8)", config, steps, peak)]


def section_slice2b(steps: int, peak: float, depth: int, batch: int) -> list[dict]:
    config = configlib.load(REPO / "configs/varedit_2b_256.py")
    config = configlib.override(config, {
        "model.depth": depth, "model.block_chunks": 1, "model.dtype": "float32", "batch_size": batch,
        "text.cache": True, "text.max_len": 64, "text.config": str(REPO / "configs/toy_text.py"),
        "text.dtype": "float32", "mesh.shape": (1, -1, 1)})
    return [bench_step(f"2B-shaped slice (depth {depth}, sar 256 px, batch {batch})", config, steps, peak)]


def section_plan(timeout_s: int) -> list[dict]:
    rows = []
    for name, config, topology, overrides in PLANS:
        with tempfile.TemporaryDirectory() as tmp:
            out = pathlib.Path(tmp) / "plan.json"
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, "-m", "varedit_jax.plan", "--config", config, "--topology",
                                   topology, "--json", str(out), *overrides], cwd=REPO, capture_output=True, text=True,
                                  timeout=timeout_s, env=dict(os.environ, JAX_PLATFORMS="cpu"))
            wall = time.perf_counter() - t0
            if proc.returncode != 0:
                row = {"name": name, "topology": topology, "error": proc.stderr.strip().splitlines()[-1:]}
            else:
                report = json.loads(out.read_text())
                b = report["bytes_per_device"]
                row = {"name": name, "topology": topology, "wall_s": round(wall, 1), "compile_s": report["compile_s"],
                       "mesh": report["config"]["mesh"], "batch": report["config"]["batch_size"],
                       "parameters": report["parameters"], "fits": report["fits"],
                       "gib_per_device": {k: round(v / 2 ** 30, 3) for k, v in b.items() if v is not None},
                       "init_gib_per_device": {k: round(v / 2 ** 30, 3)
                                               for k, v in report["init_bytes_per_device"].items()},
                       "hbm_fraction": report["hbm_fraction"], "compile_error": report.get("compile_error"),
                       "flops_per_step_per_device": report["flops_per_step_per_device"]}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default="tiny,slice2b,plan")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--slice_depth", type=int, default=2)
    parser.add_argument("--slice_batch", type=int, default=1)
    parser.add_argument("--plan_timeout_s", type=int, default=1800)
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/train_step.json"))
    args = parser.parse_args()
    sections = args.sections.split(",")
    unknown = set(sections) - {"tiny", "slice2b", "plan"}
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}")
    peak = metrics.peak_flops()
    result = {"peak_flops_per_device": peak, "peak_source": "measured fp32 1024^2 matmul" if
              jax.devices()[0].platform == "cpu" else "PEAK_FLOPS table (bf16 dense)"}
    if "tiny" in sections:
        result["tiny"] = section_tiny(args.steps, peak)
    if "slice2b" in sections:
        result["slice2b"] = section_slice2b(args.steps, peak, args.slice_depth, args.slice_batch)
    if "plan" in sections:
        result["plan"] = section_plan(args.plan_timeout_s)
    common.write(result, args.out)


if __name__ == "__main__":
    main()
