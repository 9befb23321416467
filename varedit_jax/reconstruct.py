"""Reconstructs an image through the image tokenizer: encode, multi-scale quantize, decode.

  python -m varedit_jax.reconstruct --image_tokenizer WEIGHTS --image IN.png [--resolution 256|512|768|1024] \
      --out RECON.png

--image_tokenizer: official weights (.safetensors / .pth), an imported checkpoint, or a toy-tokenizer workdir.
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
from PIL import Image

from varedit_jax import images, loading, schedules, state_dicts

_IMAGE_TOKENIZER = flags.DEFINE_string("image_tokenizer", None, "image tokenizer weights / checkpoint / workdir")
_IMAGE = flags.DEFINE_string("image", None, "input image")
_RESOLUTION = flags.DEFINE_enum("resolution", "256", [str(r) for r in schedules.RESOLUTION_TO_PN],
                                "size class of the scale schedule")
_OUT = flags.DEFINE_string("out", None, "output PNG of the reconstruction")



def target_schedule(img: Image.Image, resolution: int, stride: int) -> tuple[str, schedules.Schedule, tuple[int, int]]:
    """(template, transformer schedule, (H, W) pixels) for an image at a resolution class."""
    width, height = img.size
    template = schedules.nearest_template(height / width)
    sched = schedules.scale_schedule(template, schedules.pn_for_resolution(resolution))
    return template, sched, schedules.pixel_size(sched, stride)


def run(tokenizer_path: str, image_path: str, resolution: int, out_path: str) -> dict:
    """Reconstructs one image and writes it; returns a summary (also printed)."""
    img = Image.fromarray(images.read(image_path))
    t0 = time.time()
    model = loading.load_image_tokenizer(tokenizer_path)
    t_load = time.time() - t0
    template, sched, (h, w) = target_schedule(img, resolution, model.stride)
    crop = images.cover_resize(img, (h, w), Image.Resampling.LANCZOS)
    x = jnp.asarray(images.to_model_range(crop[None]))

    def forward(pixels):
        features = model.encode(pixels)
        codes = model.quantize(features, sched)
        return features, codes.bits, model.decode(codes.quantized)

    t0 = time.time()
    compiled = jax.jit(forward).lower(x).compile()
    t_compile = time.time() - t0
    t0 = time.time()
    features, bits, recon = jax.block_until_ready(compiled(x))
    t_run = time.time() - t0
    if not np.all(np.isfinite(np.asarray(features))):
        raise ValueError(f"the image tokenizer at {tokenizer_path} produced non-finite features (corrupt weights?)")
    recon_u8 = np.asarray(images.to_uint8_official(recon))[0]
    Image.fromarray(recon_u8).save(out_path)

    d = model.codebook_dim
    print(f"image {image_path} {img.size[0]}x{img.size[1]} -> template {template}, {w}x{h} px, "
          f"{len(sched)} scales, tokenizer stride {model.stride}, d={d}")
    for k, (b, hw) in enumerate(zip(bits, sched)):
        ones = float(np.mean(np.asarray(b)))
        print(f"  scale {k:2d}: {hw[0]:3d}x{hw[1]:<3d} tokens  {b.size:8d} bits  ({ones:.1%} ones)")
    total = sum(int(b.size) for b in bits)
    value = images.psnr(recon_u8, crop)
    print(f"total {total} bits = {total / (h * w):.4f} bits/pixel; PSNR {value:.2f} dB")
    print(f"timing: load {t_load:.2f} s, compile {t_compile:.2f} s, encode+quantize+decode {t_run:.3f} s")
    print(f"wrote {out_path}")
    return {"template": template, "size": (h, w), "bits": total, "psnr": value}


def main(argv) -> int:
    logging.set_verbosity(logging.WARNING)
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    missing = [name for name, flag in (("image_tokenizer", _IMAGE_TOKENIZER), ("image", _IMAGE), ("out", _OUT)) if not flag.value]
    if missing:
        print(f"error: missing required flags: {', '.join('--' + m for m in missing)}", file=sys.stderr)
        return 2
    try:
        run(_IMAGE_TOKENIZER.value, _IMAGE.value, int(_RESOLUTION.value), _OUT.value)
    except (ValueError, FileNotFoundError, ImportError, state_dicts.StateDictMismatch) as e:
        print(f"error: {' '.join(line.strip() for line in str(e).splitlines())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)))
