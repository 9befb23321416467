"""Reconstructs an image through a BSQ tokenizer: encode, multi-scale quantize, decode.

  python -m varedit_jax.reconstruct --vae WEIGHTS --image IN.png [--resolution 256|512|768|1024] --out RECON.png

--vae: official weights (.safetensors / .pth), an imported checkpoint, or a toy-tokenizer workdir.
The image is resized to cover the pixel size of its nearest aspect template at that resolution (the last grid of
the template's schedule x the tokenizer's stride) with LANCZOS and centre-cropped, as the official data pipeline.
Prints the bits of every scale, the PSNR of the reconstruction against the cropped input, and timings.
"""
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from PIL import Image, UnidentifiedImageError

from varedit_jax import schedules
from varedit_jax.convert import io, vae

_VAE = flags.DEFINE_string("vae", None, "tokenizer weights / checkpoint / workdir")
_IMAGE = flags.DEFINE_string("image", None, "input image")
_RESOLUTION = flags.DEFINE_enum("resolution", "256", [str(r) for r in schedules.RESOLUTION_TO_PN],
                                "size class of the scale schedule")
_OUT = flags.DEFINE_string("out", None, "output PNG of the reconstruction")


def read_image(path) -> Image.Image:
    """An RGB PIL image; raises ValueError for missing / unreadable files."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except FileNotFoundError as e:
        raise ValueError(f"no image at {path}") from e
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from e


def cover_resize_crop(img: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """LANCZOS resize so the image covers (H, W), centre crop; uint8 (H, W, 3) (official `transform`)."""
    tgt_h, tgt_w = size
    width, height = img.size
    if width / height <= tgt_w / tgt_h:
        new_w, new_h = tgt_w, int(tgt_w / (width / height))
    else:
        new_w, new_h = int((width / height) * tgt_h), tgt_h
    arr = np.asarray(img.resize((new_w, new_h), resample=Image.LANCZOS))
    top, left = (arr.shape[0] - tgt_h) // 2, (arr.shape[1] - tgt_w) // 2
    return arr[top:top + tgt_h, left:left + tgt_w]


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[-1, 1] float -> uint8 by ((x + 1) / 2 * 255) truncation, as the official sampler."""
    return ((np.asarray(images, np.float32) + 1.0) / 2.0 * 255.0).astype(np.uint8)


def psnr_uint8(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10.0 * np.log10(255.0 ** 2 / mse))


def target_schedule(img: Image.Image, resolution: int, stride: int) -> tuple[str, schedules.Schedule, tuple[int, int]]:
    """(template, transformer schedule, (H, W) pixels) for an image at a resolution class."""
    width, height = img.size
    template = schedules.nearest_template(height / width)
    sched = schedules.scale_schedule(template, schedules.pn_for_resolution(resolution))
    return template, sched, schedules.pixel_size(sched, stride)


def run(vae_path: str, image_path: str, resolution: int, out_path: str) -> dict:
    """Reconstructs one image and writes it; returns a summary (also printed)."""
    img = read_image(image_path)
    t0 = time.time()
    model = vae.load_tokenizer(vae_path)
    t_load = time.time() - t0
    template, sched, (h, w) = target_schedule(img, resolution, model.stride)
    crop = cover_resize_crop(img, (h, w))
    x = jnp.asarray(crop[None].astype(np.float32) / 127.5 - 1.0)

    def forward(images):
        features = model.encode(images)
        codes = model.quantize(features, sched)
        return features, codes.bits, model.decode(codes.quantized)

    t0 = time.time()
    compiled = jax.jit(forward).lower(x).compile()
    t_compile = time.time() - t0
    t0 = time.time()
    features, bits, recon = jax.block_until_ready(compiled(x))
    t_run = time.time() - t0
    if not np.all(np.isfinite(np.asarray(features))):
        raise ValueError(f"the tokenizer at {vae_path} produced non-finite features (corrupt weights?)")
    recon_u8 = to_uint8(recon)[0]
    Image.fromarray(recon_u8).save(out_path)

    d = model.codebook_dim
    print(f"image {image_path} {img.size[0]}x{img.size[1]} -> template {template}, {w}x{h} px, "
          f"{len(sched)} scales, tokenizer stride {model.stride}, d={d}")
    for k, (b, hw) in enumerate(zip(bits, sched)):
        ones = float(np.mean(np.asarray(b)))
        print(f"  scale {k:2d}: {hw[0]:3d}x{hw[1]:<3d} tokens  {b.size:8d} bits  ({ones:.1%} ones)")
    total = sum(int(b.size) for b in bits)
    value = psnr_uint8(recon_u8, crop)
    print(f"total {total} bits = {total / (h * w):.4f} bits/pixel; PSNR {value:.2f} dB")
    print(f"timing: load {t_load:.2f} s, compile {t_compile:.2f} s, encode+quantize+decode {t_run:.3f} s")
    print(f"wrote {out_path}")
    return {"template": template, "size": (h, w), "bits": total, "psnr": value}


def main(argv) -> int:
    logging.set_verbosity(logging.WARNING)
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    missing = [name for name, flag in (("vae", _VAE), ("image", _IMAGE), ("out", _OUT)) if not flag.value]
    if missing:
        print(f"error: missing required flags: {', '.join('--' + m for m in missing)}", file=sys.stderr)
        return 2
    try:
        run(_VAE.value, _IMAGE.value, int(_RESOLUTION.value), _OUT.value)
    except (ValueError, FileNotFoundError, ImportError, io.StateDictMismatch) as e:
        print(f"error: {' '.join(line.strip() for line in str(e).splitlines())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)))
