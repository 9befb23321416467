"""Transformer speed on this machine (CPU, fp32), JSON output; ratios are measured side by side in one run.

Sections (`--sections`, comma-separated):
  tiny      forward + backward (per-bit CE) tokens/s of `configs/varedit_tiny.py` (SAR, 256 px layout: 777 tokens)
            and of the official CPU baseline's shapes (the `varedit_transformer` / `infinity_transformer` fixture
            configs, B = 2, remat "full" like the official full-block checkpointing), each also as a full train
            step with AdamW (what the official figure measures).
  block     one 2B-shaped block (C 2048, 16 heads, FFN 8192) forward + backward at L = 777 (the 256 px VAREdit
            sequence, finest-source mask of blocks >= 1) with 64 text tokens; achieved FLOP/s over a measured fp32
            2048^2 matmul peak (FLOP formula of ../shared/reference/official_cpu_baseline.md).
  compile   compile time of one jitted train step (forward + loss + backward, B = 1, SAR 256 px layout, 64 text
            tokens, remat "full") for 2B (depth 32) and 8B (depth 40) shapes, scanned vs looped blocks (looped also
            at depth 4 and 8), on abstract shapes only (`jax.jit(...).lower(abstract).compile()`; no parameter is
            allocated); each in its own process, stopped after --compile_limit_s. Up to hours: not in the default.
Official figures (torch 2.13 CPU, 2 cores, fp32; official_cpu_baseline.md) are copied into the output next to
ours for comparison.
  python benchmarks/transformer.py [--sections tiny,block] [--out benchmarks/results/transformer.json]
"""
import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import common  # noqa: E402
from varedit_jax import conditioning, configlib, rope, schedules, transformer  # noqa: E402
from varedit_jax.attention import attend  # noqa: E402
from varedit_jax.convert import infinity as convert_infinity  # noqa: E402

OFFICIAL = {
    "varedit_fixture_train_step_tokens_per_s": 8.4e3,
    "infinity_fixture_train_step_tokens_per_s": 10.8e3,
    "block_2b_fwd_bwd_s": 1.98,
    "block_2b_gflop": 293.0,
    "block_2b_gflop_per_s": 148.0,
    "matmul_2048_gflop_per_s": 195.0,
}
SCHEDULE_256 = schedules.scale_schedule("1.0", "0.06M")
TEXT_LEN = 64


def _timed(fn, *args, iters: int) -> float:
    """Mean seconds per call of a compiled function (one untimed warm-up call first)."""
    jax.block_until_ready(fn(*args))
    t0 = time.perf_counter()
    for _ in range(iters):
        jax.block_until_ready(fn(*args))
    return (time.perf_counter() - t0) / iters


def _inputs(cfg, layout, batch: int, key: int = 0):
    ks = jax.random.split(jax.random.key(key), 4)
    text = jax.random.normal(ks[0], (batch, min(TEXT_LEN, cfg.text_max_len), cfg.text_dim))
    mask = jnp.ones(text.shape[:2], bool)
    source = None if layout.source_grid is None else jax.random.normal(ks[1], (batch,) + layout.source_grid +
                                                                        (cfg.bits,))
    targets = jax.random.normal(ks[2], (batch, layout.n_target - 1, cfg.bits)) * 0.1
    bits = jax.random.bernoulli(ks[3], 0.5, (batch, layout.n_target, cfg.bits))
    return text, mask, jnp.zeros(batch, bool), source, targets, bits


def _loss_fn(layout):
    def loss(model, text, mask, drop, source, targets, bits):
        logits = model(text, mask, drop, source, targets, layout)
        return transformer.bitwise_loss(logits, bits, layout.schedule, reweight_by_scale=True)[0]
    return loss


def bench_model(name: str, cfg, conditioning_mode: str, batch: int, iters: int) -> dict:
    layout = conditioning.sequence_layout(conditioning_mode, SCHEDULE_256, "1.0")
    model = transformer.Infinity(cfg, rngs=nnx.Rngs(0))
    args = _inputs(cfg, layout, batch)
    loss = _loss_fn(layout)
    fwd_bwd = nnx.jit(nnx.value_and_grad(loss))
    optimizer = nnx.Optimizer(model, optax.adamw(1e-4, b1=0.9, b2=0.97, weight_decay=0.005), wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, *a):
        value, grads = nnx.value_and_grad(loss)(model, *a)
        optimizer.update(model, grads)
        return value

    t0 = time.perf_counter()
    jax.block_until_ready(fwd_bwd(model, *args))
    compile_s = time.perf_counter() - t0
    fb_s = _timed(fwd_bwd, model, *args, iters=iters)
    step_s = _timed(train_step, model, optimizer, *args, iters=iters)
    tokens = batch * layout.length
    row = {"model": name, "conditioning": conditioning_mode, "batch": batch, "tokens_per_sample": layout.length,
           "params": int(sum(np.prod(x.shape) for x in jax.tree.leaves(transformer.param_dict(model)))),
           "remat": cfg.remat, "scan_layers": cfg.scan_layers, "first_call_s": round(compile_s, 2),
           "fwd_bwd_s": round(fb_s, 4), "fwd_bwd_tokens_per_s": round(tokens / fb_s, 1),
           "train_step_s": round(step_s, 4), "train_step_tokens_per_s": round(tokens / step_s, 1)}
    print(json.dumps(row), flush=True)
    return row


def fixture_model_config(folder: str) -> ml_collections.ConfigDict | None:
    path = REPO / "tests/fixtures" / folder / "config.json"
    if not path.is_file():
        return None
    cfg = convert_infinity.config_from_file(path, kind="infinity" if folder.startswith("infinity") else "varedit")
    return transformer.default_model_config(**{**dict(cfg.model.items()), "remat": "full", "drop_path_rate": 0.0})


def section_tiny(iters: int) -> list[dict]:
    rows = [bench_model("varedit_tiny", configlib.load(REPO / "configs/varedit_tiny.py").model, "sar", 2, iters)]
    for folder, mode, key in (("varedit_transformer", "sar", "varedit_fixture_train_step_tokens_per_s"),
                              ("infinity_transformer", "none", "infinity_fixture_train_step_tokens_per_s")):
        cfg = fixture_model_config(folder)
        if cfg is None:
            continue
        row = bench_model(f"{folder}_shapes", cfg, mode, 2, iters)
        row["official_train_step_tokens_per_s"] = OFFICIAL[key]
        row["train_step_speedup_vs_official"] = round(row["train_step_tokens_per_s"] / OFFICIAL[key], 3)
        rows.append(row)
    return rows


def matmul_peak(n: int = 2048, iters: int = 10) -> float:
    """Measured fp32 n x n matmul FLOP/s."""
    a = jax.random.normal(jax.random.key(1), (n, n))
    b = jax.random.normal(jax.random.key(2), (n, n))
    f = jax.jit(lambda a, b: a @ b)
    return 2 * n ** 3 / _timed(f, a, b, iters=iters)


def block_flops(length: int, text_len: int, c: int, ffn: int, c_text: int) -> float:
    """Forward FLOPs of one block (official_cpu_baseline.md); forward + backward = 3x."""
    return (2 * length * c * 3 * c + 4 * length ** 2 * c + 2 * length * c * c + 2 * length * c * c
            + 2 * text_len * c_text * 2 * c + 4 * length * text_len * c + 2 * length * c * c + 4 * length * c * ffn)


def section_block(iters: int) -> list[dict]:
    cfg = transformer.default_model_config(**transformer.OFFICIAL_SHAPES["2b"])
    layout = conditioning.sequence_layout("finest", SCHEDULE_256, "1.0")
    block = transformer.CrossAttnBlock(cfg, nnx.Rngs(0), std=0.02, dtype=jnp.float32)
    c, n_heads = cfg.embed_dim, cfg.num_heads
    ks = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(ks[0], (1, layout.length, c))
    text = transformer.TextContext(cond=jax.random.normal(ks[1], (1, c)),
                                   ada=jax.random.normal(ks[2], (1, 6, c)) * 0.1,
                                   kv=jax.random.normal(ks[3], (1, TEXT_LEN, c)), mask=jnp.ones((1, TEXT_LEN), bool))
    cos, sin = rope.cos_sin(layout.positions, c // n_heads)

    def attention(q, k, v):
        return attend(q, k, v, layout.mask, impl=cfg.attention_impl), None

    def loss(block, x):
        return jnp.sum(block(x, text, cos, sin, attention)[0])

    fwd_bwd = nnx.jit(nnx.grad(loss, argnums=(0, 1)))
    jax.block_until_ready(fwd_bwd(block, x))
    seconds = _timed(fwd_bwd, block, x, iters=iters)
    flops = 3 * block_flops(layout.length, TEXT_LEN, c, cfg.mlp_dim, c)
    peak = matmul_peak()
    row = {"block": "2B (C 2048, 16 heads, FFN 8192)", "length": layout.length, "text_tokens": TEXT_LEN,
           "mask": "finest/sar blocks >= 1 (dense masked exact attention)", "fwd_bwd_s": round(seconds, 4),
           "gflop": round(flops / 1e9, 1), "gflop_per_s": round(flops / seconds / 1e9, 1),
           "matmul_2048_peak_gflop_per_s": round(peak / 1e9, 1), "fraction_of_peak": round(flops / seconds / peak, 3),
           "official_fwd_bwd_s": OFFICIAL["block_2b_fwd_bwd_s"],
           "official_gflop_per_s": OFFICIAL["block_2b_gflop_per_s"],
           "official_matmul_peak_gflop_per_s": OFFICIAL["matmul_2048_gflop_per_s"],
           "speedup_vs_official": round(OFFICIAL["block_2b_fwd_bwd_s"] / seconds, 3)}
    print(json.dumps(row), flush=True)
    return [row]


def compile_seconds(shape: str, depth: int, scan_layers: bool) -> float:
    """Lower + compile of a train step (forward + loss + backward) on abstract shapes."""
    cfg = transformer.default_model_config(**{**transformer.OFFICIAL_SHAPES[shape], "depth": depth,
                                              "block_chunks": 1, "scan_layers": scan_layers, "remat": "full",
                                              "drop_path_rate": 0.0})
    layout = conditioning.sequence_layout("sar", SCHEDULE_256, "1.0")
    abstract = nnx.eval_shape(lambda: transformer.Infinity(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    loss = _loss_fn(layout)

    def step(state, *args):
        return jax.value_and_grad(lambda s: loss(nnx.merge(graphdef, s), *args))(state)

    args = jax.eval_shape(lambda: _inputs(cfg, layout, 1))
    t0 = time.perf_counter()
    jax.jit(step).lower(state, *args).compile()
    return time.perf_counter() - t0


def section_compile(limit_s: int) -> list[dict]:
    """Each measurement in its own process (fresh caches), stopped after `limit_s` seconds."""
    rows = []
    runs = [("2b", 32, True), ("8b", 40, True), ("2b", 4, False), ("2b", 8, False), ("2b", 32, False),
            ("8b", 40, False)]
    for shape, depth, scan in runs:
        cmd = [sys.executable, __file__, "--compile_one", f"{shape},{depth},{int(scan)}"]
        row = {"shape": shape, "depth": depth, "scan_layers": scan}
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=limit_s, check=True)
            row["compile_s"] = round(float(out.stdout.strip().splitlines()[-1]), 1)
        except subprocess.TimeoutExpired:
            row["compile_s"], row["stopped_after_s"] = None, limit_s
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default="tiny,block")
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/transformer.json"))
    parser.add_argument("--compile_limit_s", type=int, default=1800)
    parser.add_argument("--compile_one", default=None, help=argparse.SUPPRESS)  # internal: "shape,depth,scan"
    args = parser.parse_args()
    if args.compile_one:
        shape, depth, scan = args.compile_one.split(",")
        print(compile_seconds(shape, int(depth), bool(int(scan))))
        return 0
    sections = [s for s in args.sections.split(",") if s]
    unknown = sorted(set(sections) - {"tiny", "block", "compile"})
    if unknown:
        print(f"error: unknown sections {unknown}", file=sys.stderr)
        return 2
    result = {"official": OFFICIAL}
    if "tiny" in sections:
        result["tiny"] = section_tiny(args.iters)
    if "block" in sections:
        result["block"] = section_block(args.iters)
    if "compile" in sections:
        result["compile"] = section_compile(args.compile_limit_s)
    common.write(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
