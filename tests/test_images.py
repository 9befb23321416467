"""varedit_jax/images.py: the one cover-resize (official geometry, 1-px guard), the value conversions (numpy exact;
jax within one ulp) and PSNR."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from varedit_jax import images


def _rand(h, w, seed):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), np.uint8)


def test_cover_resize_and_centre_crop():
    img = Image.fromarray(_rand(20, 40, 0))  # w/h = 2 > 1: height -> 16, width -> int(2 * 16) = 32, crop x 8..24
    expected = np.asarray(img.resize((32, 16), Image.Resampling.LANCZOS))[:, 8:24]
    np.testing.assert_array_equal(images.cover_resize(img, (16, 16), Image.Resampling.LANCZOS), expected)
    tall = Image.fromarray(_rand(45, 15, 1))  # w/h = 1/3 <= 16/16: width -> 16, height -> int(16 / (1/3)) = 48
    expected = np.asarray(tall.resize((16, 48), Image.Resampling.LANCZOS))[16:32]
    np.testing.assert_array_equal(images.cover_resize(tall, (16, 16), Image.Resampling.LANCZOS), expected)


def test_cover_resize_keeps_the_centre_and_never_falls_short():
    img = np.zeros((40, 120, 3), np.uint8)
    img[:, 40:80] = 200  # centre third bright, sides dark
    out = images.cover_resize(Image.fromarray(img), (40, 40), Image.Resampling.LANCZOS)
    assert out.shape == (40, 40, 3) and out[:, 2:-2].min() >= 190
    np.testing.assert_array_equal(images.cover_resize(Image.fromarray(img), (40, 120), Image.Resampling.LANCZOS), img)
    assert images.cover_resize(Image.fromarray(img), (64, 48), Image.Resampling.LANCZOS).shape == (64, 48, 3)
    # 49 x 3 px to cover 16 x 1: int(1 / (3 / 49) ) would truncate to 16.33 -> 16 rows; a ratio whose float
    # truncation lands one short (the official code then returns a smaller crop) still gives the full size
    for h, w in ((49, 3), (97, 7), (33, 100)):
        assert images.cover_resize(Image.fromarray(_rand(h, w, 2)), (17, 13), Image.Resampling.LANCZOS).shape[:2] \
            == (17, 13)


def test_value_conversions_match_the_official_ones_in_numpy_and_jax():
    x = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, -1)
    want = x.astype(np.float32) / np.float32(255) * np.float32(2) - np.float32(1)  # torchvision to_tensor, 2x - 1
    np.testing.assert_array_equal(images.to_model_range(x), want)
    # under jit XLA may turn the division into a multiplication by 1/255: within one float32 ulp
    np.testing.assert_allclose(np.asarray(jax.jit(images.to_model_range)(jnp.asarray(x))), want, rtol=0, atol=1.2e-7)
    y = np.array([-1.5, -1.0, -0.5, 0.0, 0.999, 1.0, 2.0], np.float32)
    truncated = np.array([0, 0, 63, 127, 254, 255, 255], np.uint8)  # (y + 1) / 2 * 255 truncated, clipped
    np.testing.assert_array_equal(images.to_uint8_official(y), truncated)
    np.testing.assert_array_equal(np.asarray(jax.jit(images.to_uint8_official)(jnp.asarray(y))), truncated)
    np.testing.assert_array_equal(images.to_uint8(np.float32([-1.0, 0.0, 1.0])), [0, 128, 255])  # rounded
    with pytest.raises(ValueError, match="\\[-1, 1\\]"):
        images.to_unit(np.float32([1.5]))


def test_psnr():
    a = np.zeros((4, 4, 3), np.uint8)
    b = np.full((4, 4, 3), 255, np.uint8)
    assert images.psnr(a, b) == 0.0 and images.psnr(a, a) == float("inf")
    assert images.psnr_from_mse(0.01) == pytest.approx(20.0)
    assert images.psnr_from_mse(0.04, data_range=2.0) == pytest.approx(20.0)
    with pytest.raises(ValueError, match="shapes"):
        images.psnr(a, b[:2])
