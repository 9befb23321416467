"""AOT fit planner: compiles the real train step for a TPU slice on this (CPU-only) host and reports its memory.

  python -m varedit_jax.plan --config configs/varedit_2b_256.py --topology v5p-128 [--slices 2] [--template 1.0]
      [--json OUT] [--config.batch_size=...]  (any config override)

The slice's devices come from libtpu's topology description (the `tpu` extra; no TPU needed); `--slices N` plans N
such slices as one multi-slice topology (config.mesh.slices = N: the batch also splits over the "dcn" axis, each
slice holds a full copy of the sharded parameters and optimizer state; the compiled step includes the cross-slice
gradient all-reduce). The mesh, logical rules, remat and batch are the config's, attention is the Pallas splash
kernel. Reported per device: the initialisation's bytes (`init:`, random init + optimizer state + EMA as one
program), parameter,
optimizer-state and frozen-model bytes (from the shardings), XLA's argument / output / temporary (activations and
scratch) bytes, their peak total against the chip's HBM, the compiled FLOPs per step and an analytic estimate. A
step XLA refuses to compile for lack of HBM is reported as not fitting, with the temporaries it asked for (raise
`grad_accum` or use a bigger slice). The compiled count is XLA's cost analysis: it counts the body of a loop once (the scanned block stack, the scanned
T5) and Pallas kernels (splash attention) as zero, so it is far below the real work; the analytic estimate
(`analytic_flops`: the transformer's matmuls, dense attention, remat recomputation included) is what MFU uses.
"""
import argparse
import json
import math
import re
import sys
import time

import jax
import ml_collections
import numpy as np
from flax import nnx

from varedit_jax import configlib, loading, metrics, schedules, topology
from varedit_jax import trainer as trainer_lib
from varedit_jax.train_step import sequence_layout


def _bytes_per_device(abstract_tree) -> int:
    """Bytes one device holds of a tree of ShapeDtypeStructs with shardings."""
    total = 0
    for a in jax.tree.leaves(abstract_tree):
        shard = a.sharding.shard_shape(a.shape) if a.sharding is not None else a.shape
        total += int(np.prod(shard, dtype=np.int64)) * np.dtype(a.dtype).itemsize
    return total


def analytic_flops(config: ml_collections.ConfigDict, template: str, passes: int | None = None) -> float:
    """Matmul FLOPs of one train step (all devices, batch_size samples): `passes` forwards (default 3 = forward +
    backward, 4 with full remat) of `metrics.transformer_flops` at the conditioning's sequence length. passes=1
    gives a forward (an edit: batch 2 with CFG)."""
    if passes is None:
        passes = 4 if config.model.remat == "full" else 3
    return config.batch_size * passes * metrics.transformer_flops(config.model, sequence_layout(config, template),
                                                                  config.text.max_len)


def plan(config: ml_collections.ConfigDict, slice_name: str, template: str = "1.0") -> dict:
    """AOT-compiles the train step of `config` for `config.mesh.slices` slices `slice_name` and returns the report
    (see module doc)."""
    spec = topology.slice_spec(slice_name)
    config = ml_collections.ConfigDict(config.to_dict())
    config.model.attention_impl = "splash"
    config.text.cache = False
    slices = int(config.mesh.slices)
    mesh = trainer_lib.make_mesh(config, topology.topology_devices(slice_name, slices))
    image_tok, text_encoder = loading.abstract_frozen(config)
    trainer = trainer_lib.Trainer(config, mesh, image_tok, text_encoder)
    state = trainer.abstract_state()
    frozen = tuple(jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), nnx.state(m), sh)
                   for m, sh in zip((image_tok, text_encoder), trainer.frozen_shardings))
    batch = trainer.batch_spec(template)
    n_params = sum(math.prod(a.shape) for a in jax.tree.leaves(state.params))
    layout = sequence_layout(config, template)
    report = {
        "config": {"kind": config.kind, "conditioning": config.conditioning, "pn": config.pn, "template": template,
                   "batch_size": config.batch_size, "grad_accum": config.grad_accum, "remat": config.model.remat,
                   "dtype": config.model.dtype, "mesh": dict(mesh.shape), "sequence_length": layout.length},
        "topology": {"name": spec.name, "slices": slices, "grid": list(spec.grid), "devices": spec.chips * slices,
                     "hbm_bytes_per_device": spec.hbm_bytes},
        "parameters": n_params,
        "bytes_per_device": {"params": _bytes_per_device(state.params),
                             "optimizer": _bytes_per_device((state.opt_state, state.ema)),
                             "frozen_models": _bytes_per_device(frozen), "batch": _bytes_per_device(batch)},
        "flops_per_step_per_device": {"compiled": None,
                                      "analytic": analytic_flops(config, template) / (spec.chips * slices)},
    }
    report["init_bytes_per_device"] = plan_init(trainer, mesh)
    t0 = time.perf_counter()
    try:
        with jax.set_mesh(mesh):
            compiled = trainer.step_fn(template).lower(state, frozen, batch).compile()
    except jax.errors.JaxRuntimeError as e:  # XLA refuses programs that cannot fit: that is the planner's answer
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        needed = re.search(r"temporaries \(([\d.]+)([KMGT])\)", str(e))
        report["bytes_per_device"]["xla_temporaries"] = (float(needed.group(1)) * 2 ** (10 * "KMGT".index(
            needed.group(2)) + 10) if needed else None)
        report.update(fits=False, hbm_fraction=None, compile_s=round(time.perf_counter() - t0, 1),
                      compile_error=str(e).splitlines()[0])
        return report
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    args, out, temp = (int(getattr(mem, f"{k}_size_in_bytes", 0)) for k in ("argument", "output", "temp"))
    alias = int(getattr(mem, "alias_size_in_bytes", 0))
    peak = args + out - alias + temp
    report["bytes_per_device"].update(xla_arguments=args, xla_outputs=out, xla_aliased=alias, xla_temporaries=temp,
                                      peak=peak)
    report["flops_per_step_per_device"]["compiled"] = float(cost.get("flops", float("nan"))) if cost else None
    report.update(fits=peak <= spec.hbm_bytes, hbm_fraction=peak / spec.hbm_bytes, compile_s=round(compile_s, 1))
    return report


def plan_init(trainer: trainer_lib.Trainer, mesh: jax.sharding.Mesh) -> dict:
    """Per-device bytes of a run's initialisation (random init, optimizer state and EMA: what `train` runs before
    its first step, here as one program), from its AOT compile: the state it outputs and XLA's temporaries."""
    init = jax.jit(lambda: trainer.init_state_fn(trainer.init_params_fn()()), out_shardings=trainer.state_shardings)
    with jax.set_mesh(mesh):
        mem = init.lower().compile().memory_analysis()
    out, temp = int(mem.output_size_in_bytes), int(mem.temp_size_in_bytes)
    return {"state": out, "temporaries": temp, "peak": out + temp}


def _gib(n: float) -> str:
    return f"{n / 2 ** 30:.2f} GiB"


def summary(report: dict) -> str:
    b = report["bytes_per_device"]
    f = report["flops_per_step_per_device"]
    t = report["topology"]
    head = (f"{'' if t['slices'] == 1 else str(t['slices']) + ' x '}{t['name']} ({t['devices']} devices, mesh "
            f"{report['config']['mesh']}): {report['parameters'] / 1e6:,.1f}M parameters, batch "
            f"{report['config']['batch_size']}, L = {report['config']['sequence_length']}")
    if "compile_error" in report:
        need, i = b["xla_temporaries"], report["init_bytes_per_device"]
        return "\n".join([head, f"  init: {_gib(i['peak'])} per chip (state {_gib(i['state'])}, temporaries "
                                f"{_gib(i['temporaries'])})", f"  per device: params {_gib(b['params'])}, optimizer {_gib(b['optimizer'])}, frozen "
                                f"models {_gib(b['frozen_models'])}; XLA needs {_gib(need) if need else '?'} of "
                                f"temporaries, the chip has {_gib(report['topology']['hbm_bytes_per_device'])} -> "
                                f"DOES NOT FIT (raise --config.grad_accum, or a bigger slice)",
                                f"  {report['compile_error']}"])
    i = report["init_bytes_per_device"]
    lines = [head,
             f"  init: {_gib(i['peak'])} per chip (state {_gib(i['state'])}, temporaries {_gib(i['temporaries'])})",
             f"  per device: params {_gib(b['params'])}, optimizer {_gib(b['optimizer'])}, frozen models "
             f"{_gib(b['frozen_models'])}, temporaries {_gib(b['xla_temporaries'])}; peak {_gib(b['peak'])} of "
             f"{_gib(report['topology']['hbm_bytes_per_device'])} -> {'FITS' if report['fits'] else 'DOES NOT FIT'}",
             f"  FLOPs per step per device: compiled {f['compiled']:.3e}, analytic {f['analytic']:.3e}; "
             f"compile {report['compile_s']} s"]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m varedit_jax.plan", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="configs/*.py[:arg]")
    parser.add_argument("--topology", required=True, help="TPU slice, e.g. v5p-8, v5p-128, v5e-256")
    parser.add_argument("--slices", type=int, default=None,
                        help="plan this many such slices (multi-slice over DCN; default: the config's mesh.slices)")
    parser.add_argument("--template", default="1.0", help="aspect template of the planned step")
    parser.add_argument("--json", help="also write the report here")
    args, overrides = parser.parse_known_args(argv)
    try:
        config = configlib.load(args.config)
        config = configlib.override(config, configlib.parse_overrides(overrides))
        if args.slices is not None:
            config.mesh.slices = args.slices
        schedules.scale_schedule(args.template, config.pn)
        report = plan(config, args.topology, args.template)
    except (ValueError, KeyError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
