"""Held-out pairs with known targets and edit masks (the toy task) edited by a trained model and scored exactly
(`eval.toy_metrics`: success, preservation, balance on 0-10), beside the reference rows: copy-the-source and the
oracle (the image tokenizer's reconstruction of the true target, the bound of a perfect token-space editor).

What `ablate` tabulates per run and what `train` prints at the end of a run on the toy task (`toy_eval_pairs`).
"""
import time

import jax
import numpy as np

from data_pipelines import records
from varedit_jax import editor, images, sampler, schedules
from varedit_jax.eval import toy_metrics

COLUMNS = ("success", "preservation", "balance")


def eval_pairs(paths, n: int, *, allow_fewer: bool = False) -> dict:
    """The first `n` pairs of the record datasets `paths` as arrays: source, target (N, H, W, 3) uint8, mask
    (N, H, W) uint8, has_mask (N,) bool, instruction (list). Fewer than `n` is a ValueError unless `allow_fewer`."""
    pairs = []
    for rec in records.iter_records(list(paths)):
        pairs.append(rec)
        if len(pairs) == n:
            break
    if len(pairs) < n and not (allow_fewer and pairs):
        raise ValueError(f"eval_data has {len(pairs)} pairs, {n} requested")
    src = np.stack([images.decode(p["source"]) for p in pairs])
    tgt = np.stack([images.decode(p["target"]) for p in pairs])
    mask = np.stack([records.decode_mask(p["mask"]) if p.get("mask") is not None else np.zeros(src.shape[1:3], np.uint8)
                     for p in pairs])
    has = np.array([p.get("mask") is not None for p in pairs])
    return dict(source=src, target=tgt, mask=mask, has_mask=has, instruction=[p["instruction"] for p in pairs])


def edit_and_score(edit: editor.Editor, pairs: dict, options: sampler.SamplingOptions) -> tuple[dict, np.ndarray]:
    """Edits every pair (training preprocessing) and scores the outputs: (row = `toy_metrics.summarize_toy` +
    s_per_edit (compile excluded) + n, outputs (N, H, W, 3) uint8). Collective: every process edits."""
    n = len(pairs["instruction"])
    warm = min(edit.batch_size, n)
    edit.edit(pairs["source"][:warm], pairs["instruction"][:warm], options, preprocess="train")  # the compile
    t0 = time.perf_counter()
    outputs = np.stack(edit.edit(pairs["source"], pairs["instruction"], options, preprocess="train"))
    seconds = (time.perf_counter() - t0) / n
    row = toy_metrics.summarize_toy(toy_metrics.toy_scores(pairs["source"], pairs["target"], outputs,
                                                           pairs["mask"], has_mask=pairs["has_mask"]))
    return dict(row, s_per_edit=seconds, n=n), outputs


def reference_rows(image_tok, pn: str, pairs: dict) -> list[dict]:
    """The copy-the-source and oracle rows ({"conditioning": name, scores...}) of `pairs` with `image_tok`."""
    h, w = pairs["source"].shape[1:3]
    sched = schedules.scale_schedule(schedules.nearest_template(h / w), pn)

    @jax.jit
    def roundtrip(x):
        return image_tok.decode(image_tok.quantize(image_tok.encode(images.to_model_range(x)), sched).quantized)

    refs = toy_metrics.reference_scores(pairs["source"], pairs["target"], pairs["mask"],
                                        reconstruct=lambda x: np.asarray(roundtrip(x)), has_mask=pairs["has_mask"])
    return [dict(conditioning=name, **toy_metrics.summarize_toy(per)) for name, per in refs.items()]
