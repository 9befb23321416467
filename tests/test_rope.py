"""2D RoPE: official positions (star style, VAREdit source block and folded raster), cos/sin tables, rotation."""
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import case_params, fixture_dir, load_npz
from transformer_cases import folder_config, template_of
from varedit_jax import rope, schedules


def test_inv_freq_is_the_official_geometric_series():
    freqs = rope.inv_freq(128)
    assert freqs.shape == (32,) and freqs.dtype == np.float32
    np.testing.assert_allclose(freqs, 1.0 / 10000.0 ** (np.arange(0, 64, 2) / 64.0), rtol=1e-6)
    with pytest.raises(ValueError):
        rope.inv_freq(18)


def test_star_positions_scale_onto_the_final_grid_with_half_even_rounding():
    np.testing.assert_array_equal(rope.star_positions((4, 4), (64, 64))[:5], [[0, 0], [0, 16], [0, 32], [0, 48],
                                                                              [16, 0]])
    # 1 * 5/2 = 2.5 rounds to 2 (half to even), 3 * 5/2 = 7.5 to 8
    rows = rope.star_positions((4, 1), (10, 1))[:, 0]
    np.testing.assert_array_equal(rows, [0, 2, 5, 8])
    # the last 1M scale is the identity grid
    np.testing.assert_array_equal(rope.star_positions((3, 2), (3, 2)), [[0, 0], [0, 1], [1, 0], [1, 1], [2, 0], [2, 1]])


def test_infinity_positions_are_the_star_table_prefix():
    schedule = schedules.scale_schedule("1.333", "0.25M")
    pos = rope.official_positions("1.333", schedule, source=False)
    assert pos.shape == (schedules.num_tokens(schedule), 2)
    final = schedules.full_schedule("1.333")[-1]
    offsets = schedules.scale_offsets(schedule)
    for k, grid in enumerate(schedule):
        np.testing.assert_array_equal(pos[offsets[k]:offsets[k + 1]], rope.star_positions(grid, final))


def test_varedit_positions_fold_below_1m_and_offset_the_source_at_1m():
    s256 = schedules.scale_schedule("1.0", "0.06M")
    pos = rope.official_positions("1.0", s256, source=True)
    n = np.arange(256 + 521)
    assert pos.shape == (777, 2)
    np.testing.assert_array_equal(pos, np.stack([64 + n // 64, 64 + n % 64], -1))  # folded raster (note 2.4)
    s1m = schedules.scale_schedule("1.0", "1M")
    pos = rope.official_positions("1.0", s1m, source=True)
    i, j = np.meshgrid(np.arange(64), np.arange(64), indexing="ij")
    np.testing.assert_array_equal(pos[:4096], np.stack([i + 64, j + 64], -1).reshape(-1, 2))
    np.testing.assert_array_equal(pos[4096:], rope.official_positions("1.0", s1m, source=False))


def test_positions_refuse_a_schedule_outside_the_template():
    with pytest.raises(ValueError, match="not a prefix"):
        rope.official_positions("1.0", ((1, 1), (2, 2), (3, 3)), source=False)


def test_apply_rope_is_a_per_pair_complex_rotation():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 5, 3, 16)).astype(np.float32)
    pos = rng.integers(0, 200, size=(5, 2))
    cos, sin = rope.cos_sin(pos, 16)
    got = np.asarray(rope.apply_rope(jnp.asarray(x), cos, sin))
    angles = np.concatenate([pos[:, :1] * rope.inv_freq(16), pos[:, 1:] * rope.inv_freq(16)], -1)
    z = (x[..., 0::2] + 1j * x[..., 1::2]) * np.exp(1j * angles)[None, :, None, :]
    want = np.stack([z.real, z.imag], -1).reshape(x.shape)
    np.testing.assert_allclose(got, want, atol=2e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)


@pytest.mark.parity
def test_infinity_fixture_positions_and_table():
    folder = fixture_dir("infinity_transformer")
    z = load_npz(folder / "io.npz")
    schedule = schedules.as_schedule(z["scale_schedule"])
    template = template_of(folder_config(folder))
    pos = rope.official_positions(template, schedule, source=False)
    np.testing.assert_array_equal(pos, z["rope_pos"])
    head_dim = z["rope_cos_sin_padded"].shape[-1] * 2
    cos, sin = rope.cos_sin(pos, head_dim)
    n = len(pos)
    np.testing.assert_allclose(np.asarray(cos), z["rope_cos_sin_padded"][0, :n], atol=1e-6)
    np.testing.assert_allclose(np.asarray(sin), z["rope_cos_sin_padded"][1, :n], atol=1e-6)


@pytest.mark.parity
@pytest.mark.parametrize("path,name,case", case_params("varedit_transformer"))
def test_varedit_fixture_positions(path, name, case):
    template = template_of(folder_config(path), case)
    for mode, entry in case["modes"].items():
        z = np.load(path / entry["file"])
        if "rope_pos" not in z.files:
            continue
        schedule = schedules.as_schedule(case["scale_schedule"])
        np.testing.assert_array_equal(rope.official_positions(template, schedule, source=True), z["rope_pos"],
                                      err_msg=f"{name}/{mode}")
