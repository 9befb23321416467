"""Exact (query-chunked) vs dense attention on this machine: forward + backward time and compiled scratch memory.

The mask is VAREdit's blocks >= 1 mask (`conditioning.sequence_layout("sar", schedule).mask`: [source | scales],
block-causal) of square images; q, k, v (batch, L, heads, head_dim) fp32 random, loss = sum(out * cotangent).
Per (resolution, impl) — impl "exact" (chunks of `attention.EXACT_CHUNK` rows) or "xla" (dense mask and scores,
`jax.nn.dot_product_attention`), measured side by side in one run:
  tokens, compile_s      length L and lower + compile time of the jitted value-and-grad
  fwd_bwd_s              mean seconds per value-and-grad call (after one untimed call; --iters calls)
  temp_mib / dense_scores_mib   compiled scratch (memory_analysis temp) vs one (B, N, L, L) fp32 score tensor
Resolutions in --compile_only are compiled, not run (e.g. 1024 px: 14617 tokens).
  python benchmarks/attention.py [--out benchmarks/results/attention.json] [--heads 4] [--head_dim 32]
"""
import argparse
import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import common
from varedit_jax import attention, conditioning, schedules  # noqa: E402


def _timed(fn, *args, iters: int) -> float:
    """Mean seconds per call of an already compiled function."""
    jax.block_until_ready(fn(*args))
    t0 = time.perf_counter()
    for _ in range(iters):
        jax.block_until_ready(fn(*args))
    return (time.perf_counter() - t0) / iters


def bench(resolution: int, impl: str, batch: int, heads: int, head_dim: int, iters: int, run: bool) -> dict:
    schedule = schedules.scale_schedule("1.0", schedules.pn_for_resolution(resolution))
    mask = conditioning.sequence_layout("sar", schedule).mask
    length = mask.shape[0]
    shape = (batch, length, heads, head_dim)
    q, k, v, cot = (jax.random.normal(key, shape) for key in jax.random.split(jax.random.key(0), 4))

    def loss(q, k, v):
        return jnp.sum(attention.attend(q, k, v, mask, impl=impl) * cot)

    t0 = time.perf_counter()
    compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(q, k, v).compile()
    compile_s = time.perf_counter() - t0
    row = {"resolution": resolution, "impl": impl, "tokens": length, "batch": batch, "heads": heads,
           "head_dim": head_dim, "compile_s": round(compile_s, 3),
           "temp_mib": round(compiled.memory_analysis().temp_size_in_bytes / 2**20, 1),
           "dense_scores_mib": round(batch * heads * length * length * 4 / 2**20, 1)}
    if run:
        row["fwd_bwd_s"] = round(_timed(compiled, q, k, v, iters=iters), 4)
    print(json.dumps(row), flush=True)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/attention.json"))
    parser.add_argument("--resolutions", default="256,512")
    parser.add_argument("--compile_only", default="1024", help="resolutions compiled (exact only), not run")
    parser.add_argument("--impls", default="exact,xla")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head_dim", type=int, default=32)
    parser.add_argument("--iters", type=int, default=2)
    args = parser.parse_args()
    impls = [i for i in args.impls.split(",") if i]
    if set(impls) - {"exact", "xla"}:
        parser.error(f"--impls takes exact and/or xla (CPU backends), got {impls}")
    dims = dict(batch=args.batch, heads=args.heads, head_dim=args.head_dim, iters=args.iters)
    rows = [bench(int(r), impl, run=True, **dims) for r in args.resolutions.split(",") if r for impl in impls]
    rows += [bench(int(r), "exact", run=False, **dims) for r in args.compile_only.split(",") if r]
    result = {"benchmark": "attention fwd+bwd, VAREdit blocks>=1 mask, fp32: exact (query-chunked) vs xla (dense)",
              "exact_chunk": attention.EXACT_CHUNK, "rows": rows}
    common.write(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
