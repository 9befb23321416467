"""Tokenizer throughput on this machine: encode + multi-scale quantize, images/s, compile time separately.

Official widths (configs/image_tokenizer_d32.py, configs/image_tokenizer_d56.py) with random weights, square images at 256 and 512 px
(the 1.0 template at 0.06M / 0.25M; d56 runs its quantizer on the 2x VAE schedule). Per (family, resolution):
  compile_s           lower + compile of the jitted encode + quantize (tokenizer path, `encode_multiscale`)
  encode_quantize     images/s of that function (the best of `--iters` timed calls of the compiled program)
  flip_requant_ms     the trainer-path quantizer alone (`flip_requant` on the features), milliseconds per call
  python benchmarks/tokenizer.py [--out benchmarks/results/tokenizer.json] [--batch 1] [--iters 2]
"""
import argparse
import json
import pathlib
import sys
import time

import jax
import numpy as np

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import common
from varedit_jax import configlib, image_tokenizer, quantizer, schedules  # noqa: E402

FAMILIES = {"d32": REPO / "configs/image_tokenizer_d32.py", "d56": REPO / "configs/image_tokenizer_d56.py"}


def _timed(fn, *args, iters: int) -> tuple[float, object]:
    """(best seconds per call over `iters` calls, last output) of a compiled function."""
    best, out = float("inf"), None
    for _ in range(iters):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t0)
    return best, out


def bench_family(name: str, resolutions: list[int], batch: int, iters: int) -> list[dict]:
    cfg = configlib.load(FAMILIES[name]).model
    model = image_tokenizer.build(cfg, seed=0)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(image_tokenizer.param_dict(model)))
    rows = []
    for res in resolutions:
        sched = schedules.scale_schedule("1.0", schedules.pn_for_resolution(res))
        h, w = schedules.pixel_size(sched, model.stride)
        images = jax.random.uniform(jax.random.key(0), (batch, h, w, 3), minval=-1.0, maxval=1.0)

        def encode_quantize(x):
            features = model.encode(x)
            codes = model.quantize(features, sched)
            return codes.quantized, codes.bits, features

        t0 = time.perf_counter()
        compiled = jax.jit(encode_quantize).lower(images).compile()
        compile_s = time.perf_counter() - t0
        step_s, (_, _, features) = _timed(compiled, images, iters=iters)

        trainer = jax.jit(lambda f: quantizer.flip_requant(f, sched, patchify=model.patchify)[:2])
        jax.block_until_ready(trainer(features))  # compile
        trainer_s, _ = _timed(trainer, features, iters=5)
        row = {"family": name, "resolution": res, "image_hw": [h, w], "batch": batch, "params": n_params,
               "latent_hw": list(features.shape[1:3]), "scales": len(sched), "tokens": schedules.num_tokens(sched),
               "compile_s": round(compile_s, 3), "encode_quantize_s_per_call": round(step_s, 4),
               "encode_quantize_images_per_s": round(batch / step_s, 4),
               "flip_requant_ms": round(trainer_s * 1e3, 3)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/tokenizer.json"))
    parser.add_argument("--families", default="d32,d56")
    parser.add_argument("--resolutions", default="256,512")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--iters", type=int, default=2)
    args = parser.parse_args()
    families = [f for f in args.families.split(",") if f]
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown:
        parser.error(f"unknown families {unknown}; known: {sorted(FAMILIES)}")
    resolutions = [int(r) for r in args.resolutions.split(",") if r]
    rows = [row for fam in families for row in bench_family(fam, resolutions, args.batch, args.iters)]
    result = {"benchmark": "tokenizer encode + multi-scale quantize (random weights, fp32)", "rows": rows}
    common.write(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
