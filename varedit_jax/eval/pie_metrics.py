"""PIE-Bench's structure and background-preservation metrics (cure-lab/PnPInversion `evaluation/`).

Background preservation, on the UNEDITED region: both images in [0, 1] are multiplied by (1 - mask) (so edited
pixels are zeros in both and still count in every mean, as the reference does); NaN when the unedited region is
empty. Formulas follow torchmetrics with data_range 1 (computed here in float64, torchmetrics in float32):
  MSE  = mean((a - b)^2) over pixels and channels;  PSNR = 10 log10(1 / MSE) (inf for identical images)
  SSIM = mean over channels and the (H - 10) x (W - 10) interior of the SSIM map: 11-tap Gaussian window
         (sigma 1.5, normalised), inputs reflect-padded by 5, c1 = 0.01^2, c2 = 0.03^2, variances clamped at 0.
         The interior crop is what torchmetrics did when PIE-Bench was published (< 1.5); torchmetrics >= 1.5
         averages the whole map (Lightning-AI/torchmetrics#2721): `ssim(..., crop=False)`.
  LPIPS (squeeze) on inputs scaled to [-1, 1], when an `lpips.Lpips` is given.
Structure distance (whole image): DINO ViT-B/8 (`dino.load_dino`) keys of the last block for each image prepared as
the reference does - float 0-255 (NOT /255), resized so the short side is 224 (long side at most 480; bilinear with
antialiasing, PIL's float resampling), ImageNet mean / std applied to those 0-255 values (a quirk kept for
comparable numbers) - then the cosine self-similarity matrix of the (1 + N, C) keys (heads concatenated; eps 1e-8
on the product of norms), and the MSE between the source's and the output's matrices.
CLIP-Whole / CLIP-Edit are in `clip.py`. Aggregation: per-sample rows, column means ignoring NaN (`scores.nanmean`).
Verified: SSIM (2e-6 absolute) and PSNR (1e-4 dB) against torchmetrics (tests/test_eval_pie.py), the structure
preprocessing against torch's antialiased bilinear resize (0.05 on 0-1100 values), the DINO keys against
transformers.ViTModel and the LPIPS against lpips.LPIPS (tests/test_eval_models.py); the reference numbers with the
real DINO / SqueezeNet weights are not reproduced here (no weights can be fetched).
"""
import functools
from typing import Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from varedit_jax import images as imgs
from varedit_jax.eval import scores
from varedit_jax.eval.dino import IMAGENET_MEAN, IMAGENET_STD

SSIM_SIGMA, SSIM_TAPS, SSIM_K1, SSIM_K2 = 1.5, 11, 0.01, 0.03
STRUCTURE_SIZE, STRUCTURE_MAX_SIZE = 224, 480
COLUMNS = ("structure_distance", "psnr", "lpips", "mse", "ssim", "clip_whole", "clip_edit")


# -------------------------------------------------------------------------------------------- pixel metrics
def _pair(a, b) -> tuple[np.ndarray, np.ndarray]:
    a, b = imgs.to_unit(a).astype(np.float64), imgs.to_unit(b).astype(np.float64)
    if a.shape != b.shape or a.ndim != 3:
        raise ValueError(f"expected two (H, W, C) images of one shape, got {a.shape} and {b.shape}")
    return a, b


def _mse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean((a - b) ** 2))


def mse(a, b) -> float:
    """Mean squared error of two images in [0, 1] units."""
    return _mse(*_pair(a, b))


def psnr(a, b) -> float:
    """10 log10(1 / MSE) (data range 1); inf for identical images."""
    return imgs.psnr_from_mse(_mse(*_pair(a, b)))


@functools.lru_cache(maxsize=None)
def gaussian_window(taps: int = SSIM_TAPS, sigma: float = SSIM_SIGMA) -> np.ndarray:
    """(taps,) normalised Gaussian over offsets -(taps-1)/2 .. (taps-1)/2."""
    x = np.arange((1 - taps) / 2, (1 + taps) / 2, 1.0)
    g = np.exp(-0.5 * (x / sigma) ** 2)
    return g / g.sum()


def _filter_valid(x: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Separable 'valid' correlation of x (H, W, C) with the 1-D window g along H then W."""
    n = len(g)
    h, w = x.shape[0] - n + 1, x.shape[1] - n + 1
    rows = sum(g[i] * x[i:i + h] for i in range(n))
    return sum(g[i] * rows[:, i:i + w] for i in range(n))


def ssim(a, b, crop: bool = True) -> float:
    """SSIM as torchmetrics `StructuralSimilarityIndexMeasure(data_range=1.0)` (see the module docstring)."""
    return _ssim(*_pair(a, b), crop=crop)


def _ssim(a: np.ndarray, b: np.ndarray, crop: bool = True) -> float:
    pad = (SSIM_TAPS - 1) // 2
    if min(a.shape[:2]) <= 2 * pad:
        raise ValueError(f"SSIM needs images larger than {2 * pad}x{2 * pad}, got {a.shape[:2]}")
    a, b = (np.pad(x, ((pad, pad), (pad, pad), (0, 0)), mode="reflect") for x in (a, b))
    g = gaussian_window()
    mu_a, mu_b = _filter_valid(a, g), _filter_valid(b, g)
    var_a = np.maximum(_filter_valid(a * a, g) - mu_a ** 2, 0.0)
    var_b = np.maximum(_filter_valid(b * b, g) - mu_b ** 2, 0.0)
    cov = _filter_valid(a * b, g) - mu_a * mu_b
    c1, c2 = SSIM_K1 ** 2, SSIM_K2 ** 2
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return float((ssim_map[pad:-pad, pad:-pad] if crop else ssim_map).mean())


def background_preservation(source, output, mask, lpips=None) -> dict[str, float]:
    """psnr, mse, ssim (and lpips given an `lpips.Lpips`) on the unedited region; NaN when it is empty.

    source, output: (H, W, 3) uint8 or float [-1, 1]; mask (H, W), 1 = edit region.
    """
    a, b = _pair(source, output)
    keep = 1.0 - imgs.check_mask(mask, a.shape[:2]).astype(np.float64)
    if not keep.any():
        return dict(psnr=np.nan, mse=np.nan, ssim=np.nan, lpips=np.nan)
    a, b = a * keep[..., None], b * keep[..., None]
    return dict(psnr=imgs.psnr_from_mse(_mse(a, b)), mse=_mse(a, b), ssim=_ssim(a, b),
                lpips=float(lpips(a * 2 - 1, b * 2 - 1)) if lpips is not None else np.nan)


# -------------------------------------------------------------------------------------- structure distance
def structure_size(h: int, w: int) -> tuple[int, int]:
    """torchvision Resize(224, max_size=480) output size (h, w)."""
    short, long = min(h, w), max(h, w)
    new_short, new_long = STRUCTURE_SIZE, int(STRUCTURE_SIZE * long / short)
    if new_long > STRUCTURE_MAX_SIZE:
        new_short, new_long = int(STRUCTURE_MAX_SIZE * new_short / new_long), STRUCTURE_MAX_SIZE
    return (new_short, new_long) if h <= w else (new_long, new_short)


def _resize_plane(plane: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Antialiased bilinear resize of one float32 (H, W) plane to (h, w) (PIL mode "F")."""
    return np.asarray(Image.fromarray(np.ascontiguousarray(plane, np.float32)).resize(
        (size[1], size[0]), Image.Resampling.BILINEAR))


def structure_preprocess(image) -> np.ndarray:
    """(H, W, 3) image -> float32 (h, w, 3) DINO input with the reference's 0-255 normalisation quirk."""
    x = imgs.to_uint8(image).astype(np.float32)
    size = structure_size(*x.shape[:2])
    if size != x.shape[:2]:
        x = np.stack([_resize_plane(x[..., c], size) for c in range(x.shape[-1])], axis=-1)
    return ((x - np.asarray(IMAGENET_MEAN, np.float32)) / np.asarray(IMAGENET_STD, np.float32)).astype(np.float32)


def self_similarity(keys: np.ndarray, eps: float = 1e-8) -> np.ndarray:
    """(T, C) -> (T, T) cosine similarities, the norm product clamped below at eps."""
    k = np.asarray(keys, np.float64)
    norms = np.linalg.norm(k, axis=-1, keepdims=True)
    return (k @ k.T) / np.maximum(norms @ norms.T, eps)


class StructureDistance:
    """`distance(source, output)` with a DINO `vit.VisionTransformer` (keys of block `layer`, default the last)."""

    def __init__(self, dino, layer: int | None = None):
        self.dino = dino
        self.layer = dino.encoder.num_layers - 1 if layer is None else layer
        self._keys = nnx.jit(lambda m, x: m.keys(x, self.layer))

    def keys(self, image) -> np.ndarray:
        return np.asarray(self._keys(self.dino, jnp.asarray(structure_preprocess(image))[None]))[0]

    def __call__(self, source, output) -> float:
        if imgs.to_uint8(source).shape != imgs.to_uint8(output).shape:
            raise ValueError("source and output must have the same shape")
        a, b = self_similarity(self.keys(source)), self_similarity(self.keys(output))
        return float(np.mean((a - b) ** 2))


# ------------------------------------------------------------------------------------------------- per sample
def evaluate(sources: Sequence, outputs: Sequence, masks: Sequence, *, structure: StructureDistance | None = None,
             lpips=None, clip=None, edit_prompts: Sequence[str] | None = None) -> list[dict[str, float]]:
    """Per-sample PIE-Bench rows with the keys `COLUMNS`; metrics whose model is not given are NaN.

    sources / outputs: images of equal shapes (the output resized to the source beforehand); masks (H, W) with
    1 = edit region; `clip` (a `clip.Clip`, ViT-L/14 for PIE-Bench) needs `edit_prompts`.
    """
    if not len(sources) == len(outputs) == len(masks):
        raise ValueError("sources, outputs and masks must have the same length")
    rows = []
    for src, out, mask in zip(sources, outputs, masks):
        row = dict.fromkeys(COLUMNS, np.nan)
        row.update(background_preservation(src, out, mask, lpips))
        if structure is not None:
            row["structure_distance"] = structure(src, out)
        rows.append(row)
    if clip is not None:
        if edit_prompts is None or len(edit_prompts) != len(outputs):
            raise ValueError("CLIP metrics need one edit prompt per output")
        from varedit_jax.eval import clip as clip_lib  # only with a CLIP given: keeps `regex` optional here
        for row, whole, edit in zip(rows, *clip_lib.pie_bench_metrics(clip, outputs, edit_prompts, masks).values()):
            row.update(clip_whole=float(whole), clip_edit=float(edit))
    return rows


def summarize_pie(rows: Sequence[dict[str, float]]) -> dict[str, float | int]:
    """Column means ignoring NaN, with `n_<column>` = how many samples each mean covers."""
    out = {}
    for column in COLUMNS:
        out[column], out[f"n_{column}"] = scores.nanmean([r[column] for r in rows])
    return out
