"""Image conventions of the evaluation code.

An image is uint8 in [0, 255] or floating point in [-1, 1] (the project's model convention), HWC or NHWC, RGB.
`to_unit` maps either to float32 [0, 1]; `to_uint8` maps either to uint8 (floats rounded to nearest). A float image
with NaN or values outside [-1, 1] (beyond 1e-3) raises ValueError rather than being clipped silently.
Masks are (H, W) (or (B, H, W)) with 1 / True = edited pixel.
"""
import hashlib
import io
import os

import numpy as np
from PIL import Image, UnidentifiedImageError

_TOLERANCE = 1e-3


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


def decode(data: bytes) -> np.ndarray:
    """Encoded image bytes -> uint8 (H, W, 3) RGB; raises ValueError when they do not decode."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"cannot decode image: {e}") from e


def read(path) -> np.ndarray:
    """An image file -> uint8 (H, W, 3) RGB; raises FileNotFoundError / ValueError."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no image at {path}")
    with open(path, "rb") as f:
        data = f.read()
    try:
        return decode(data)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e


def png_bytes(image) -> bytes:
    """Any image (see the module docstring) -> PNG bytes (lossless, deterministic for equal pixels)."""
    buf = io.BytesIO()
    Image.fromarray(to_uint8(image)).save(buf, format="PNG")
    return buf.getvalue()


def pixel_hash(image) -> str:
    """sha256 of the uint8 pixels and shape: equal for equal images whatever their file encoding."""
    x = np.ascontiguousarray(to_uint8(image))
    return hashlib.sha256(repr(x.shape).encode() + x.tobytes()).hexdigest()
