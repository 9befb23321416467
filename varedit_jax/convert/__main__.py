"""python -m varedit_jax.convert {import,export} ...

  import --kind {infinity,varedit,image_tokenizer,t5} --src FILE|DIR --out CKPT_DIR [--config CFG] [--overwrite]
      official weights -> an orbax checkpoint carrying its own config. Shapes determine the architecture;
      --config (configs/*.py or a fixture config.json) supplies the rest and is checked against the weights.
      A non-empty --out is refused unless --overwrite (the new checkpoint then replaces it whole, atomically).
      Tensors with NaN / inf, or integer where weights are floating point, are refused by name.
  export --checkpoint CKPT|WORKDIR|STEP_DIR --out DIR/FILE.safetensors|DIR/FILE.pth [--dtype fp32|bf16]
         [--weights ema|params] [--with-tokenizer [--image-tokenizer PATH]] [--force]
      a checkpoint (imported or trained here) -> the exact official key set (files mode 0644). The EMA weights when
      the run kept them (else the params), unless --weights says. A transformer also gets DIR/model.json
      (`convert/bundle.py`: the official constructor's arguments and everything else serving needs), with
      --with-tokenizer its image tokenizer's weights (DIR/image_tokenizer.<same suffix>). A model the official code
      cannot serve (full / finest conditioning, a text width its constructor cannot represent) is refused unless
      --force.
A mismatched source is refused with the named keys and nothing is written.
"""
import argparse
import os
import sys

import jax
import ml_dtypes
import numpy as np

from varedit_jax import checkpoint, image_tokenizer, loading, quantizer, state_dicts, storage
from varedit_jax.convert import KINDS, bundle, family, infinity


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


def _load_weights(path, weights: str | None):
    """(step, config, params, which): the EMA when the run kept one and `weights` is None."""
    try:
        step, config, params = checkpoint.load(path, weights=weights or "ema")
        return step, config, params, weights or "ema"
    except checkpoint.NoEMA:
        if weights:
            raise
        return *checkpoint.load(path), "params"


def _tokenizer(config, path: str | None, out, dtype: str):
    """(file, state dict, model.json entry) of the transformer's image tokenizer (`path` or the config's)."""
    path = path or (config.get("image_tokenizer") or {}).get("path")
    if not path:
        raise ValueError("--with-tokenizer: the checkpoint names no image tokenizer (image_tokenizer.path); pass "
                         "--image-tokenizer PATH")
    tok_config, params = loading.load_params(path, (image_tokenizer.KIND,), "image tokenizer")
    m, model = tok_config.model, infinity.model_config(config)
    if quantizer.token_dim(m.codebook_dim, model.patchify) != model.bits:
        raise ValueError(f"--with-tokenizer: the image tokenizer at {path} (d = {m.codebook_dim}) does not give the "
                         f"transformer's {model.bits}-bit tokens")
    file = out.with_name("image_tokenizer" + out.suffix)
    state_dict = _cast(family(tok_config.kind).export_weights(tok_config, params), dtype)
    return file, state_dict, {"file": file.name, "path": str(path), "config": m.to_dict()}


def export(args) -> None:
    """The `export` command: weights (+ model.json and the image tokenizer for a transformer)."""
    out = storage.path(args.out)
    step, config, params, which = _load_weights(args.checkpoint, args.weights)
    is_transformer = config.get("kind") in infinity.KINDS
    if is_transformer and not args.force and (problems := bundle.serving_problems(config)):
        raise bundle.NotServable("the official code cannot serve this model: " + "; ".join(problems) +
                                 " (--force exports it anyway)")
    if args.with_tokenizer and not is_transformer:
        raise ValueError(f"--with-tokenizer goes with a transformer checkpoint, not {config.get('kind')!r}")
    state_dict = _cast(family(config.kind).export_weights(config, params), args.dtype)
    tokenizer = _tokenizer(config, args.image_tokenizer, out, args.dtype) if args.with_tokenizer else None
    path = state_dicts.write_state_dict(out, state_dict)
    print(f"exported {config.kind} ({len(state_dict)} tensors, {args.dtype}, {which} of step {step}) -> {path}")
    if not is_transformer:
        return
    if tokenizer:
        print(f"exported its image tokenizer -> {state_dicts.write_state_dict(tokenizer[0], tokenizer[1])}")
    contents = bundle.describe(config, step=step, weights_file=out.name, which=which, dtype=args.dtype,
                               tokenizer=tokenizer[2] if tokenizer else None)
    print(f"wrote {bundle.write(out.parent, contents)}")


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
    exp.add_argument("--weights", default=None, choices=checkpoint.WEIGHTS,
                     help="which weights (default: the EMA when the run kept one, else the params)")
    exp.add_argument("--with-tokenizer", action="store_true", help="export the image tokenizer's weights too")
    exp.add_argument("--image-tokenizer", default=None, help="the image tokenizer (default: the config's)")
    exp.add_argument("--force", action="store_true", help="export a model the official code cannot serve")
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
            export(args)
    except (state_dicts.StateDictMismatch, FileNotFoundError, ValueError, KeyError, ImportError,
            storage.StorageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
