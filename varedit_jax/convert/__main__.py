"""python -m varedit_jax.convert {import,export} ...

  import --kind {infinity,varedit,image_tokenizer,t5} --src FILE|DIR --out CKPT_DIR [--config CFG] [--overwrite]
      official weights -> an orbax checkpoint carrying its own config. Shapes determine the architecture;
      --config (configs/*.py or a fixture config.json) supplies the rest and is checked against the weights.
      A non-empty --out is refused unless --overwrite (the new checkpoint then replaces it whole, atomically).
      Tensors with NaN / inf, or integer where weights are floating point, are refused by name.
  export --checkpoint CKPT|WORKDIR|STEP_DIR --out FILE.safetensors|FILE.pth [--dtype fp32|bf16]
      a checkpoint (imported or trained here) -> the exact official key set.
A mismatched source is refused with the named keys and nothing is written.
"""
import argparse
import os
import sys

import jax
import ml_dtypes
import numpy as np

from varedit_jax import checkpoint, state_dicts, storage
from varedit_jax.convert import KINDS, family


def _cast(state_dict: dict, dtype: str) -> dict:
    if dtype == "fp32":
        return state_dict
    return {k: v.astype(ml_dtypes.bfloat16) if np.issubdtype(v.dtype, np.floating) else v
            for k, v in state_dict.items()}


def _save_replacing(out, params, config, *, overwrite: bool):
    """Writes the checkpoint beside `out`, then swaps it in (the old one stays whole until the new one is complete;
    on gs:// the swap copies object by object)."""
    out = storage.path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ValueError(f"--out {out} is not empty (pass --overwrite to replace it)")
    tmp, old = out.with_name(f".{out.name}.tmp-{os.getpid()}"), out.with_name(f".{out.name}.old-{os.getpid()}")
    storage.remove_tree(tmp)
    step_dir = checkpoint.save_params(tmp, params, config)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    storage.remove_tree(old)
    return out / step_dir.name


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m varedit_jax.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="official weights -> orbax checkpoint")
    imp.add_argument("--kind", required=True, choices=sorted(KINDS))
    imp.add_argument("--src", required=True)
    imp.add_argument("--out", required=True)
    imp.add_argument("--config", default=None)
    imp.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    exp = sub.add_parser("export", help="orbax checkpoint -> official state dict")
    exp.add_argument("--checkpoint", required=True)
    exp.add_argument("--out", required=True)
    exp.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    args = parser.parse_args(argv)

    try:
        for location in (args.src, args.out) if args.command == "import" else (args.checkpoint, args.out):
            storage.check_reachable(location)
        if args.command == "import":
            fam = family(args.kind)
            given = fam.config_from_file(args.config, kind=args.kind) if args.config else None
            with storage.local_copy(args.src) as src:  # gs://: a temporary download
                config, params = fam.import_weights(src, given, kind=args.kind)
            path = _save_replacing(args.out, params, config, overwrite=args.overwrite)
            n = sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(params))
            print(f"imported {args.kind} ({n:,} parameters) from {args.src} -> {path}")
        else:
            config, params = checkpoint.load_params(args.checkpoint)
            state_dict = _cast(family(config.kind).export_weights(config, params), args.dtype)
            path = state_dicts.write_state_dict(args.out, state_dict)
            print(f"exported {config.kind} ({len(state_dict)} tensors, {args.dtype}) -> {path}")
    except (state_dicts.StateDictMismatch, FileNotFoundError, ValueError, KeyError, ImportError,
            storage.StorageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
