"""Instruction-guided image editing from the command line (`editor.Editor`).

  python -m varedit_jax.edit --checkpoint CKPT [--image-tokenizer TOK] [--text-encoder DIR] --image IN.png \
      --instruction "..." --out OUT.png [--resolution 256|512|1024] [--guidance 4] [--tau 0.5] [--seed 0] \
      [--preprocess official|train] [--top-k 900] [--top-p 0.97] [--negative "..."]
  multi-turn:  --image IN.png --turns "i1" "i2" ... --out OUT.png   (turn t < last also written as OUT.turn<t>.png;
               each turn edits the previous output on the device, seed + t)
  batch:       --batch FILE.jsonl   rows {"image": ..., "instruction": ..., "out": ...[, "negative": ...]};
               relative paths are relative to the JSONL file. Bad rows (invalid JSON, missing fields, a missing or
               corrupt image, an empty instruction) are reported and skipped; every good row is written. Row i
               (0-based, counting every line) samples with key fold_in(seed, i), whatever the batching.
  AOT:         --aot v5p-8 [--tensor N] [--batch-size N] [--resolution R]   compiles the sampler of CKPT's config (an
               orbax checkpoint or a configs/*.py file; no weights are read) for a TPU slice and prints its memory.

CKPT: a trained or imported checkpoint (orbax; a training workdir takes its newest step) or official weights.
--image-tokenizer / --text-encoder override the config's `image_tokenizer.path` / `text.path` (imported official
checkpoints have none). --guidance / --tau take one value or a comma-separated list with one value per scale.
--devices N uses the first N devices (default all), batch split over them ("data"), `--tensor` of them per
model replica (8B).

Exit codes: 0 success; 1 a batch run with bad rows (the good ones were written); 2 a usage or input error (missing
or corrupt image, empty instruction, checkpoint/config mismatch, ...), printed as one line.
"""
import argparse
import json
import pathlib
import sys
import time

import jax
import numpy as np
from etils import epath

from varedit_jax import checkpoint, configlib, editor, images, sampler, schedules, state_dicts, storage, text

_ERRORS = (ValueError, FileNotFoundError, ImportError, state_dicts.StateDictMismatch, RuntimeError, FloatingPointError,
           storage.StorageError)


def _floats(value: str) -> float | list[float]:
    try:
        values = [float(v) for v in value.split(",")]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected a number or comma-separated numbers, got {value!r}") from e
    return values[0] if len(values) == 1 else values


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m varedit_jax.edit", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="transformer checkpoint / workdir / official weights")
    p.add_argument("--image-tokenizer", help="image tokenizer: official weights, an imported checkpoint or a "
                   "toy-tokenizer workdir")
    p.add_argument("--text-encoder", help="text encoder: a Hugging Face folder or a checkpoint")
    p.add_argument("--image", help="input image")
    p.add_argument("--instruction", help="edit instruction")
    p.add_argument("--turns", nargs="+", help="instructions of a multi-turn edit, in order")
    p.add_argument("--out", help="output image")
    p.add_argument("--batch", help="JSONL file of {image, instruction, out} rows")
    p.add_argument("--resolution", type=int, choices=sorted(schedules.RESOLUTION_TO_PN),
                   help="size class (default: the checkpoint's pn)")
    p.add_argument("--guidance", type=_floats, default=sampler.DEFAULT_GUIDANCE,
                   help="classifier-free guidance scale (or one per scale)")
    p.add_argument("--tau", type=_floats, default=sampler.DEFAULT_TAU, help="temperature (or one per scale)")
    p.add_argument("--top-k", type=int, default=sampler.DEFAULT_TOP_K, help="top-k per bit (1 = argmax)")
    p.add_argument("--top-p", type=float, default=sampler.DEFAULT_TOP_P, help="top-p per bit (0 = off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--negative", help="negative prompt for the unconditional branch")
    p.add_argument("--preprocess", choices=editor.PREPROCESS, default="official")
    p.add_argument("--batch-size", type=int, default=None, help="edits per device step (default: the device count)")
    p.add_argument("--devices", type=int, default=0, help="use the first N devices (default: all)")
    p.add_argument("--tensor", type=int, default=1, help="devices per model replica (tensor parallel)")
    p.add_argument("--aot", metavar="SLICE", help="AOT-compile the sampler for a TPU slice (e.g. v5p-8) and exit")
    return p


def _check_mode(args) -> str:
    """'single', 'turns', 'batch' or 'aot'; ValueError for inconsistent flags."""
    if args.aot:
        return "aot"
    if args.batch:
        extra = [f for f in ("image", "instruction", "turns", "out") if getattr(args, f)]
        if extra:
            raise ValueError(f"--batch does not combine with {', '.join('--' + f for f in extra)}")
        return "batch"
    if not args.image or not args.out:
        raise ValueError("give --image and --out (or --batch FILE.jsonl)")
    if (args.instruction is None) == (args.turns is None):
        raise ValueError("give exactly one of --instruction and --turns")
    return "single" if args.instruction is not None else "turns"


def _check_instruction(value) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError("empty instruction")
    return value


def _options(args) -> dict:
    """The keywords of `Editor.edit` / `edit_turns` the flags set."""
    options = sampler.SamplingOptions(guidance=args.guidance, tau=args.tau, top_k=args.top_k, top_p=args.top_p,
                                      seed=args.seed)
    return dict(options=options, resolution=args.resolution, preprocess=args.preprocess)


def _editor(args) -> editor.Editor:
    devices = jax.devices()
    if args.devices:
        if not 1 <= args.devices <= len(devices):
            raise ValueError(f"--devices {args.devices}: {len(devices)} devices are available")
        devices = devices[:args.devices]
    if len(devices) % args.tensor:
        raise ValueError(f"--tensor {args.tensor} does not divide the {len(devices)} devices")
    t0 = time.perf_counter()
    edit = editor.Editor.from_checkpoint(args.checkpoint, args.image_tokenizer, args.text_encoder,
                                         mesh=sampler.inference_mesh(devices, tensor=args.tensor),
                                         batch_size=args.batch_size)
    print(f"loaded {args.checkpoint} in {time.perf_counter() - t0:.1f} s ({len(devices)} devices, "
          f"batch {edit.batch_size})", flush=True)
    return edit


def _save(image: np.ndarray, path) -> None:
    storage.write_bytes(path, images.png_bytes(image))


def run_single(args, turns: list[str]) -> None:
    for t in turns:
        _check_instruction(t)
    image = images.read(args.image)
    edit = _editor(args)
    t0 = time.perf_counter()
    outs = edit.edit_turns([image], [[t] for t in turns], negative=args.negative, **_options(args))
    out = storage.path(args.out)
    for t, turn in enumerate(outs):
        path = out if t == len(outs) - 1 else out.with_name(f"{out.stem}.turn{t}{out.suffix}")
        _save(turn[0], path)
        print(f"turn {t}: {turns[t]!r} -> {path}")
    print(f"edited in {time.perf_counter() - t0:.2f} s (compile included)")


def read_rows(path: epath.Path) -> tuple[list[tuple[int, dict]], list[tuple[int, str]]]:
    """(good rows (line index, {image, instruction, out, negative}), bad rows (line index, reason)) of a JSONL;
    images are checked later (when read)."""
    if not path.is_file():
        raise FileNotFoundError(f"no batch file at {path}")
    good, bad = [], []
    for i, line in enumerate(path.read_text().splitlines()):
        if not line.strip():
            bad.append((i, "empty line"))
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            bad.append((i, f"invalid JSON ({e.msg})"))
            continue
        if not isinstance(row, dict):
            bad.append((i, "not a JSON object"))
            continue
        missing = [k for k in ("image", "instruction", "out") if not isinstance(row.get(k), str)]
        if missing:
            bad.append((i, f"missing or non-string fields {missing}"))
            continue
        if not row["instruction"].strip():
            bad.append((i, "empty instruction"))
            continue
        negative = row.get("negative")
        if negative is not None and (not isinstance(negative, str) or not negative.strip()):
            bad.append((i, "negative must be a non-empty string"))
            continue
        good.append((i, {"image": path.parent / row["image"], "instruction": row["instruction"],
                         "out": path.parent / row["out"], "negative": negative}))
    return good, bad


def run_batch(args) -> int:
    path = storage.path(args.batch)
    rows, bad = read_rows(path)
    edit = _editor(args) if rows else None
    t0, done = time.perf_counter(), 0
    for start in range(0, len(rows), edit.batch_size if edit else 1):
        chunk, inputs = [], []
        for i, row in rows[start:start + edit.batch_size]:
            try:
                inputs.append(images.read(row["image"]))
                chunk.append((i, row))
            except (FileNotFoundError, ValueError) as e:
                bad.append((i, str(e)))
        if not chunk:
            continue
        negs = [row["negative"] for _, row in chunk]
        outs = edit.edit(inputs, [row["instruction"] for _, row in chunk], indices=[i for i, _ in chunk],
                           negative=negs if any(n is not None for n in negs) else args.negative, **_options(args))
        for (_, row), image in zip(chunk, outs):
            _save(image, row["out"])
        done += len(chunk)
        print(f"edited {done}/{len(rows)} rows ({time.perf_counter() - t0:.1f} s)", flush=True)
    for i, reason in sorted(bad):
        print(f"bad row {i} of {path}: {reason}", file=sys.stderr)
    print(f"wrote {done} images, skipped {len(bad)} bad rows")
    return 1 if bad else 0


def run_aot(args) -> None:
    path = pathlib.Path(args.checkpoint)
    config = configlib.load(str(path)) if path.suffix == ".py" else checkpoint.load_config(path)
    batch = args.batch_size or 1
    compiled, seconds = sampler.compile_for_topology(config, args.aot, batch=batch, resolution=args.resolution,
                                                     tensor=args.tensor)
    mem = compiled.memory_analysis()
    gib = 2 ** 30
    print(f"compiled the sampler for {args.aot} (batch {batch}, tensor {args.tensor}) in {seconds:.1f} s; per device: "
          f"arguments {mem.argument_size_in_bytes / gib:.2f} GiB, temporaries {mem.temp_size_in_bytes / gib:.2f} GiB, "
          f"outputs {mem.output_size_in_bytes / gib:.2f} GiB")


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        mode = _check_mode(args)
        if mode == "aot":
            run_aot(args)
        elif mode == "batch":
            return run_batch(args)
        else:
            run_single(args, [args.instruction] if mode == "single" else args.turns)
    except text.EmptyTextError:
        print("error: empty instruction (no text after tokenization)", file=sys.stderr)
        return 2
    except _ERRORS as e:
        print(f"error: {' '.join(line.strip() for line in str(e).splitlines())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
