"""Exact editing metrics for the toy task, where the true target and the exact edit mask are known.

Per sample, on a 0-10 scale like the paper's GPT scores:
  success      = 10 x (fraction of edit-mask pixels where the output matches the TARGET)
  preservation = 10 x (fraction of pixels outside the mask where the output matches the SOURCE)
  balance      = harmonic mean of the two, 0 when either is 0 (`scores.balance`, the paper's GPT-Bal. formula)
A pixel "matches" when every RGB channel is within `tolerance` of the reference, in [0, 1] units (default 0.125, i.e.
32 of 255 levels: far below the distance between any two toy colours or greys, above resampling / tokenizer blur).
The scores are monotone in the per-pixel error and exactly 10 for a perfect output. Toy targets equal their sources
outside the mask, so preservation is also fidelity to the target there. Beside them, mae_edit / mae_keep = mean
absolute error (over pixels and channels, [0, 1] units) inside the mask vs the target / outside it vs the source.
A sample whose mask is empty (or full) has an undefined success (preservation): NaN, left out of the means and
counted (`scores.summarize`); samples with has_mask False are undefined throughout.

Reference rows: `copy_source` (output = source: perfect preservation, success only where the edit leaves pixels
unchanged) and `oracle` (output = the tokenizer's reconstruction of the true target: the bound a model that edits
perfectly in token space reaches), both via `toy_scores`.
"""
from typing import Callable, Iterable

import numpy as np

from varedit_jax import images as imgs
from varedit_jax.eval import scores

TOLERANCE = 0.125
COLUMNS = ("success", "preservation", "balance", "mae_edit", "mae_keep")


def _batch(x, name: str) -> np.ndarray:
    x = imgs.to_unit(x)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"{name} must be (B, H, W, 3), got {x.shape}")
    return x


def region_mean(values: np.ndarray, region: np.ndarray) -> np.ndarray:
    """values, region (B, H, W) -> (B,) mean of values over each sample's region, NaN where the region is empty."""
    count = region.sum(axis=(1, 2))
    total = np.where(region, values, 0.0).sum(axis=(1, 2), dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def toy_scores(source, target, output, mask, *, has_mask=None,
               tolerance: float = TOLERANCE) -> dict[str, np.ndarray]:
    """Per-sample scores (each (B,) float64, keys `COLUMNS`) of outputs against the known targets.

    source, target, output: (B, H, W, 3) uint8 or float [-1, 1]; mask (B, H, W), 1 = edited pixel; has_mask (B,)
    bool (as `varedit_jax.data` batches), False marks samples without a mask.
    """
    source, target, output = _batch(source, "source"), _batch(target, "target"), _batch(output, "output")
    if not source.shape == target.shape == output.shape:
        raise ValueError(f"source {source.shape}, target {target.shape} and output {output.shape} differ in shape")
    edit = np.asarray(mask).astype(bool)
    if edit.shape != source.shape[:3]:
        raise ValueError(f"mask shape {edit.shape} does not match the images' {source.shape[:3]}")
    if not tolerance > 0:
        raise ValueError(f"tolerance must be > 0, got {tolerance}")
    err_t, err_s = np.abs(output - target), np.abs(output - source)
    out = dict(success=10.0 * region_mean(err_t.max(-1) <= tolerance, edit),
               preservation=10.0 * region_mean(err_s.max(-1) <= tolerance, ~edit),
               mae_edit=region_mean(err_t.mean(-1), edit), mae_keep=region_mean(err_s.mean(-1), ~edit))
    if has_mask is not None:
        missing = ~np.asarray(has_mask, bool).reshape(-1)
        out = {k: np.where(missing, np.nan, v) for k, v in out.items()}
    out["balance"] = scores.balance(out["success"], out["preservation"])
    return {k: out[k] for k in COLUMNS}


def concat(batches: Iterable[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Joins per-sample score dicts of several batches."""
    batches = list(batches)
    if not batches:
        return {k: np.zeros((0,)) for k in COLUMNS}
    return {k: np.concatenate([b[k] for b in batches]) for k in COLUMNS}


def summarize_toy(per_sample: dict[str, np.ndarray]) -> dict[str, float | int]:
    """Dataset row: success, preservation, balance (mean of per-sample), balance_of_means, n, n_undefined,
    mae_edit, mae_keep (means over the same samples)."""
    row = scores.summarize(per_sample["success"], per_sample["preservation"])
    ok = ~(np.isnan(per_sample["success"]) | np.isnan(per_sample["preservation"]))
    for k in ("mae_edit", "mae_keep"):
        row[k] = float(per_sample[k][ok].mean()) if ok.any() else float("nan")
    return row


def reference_scores(source, target, mask, *, reconstruct: Callable[[np.ndarray], np.ndarray] | None = None,
                     has_mask=None, tolerance: float = TOLERANCE) -> dict[str, dict[str, np.ndarray]]:
    """Per-sample scores of the reference rows: "copy_source" and, given `reconstruct(images) -> images` (the
    tokenizer's encode-quantize-decode, same layout and value convention in and out), "oracle"; a float
    reconstruction is clipped to [-1, 1] first, as images written by the sampler are."""
    rows = {"copy_source": toy_scores(source, target, source, mask, has_mask=has_mask, tolerance=tolerance)}
    if reconstruct is not None:
        recon = np.asarray(reconstruct(target))
        recon = recon if recon.dtype == np.uint8 else np.clip(recon, -1.0, 1.0)  # decoders overshoot slightly
        rows["oracle"] = toy_scores(source, target, recon, mask, has_mask=has_mask, tolerance=tolerance)
    return rows
