"""Resampling equals PyTorch's F.interpolate / pixel_(un)shuffle (the official code's ops)."""
import numpy as np
import pytest

from varedit_jax import resample

SIZES = [((16, 16), (1, 1)), ((16, 16), (6, 6)), ((16, 12), (12, 9)), ((64, 64), (40, 40)), ((7, 5), (16, 12)),
         ((16, 12), (16, 12)), ((3, 2), (64, 48))]


def _torch():
    return pytest.importorskip("torch", reason="the torch extra is needed to compare with F.interpolate")


@pytest.mark.parametrize("src,dst", SIZES)
@pytest.mark.parametrize("mode", ["area", "bilinear"])
def test_matches_torch_interpolate(src, dst, mode):
    torch = _torch()
    x = np.random.default_rng(0).standard_normal((2, *src, 5)).astype(np.float32)
    fn = resample.area_resize if mode == "area" else resample.bilinear_resize
    got = np.asarray(fn(x, dst))
    xt = torch.from_numpy(x).permute(0, 3, 1, 2)[:, :, None]  # 5-D (B, C, 1, H, W) as the official code
    kw = {"mode": "area"} if mode == "area" else {"mode": "trilinear", "align_corners": False}
    want = torch.nn.functional.interpolate(xt, size=(1, *dst), **kw)[:, :, 0].permute(0, 2, 3, 1).numpy()
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=2e-6, rtol=0)


def test_area_bins_overlap_for_non_integer_ratio():
    m = resample.area_matrix(16, 6)
    assert m.shape == (6, 16)
    np.testing.assert_allclose(m.sum(1), 1.0, rtol=1e-6)
    assert (m[0] > 0).sum() == 3 and (m[1] > 0).sum() == 4  # rows 0..2 and 2..5: row 2 is shared
    assert m[0, 2] > 0 and m[1, 2] > 0


def test_pixel_unshuffle_matches_torch_and_inverts():
    torch = _torch()
    x = np.random.default_rng(1).standard_normal((2, 8, 6, 3)).astype(np.float32)
    got = np.asarray(resample.pixel_unshuffle(x, 2))
    want = torch.nn.functional.pixel_unshuffle(torch.from_numpy(x).permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1)
    np.testing.assert_array_equal(got, want.numpy())
    np.testing.assert_array_equal(np.asarray(resample.pixel_shuffle(got, 2)), x)
