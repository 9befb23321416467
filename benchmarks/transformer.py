"""Transformer speed on this machine (CPU, fp32), JSON output; ratios are measured side by side in one run.

Sections (`--sections`, comma-separated):
  tiny      one training step as the trainer runs it (`train_step_case`: training-mode forward, per-bit CE, backward,
            `train_step.apply_gradients`; one jitted program, state donated) of `configs/varedit_tiny.py` (SAR, 777
            tokens, batch 8, random inputs) and the official CPU benchmark's cases a / b (`fixture_train_step`: the
            `varedit_transformer` / `infinity_transformer` fixtures' weights and inputs, B = 2, full-block remat).
  block     the official case c (`block_case`): one 2B-shaped block (C 2048, 16 heads, FFN 8192) forward + backward
            at L = 777 (the 256 px VAREdit sequence, mask of blocks >= 1) with 64 text tokens; achieved FLOP/s over
            a measured fp32 2048^2 matmul peak (FLOP formula of ../shared/reference/official_cpu_baseline.md).
  compile   compile time of one jitted train step (forward + loss + backward, B = 1, SAR 256 px layout, 64 text
            tokens, remat "full") for 2B (depth 32) and 8B (depth 40) shapes, scanned vs looped blocks (looped also
            at depth 4 and 8), on abstract shapes only (`jax.jit(...).lower(abstract).compile()`; no parameter is
            allocated); each in its own process, stopped after --compile_limit_s. Up to hours: not in the default.
`compare_official.py` runs the same cases beside the official code's figures.
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
from flax import nnx  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import common  # noqa: E402
from varedit_jax import conditioning, configlib, loading, optim, rope, schedules, train_step, transformer  # noqa: E402
from varedit_jax.attention import attend  # noqa: E402

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


def _inputs(cfg, layout, batch: int, key: int = 0, text_len: int = TEXT_LEN):
    """Random (text, mask, source, targets, bits) of the model's shapes."""
    ks = jax.random.split(jax.random.key(key), 4)
    text = jax.random.normal(ks[0], (batch, min(text_len, cfg.text_max_len), cfg.text_dim))
    mask = jnp.ones(text.shape[:2], bool)
    source = None if layout.source_grid is None else jax.random.normal(ks[1], (batch,) + layout.source_grid +
                                                                        (cfg.bits,))
    targets = jax.random.normal(ks[2], (batch, layout.n_target - 1, cfg.bits)) * 0.1
    bits = jax.random.bernoulli(ks[3], 0.5, (batch, layout.n_target, cfg.bits))
    return text, mask, source, targets, bits


def _loss_fn(layout):
    def loss(model, text, mask, drop, source, targets, bits):
        logits = model(text, mask, drop, source, targets, layout)
        return transformer.bitwise_loss(logits, bits, layout.schedule, reweight_by_scale=True)[0]
    return loss


def train_step_case(model_cfg, params: dict, layout, inputs: tuple, *, repeats: int, reweight_by_scale: bool,
                    text_drop_rate: float = 0.1, lr: float = 1e-4, weight_decay: float = 0.0) -> dict:
    """Times one training step as the trainer runs it (the official CPU benchmark's step): forward in training mode
    (drop path, `text_drop_rate` of the samples get cfg_uncond), per-bit CE, backward (remat as `model_cfg`), and the
    trainer's optimizer step (`train_step.apply_gradients`: global-norm clip 5 + AdamW, betas 0.9 / 0.97), one
    jitted program with the state donated. inputs = (text, mask, source, targets, bits)."""
    abstract = nnx.eval_shape(lambda: transformer.Infinity(model_cfg, rngs=nnx.Rngs(0)))
    graphdef = nnx.graphdef(abstract)
    config = ml_collections.ConfigDict({"optim": optim.default_config()})
    config.optim.update(lr=lr, weight_decay=weight_decay)
    tx = optim.make(config.optim, params)
    schedule = layout.schedule

    def step(state, key, text, mask, source, targets, bits):
        k_drop, k_path = jax.random.split(jax.random.fold_in(key, state.step))
        drop = jax.random.bernoulli(k_drop, text_drop_rate, (text.shape[0],))

        def loss_of(p):
            logits = nnx.merge(graphdef, p)(text, mask, drop, source, targets, layout, dropout_key=k_path)
            return transformer.bitwise_loss(logits, bits, schedule, reweight_by_scale=reweight_by_scale)[0]

        loss, grads = jax.value_and_grad(loss_of)(state.params)
        state, _ = train_step.apply_gradients(state, grads, loss, tx, config)
        return state, loss

    zero = lambda: jnp.zeros((), jnp.int32)  # noqa: E731 -- distinct buffers (the state is donated)
    state = train_step.TrainState(step=zero(), params=params, opt_state=tx.init(params), ema=None, bad_steps=zero(),
                                  skipped=zero())
    key = jax.random.key(0)
    t0 = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=(0,)).lower(state, key, *inputs).compile()
    compile_s = time.perf_counter() - t0
    holder = [state]

    def call():
        holder[0], loss = compiled(holder[0], key, *inputs)
        jax.block_until_ready(loss)

    timing = common.median_seconds(call, repeats=repeats)
    tokens = inputs[0].shape[0] * layout.length
    return {"batch": int(inputs[0].shape[0]), "tokens_per_sample": layout.length, "text_tokens": int(inputs[0].shape[1]),
            "remat": model_cfg.remat, "drop_path_rate": model_cfg.drop_path_rate, "compile_s": round(compile_s, 2),
            "seconds_per_step": timing["median_s"], "tokens_per_s": tokens / timing["median_s"], "timing": timing,
            "loss": float(jax.device_get(compiled(holder[0], key, *inputs)[1]))}


def fixture_train_step(folder: str, *, repeats: int) -> dict | None:
    """The official CPU benchmark's train-step case on a transformer fixture (`varedit_transformer`: pn 0.06M SAR,
    777 tokens; `infinity_transformer`: 521): its weights and inputs, training mode as the official trainer (drop
    path 0 -> 0.1, text dropout 0.1, full-block remat), per-bit CE averaged over (B, L, d), AdamW lr 1e-4 without
    weight decay. None when the fixture is absent."""
    path = REPO / "tests/fixtures" / folder
    if not (path / "config.json").is_file():
        return None
    kind = "infinity" if folder.startswith("infinity") else "varedit"
    cfg, model = loading.load_transformer(path / "weights.safetensors", kind=kind)
    model_cfg = transformer.default_model_config(**{**dict(cfg.model.items()), "remat": "full",
                                                    "drop_path_rate": 0.1, "scan_layers": True})
    z = np.load(path / ("io.npz" if kind == "infinity" else "pn0.06M_sar.npz"))
    layout = conditioning.sequence_layout("none" if kind == "infinity" else "sar",
                                          schedules.as_schedule(z["scale_schedule"]))
    b = z["gt_bits"].shape[0]
    source = None if kind == "infinity" else z["source_x_BLC"].reshape((b,) + layout.source_grid + (-1,))
    targets = z["x_BLC_wo_prefix"] if kind == "infinity" else z["target_x_BLC_wo_prefix"]
    inputs = tuple(None if a is None else jnp.asarray(a) for a in
                   (z["text_padded"], z["text_mask"].astype(bool), source, targets, z["gt_bits"]))
    row = train_step_case(model_cfg, transformer.param_dict(model), layout, inputs, repeats=repeats,
                          reweight_by_scale=False)
    return {"case": f"{folder} fixture", **row}


def section_tiny(iters: int) -> list[dict]:
    config = configlib.load(REPO / "configs/varedit_tiny.py")
    model_cfg = config.model
    layout = conditioning.sequence_layout("sar", SCHEDULE_256, "1.0")
    params = transformer.param_dict(transformer.build(model_cfg))
    row = train_step_case(model_cfg, params, layout, _inputs(model_cfg, layout, 8, text_len=32), repeats=iters,
                          reweight_by_scale=True, lr=config.optim.lr)
    rows = [{"case": "varedit_tiny (sar, batch 8, random inputs)", **row}]
    print(json.dumps(rows[-1]), flush=True)
    for folder, key in (("varedit_transformer", "varedit_fixture_train_step_tokens_per_s"),
                        ("infinity_transformer", "infinity_fixture_train_step_tokens_per_s")):
        row = fixture_train_step(folder, repeats=iters)
        if row is None:
            continue
        row["official_tokens_per_s (baseline note, another machine)"] = OFFICIAL[key]
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def matmul_peak(n: int = 2048, repeats: int = 20) -> dict:
    """fp32 n x n matmul FLOP/s (median and best of `repeats`, as the official benchmark's case e)."""
    a = jax.random.normal(jax.random.key(1), (n, n))
    b = jax.random.normal(jax.random.key(2), (n, n))
    f = jax.jit(lambda a, b: a @ b)
    timing = common.median_seconds(lambda: jax.block_until_ready(f(a, b)), repeats=repeats, warmup=2)
    return {"gflops_per_s": 2 * n ** 3 / timing["median_s"] / 1e9, "best_gflops_per_s": 2 * n ** 3 / timing["min_s"] / 1e9,
            "n": n, "timing": timing}


def block_flops(length: int, text_len: int, c: int, ffn: int, c_text: int) -> float:
    """Forward FLOPs of one block (official_cpu_baseline.md); forward + backward = 3x."""
    return (2 * length * c * 3 * c + 4 * length ** 2 * c + 2 * length * c * c + 2 * length * c * c
            + 2 * text_len * c_text * 2 * c + 4 * length * text_len * c + 2 * length * c * c + 4 * length * c * ffn)


def block_case(*, repeats: int) -> dict:
    """One 2B-shaped block (C 2048, 16 heads, FFN 8192) forward + backward at L = 777 (the 256 px VAREdit sequence,
    the mask of blocks >= 1) with 64 text tokens, as the official case c: a random output gradient, gradients of
    every block parameter and of the inputs (tokens, the shared AdaLN input, the text keys/values)."""
    cfg = transformer.default_model_config(**transformer.OFFICIAL_SHAPES["2b"])
    layout = conditioning.sequence_layout("finest", SCHEDULE_256, "1.0")
    block = transformer.CrossAttnBlock(cfg, nnx.Rngs(0), std=0.02, dtype=jnp.float32)
    graphdef, state = nnx.split(block)
    c = cfg.embed_dim
    ks = jax.random.split(jax.random.key(0), 5)
    x = 0.5 * jax.random.normal(ks[0], (1, layout.length, c))
    ada = 0.1 * jax.random.normal(ks[1], (1, 6, c))
    kv = 0.3 * jax.random.normal(ks[2], (1, TEXT_LEN, c))
    cond = jax.random.normal(ks[3], (1, c))
    grad_out = jax.random.normal(ks[4], x.shape)
    cos, sin = rope.cos_sin(layout.positions, c // cfg.num_heads)

    def attention(q, k, v):
        return attend(q, k, v, layout.mask, impl=cfg.attention_impl), None

    def forward(state, x, ada, kv):
        text = transformer.TextContext(cond=cond, ada=ada, kv=kv, mask=jnp.ones((1, TEXT_LEN), bool))
        return nnx.merge(graphdef, state)(x, text, cos, sin, attention)[0]

    def fwd_bwd(state, x, ada, kv):
        _, vjp = jax.vjp(forward, state, x, ada, kv)
        return vjp(grad_out)

    compiled = jax.jit(fwd_bwd).lower(state, x, ada, kv).compile()
    timing = common.median_seconds(lambda: jax.block_until_ready(compiled(state, x, ada, kv)), repeats=repeats)
    flops = 3 * block_flops(layout.length, TEXT_LEN, c, cfg.mlp_dim, c)
    return {"block": "2B (C 2048, 16 heads, FFN 8192)", "length": layout.length, "text_tokens": TEXT_LEN,
            "mask": "finest/sar blocks >= 1 (exact attention: only visible key blocks computed)",
            "seconds": timing["median_s"], "gflop": flops / 1e9, "gflops_per_s": flops / timing["median_s"] / 1e9,
            "timing": timing}


def section_block(iters: int) -> list[dict]:
    row = block_case(repeats=iters)
    peak = matmul_peak()
    row.update(matmul_2048=peak, fraction_of_peak=row["gflops_per_s"] / peak["gflops_per_s"],
               fraction_of_best_peak=row["gflops_per_s"] / peak["best_gflops_per_s"],
               official_baseline_note={k: OFFICIAL[k] for k in ("block_2b_fwd_bwd_s", "block_2b_gflop_per_s",
                                                                "matmul_2048_gflop_per_s")})
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

    text, mask, source, targets, bits = jax.eval_shape(lambda: _inputs(cfg, layout, 1))
    args = (text, mask, jax.ShapeDtypeStruct((1,), jnp.bool_), source, targets, bits)
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
