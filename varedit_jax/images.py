"""Images: the one home of resizing, value conversions, PSNR and file I/O.

An image is uint8 in [0, 255] or floating point in [-1, 1] (the model convention), HWC or NHWC, RGB.
  to_model_range   uint8 -> float32 [-1, 1] exactly as the official torchvision `to_tensor(x)` then `x + x - 1`
  to_uint8_official  [-1, 1] -> uint8 by truncation of (x + 1) / 2 * 255 after clipping (official `gen_one_img`)
                   Both work on numpy and on jax arrays (inside jit XLA may divide by 255 as a multiplication:
                   within one float32 ulp of the numpy values), returning the same kind.
  to_unit          uint8 or float [-1, 1] -> float32 [0, 1]; to_uint8: the same -> uint8 rounded to nearest (evaluation).
                   A float image with NaN or values outside [-1, 1] (beyond 1e-3) raises ValueError rather than
                   being clipped silently.
  cover_resize     PIL resize to cover (H, W) keeping the aspect, then centre crop (the official training transform)
  psnr / psnr_from_mse  10 log10(data_range^2 / MSE), inf for identical images
  decode / read    encoded bytes / an image file (local or gs://) -> uint8 RGB (`data_pipelines.records`' readers)
Masks are (H, W) (or (B, H, W)) with 1 / True = edited pixel.
"""
import hashlib
import io

import numpy as np
from PIL import Image

from data_pipelines.records import decode_image as decode, read_image as read  # noqa: F401 (this module's API)


_TOLERANCE = 1e-3


def to_model_range(images):
    """uint8 -> float32 in [-1, 1] as torchvision `to_tensor(x)` then `x + x - 1` (numpy or jax arrays)."""
    x = images.astype(np.float32) / np.float32(255)
    return x + x - np.float32(1)


def to_uint8_official(images):
    """[-1, 1] -> uint8 by truncation of (x + 1) / 2 * 255 after clipping to [0, 255] (numpy or jax arrays)."""
    return ((images.astype(np.float32) + 1.0) / 2.0 * 255.0).clip(0.0, 255.0).astype(np.uint8)


def cover_resize(img: Image.Image, size: tuple[int, int], resample: int) -> np.ndarray:
    """(H, W[, C]) uint8: `img` resized to cover `size` = (H, W) keeping its aspect ratio, then centre-cropped."""
    tgt_h, tgt_w = size
    width, height = img.size
    if width / height <= tgt_w / tgt_h:
        resized_w, resized_h = tgt_w, int(tgt_w / (width / height))
    else:
        resized_h, resized_w = tgt_h, int((width / height) * tgt_h)
    # Float truncation can land one pixel short of the template (the official code then returns a smaller crop).
    resized_h, resized_w = max(resized_h, tgt_h), max(resized_w, tgt_w)
    arr = np.asarray(img.resize((resized_w, resized_h), resample=resample))
    y, x = (resized_h - tgt_h) // 2, (resized_w - tgt_w) // 2
    return arr[y:y + tgt_h, x:x + tgt_w]


def psnr_from_mse(mse: float, data_range: float = 1.0) -> float:
    """10 log10(data_range^2 / mse) in dB; inf for mse 0."""
    return float("inf") if mse == 0 else float(10.0 * np.log10(data_range ** 2 / mse))


def psnr(a, b) -> float:
    """PSNR (dB, data range 1) of two images of one shape (uint8 or [-1, 1]); inf when they are identical."""
    a, b = to_unit(a).astype(np.float64), to_unit(b).astype(np.float64)
    if a.shape != b.shape:
        raise ValueError(f"images of different shapes {a.shape} and {b.shape}")
    return psnr_from_mse(float(np.mean((a - b) ** 2)))


def to_unit(images) -> np.ndarray:
    """uint8 [0, 255] or float [-1, 1] -> float32 [0, 1], same shape."""
    x = np.asarray(images)
    if x.dtype == np.uint8:
        return x.astype(np.float32) / 255.0
    if x.dtype.name == "bfloat16":  # ml_dtypes, e.g. a bf16 sampler output
        x = x.astype(np.float32)
    if not np.issubdtype(x.dtype, np.floating):
        raise TypeError(f"images must be uint8 or floating point in [-1, 1], got dtype {x.dtype}")
    if not np.isfinite(x).all():
        raise ValueError("images contain NaN or inf")
    if x.size and (x.min() < -1 - _TOLERANCE or x.max() > 1 + _TOLERANCE):
        raise ValueError(f"float images must lie in [-1, 1], got values in [{x.min():.4g}, {x.max():.4g}]")
    return np.clip((x.astype(np.float32) + 1.0) / 2.0, 0.0, 1.0)


def to_uint8(images) -> np.ndarray:
    """uint8 passes through; float [-1, 1] -> round((x + 1) / 2 * 255)."""
    x = np.asarray(images)
    return x if x.dtype == np.uint8 else np.round(to_unit(x) * 255.0).astype(np.uint8)


def check_mask(mask, shape: tuple[int, int]) -> np.ndarray:
    """A mask as bool (H, W); raises ValueError when its shape differs from the image's (H, W)."""
    m = np.asarray(mask)
    if m.shape != tuple(shape):
        raise ValueError(f"mask shape {m.shape} does not match the image's {tuple(shape)}")
    return m.astype(bool)


def png_bytes(image) -> bytes:
    """Any image (see the module docstring) -> PNG bytes (lossless, deterministic for equal pixels)."""
    buf = io.BytesIO()
    Image.fromarray(to_uint8(image)).save(buf, format="PNG")
    return buf.getvalue()


def pixel_hash(image) -> str:
    """sha256 of the uint8 pixels and shape: equal for equal images whatever their file encoding."""
    x = np.ascontiguousarray(to_uint8(image))
    return hashlib.sha256(repr(x.shape).encode() + x.tobytes()).hexdigest()
