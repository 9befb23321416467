"""Source conditioning: parity of every VAREdit fixture case x mode (logits, loss, block outputs, positions, masks),
the input lengths of the paper, the `full` layout and SAR's pooling."""
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import case_params, load_npz
from transformer_cases import folder_config, kind_of, layout_of, load_model, template_of
from varedit_jax import conditioning, resample, rope, schedules, transformer

ATOL = 1e-4
LONG = 4096  # sequences above this many tokens run scale by scale (KV cache) instead of one teacher-forcing pass


def _case_arrays(path, case) -> dict[str, dict[str, np.ndarray]]:
    """Arrays of every mode file of a case; inputs missing from a mode's file come from the case's other files."""
    files = {mode: load_npz(path / entry["file"]) for mode, entry in case["modes"].items()}
    shared = {}
    for arrays in files.values():
        for key, value in arrays.items():
            shared.setdefault(key, value)
    return {mode: {**shared, **arrays} for mode, arrays in files.items()}


def _forward(model, z, layout):
    b, _, d = z["source_x_BLC"].shape
    source = z["source_x_BLC"].reshape((b,) + layout.source_grid + (d,))  # the official model input, as a grid
    drop = jnp.zeros(b, bool)
    if layout.length <= LONG:
        return nnx.jit(lambda m: m(z["text_padded"], z["text_mask"], drop, source, z["target_x_BLC_wo_prefix"],
                                   layout, return_blocks=True))(model)
    state = nnx.jit(lambda m: m.init_decode(z["text_padded"], z["text_mask"], drop, source, layout))(model)
    offsets = schedules.scale_offsets(layout.schedule)
    logits = []
    for k in range(len(layout.schedule)):
        tokens = None if k == 0 else z["target_x_BLC_wo_prefix"][:, offsets[k] - 1:offsets[k + 1] - 1]
        out, state = nnx.jit(lambda m, s, t: m.decode_scale(s, layout, k, t))(model, state, tokens)
        logits.append(out)
    return jnp.concatenate(logits, 1), None


def _cases():
    params = []
    for p in case_params("varedit_transformer"):
        path, name, case = p.values
        marks = list(p.marks)
        if case is not None and case["L_total"] > LONG:
            marks.append(pytest.mark.slow)
        params.append(pytest.param(path, name, case, id=p.id, marks=marks))
    return params


@pytest.mark.parity
@pytest.mark.parametrize("path,name,case", _cases())
def test_varedit_case_all_modes(path, name, case):
    folder_cfg = folder_config(path)
    template = template_of(folder_cfg, case)
    _, model = load_model(str(path / "weights.safetensors"), kind_of(path))
    for mode, z in _case_arrays(path, case).items():
        layout = layout_of(mode, z["scale_schedule"], template)
        assert (layout.n_source, layout.length) == (case["n_src"], case["L_total"]), mode
        np.testing.assert_array_equal(layout.positions, z["rope_pos"], err_msg=mode)
        kv_len = z["flex_kv_visible_len_padded"][:layout.length]
        last_visible = np.array([np.flatnonzero(layout.mask.table[s][layout.segment])[-1] + 1 for s in layout.segment])
        np.testing.assert_array_equal(last_visible, kv_len, err_msg=mode)
        if "flex_mask_visible_padded" in z:
            n = layout.length
            np.testing.assert_array_equal(layout.mask.dense(), z["flex_mask_visible_padded"][:n, :n], err_msg=mode)
        logits, blocks = _forward(model, z, layout)
        err = float(np.abs(np.asarray(logits) - z["logits"]).max())
        assert err <= ATOL, f"{name}/{mode}: logits max |diff| {err:.3g}"
        loss, per_bit = transformer.bitwise_loss(logits, z["gt_bits"], layout.schedule)
        np.testing.assert_allclose(np.asarray(per_bit), z["loss_per_bit"], atol=ATOL, err_msg=mode)
        np.testing.assert_allclose(float(loss), float(z["loss_mean"]), rtol=1e-5, err_msg=mode)
        mode_file = load_npz(path / case["modes"][mode]["file"])
        for i in range(model.cfg.depth):
            if blocks is not None and f"block{i}_out_padded" in mode_file:
                got, want = np.asarray(blocks[i]), mode_file[f"block{i}_out_padded"][:, :layout.length]
                assert float(np.abs(got - want).max()) <= ATOL, f"{name}/{mode}: block {i}"


def test_input_lengths_of_the_paper():
    schedule = schedules.scale_schedule("1.0", "0.06M")
    lengths = {mode: conditioning.sequence_layout(mode, schedule).length for mode in ("full", "finest", "sar")}
    assert lengths == {"full": 1042, "finest": 777, "sar": 777}
    assert conditioning.sequence_layout("none", schedule).length == 521
    for template in ("1.333", "0.5"):
        schedule = schedules.scale_schedule(template, "0.25M")
        n = schedules.num_tokens(schedule)
        h, w = schedule[-1]
        assert conditioning.sequence_layout("full", schedule).length == 2 * n
        assert conditioning.sequence_layout("sar", schedule).length == n + h * w


def _segment_of(layout, kind: str, k: int) -> int:
    return (len(layout.source_scales) + k) if kind == "tgt" else k


def test_full_layout_mask_levels_and_positions():
    schedule = schedules.scale_schedule("1.333", "0.06M")
    layout = conditioning.sequence_layout("full", schedule)
    k_scales = len(schedule)
    assert layout.source_scales == schedule and layout.n_pooled == 0
    dense = layout.mask.dense()
    src_scale = np.repeat(np.arange(k_scales), [h * w for h, w in schedule])
    scale = np.concatenate([src_scale, src_scale])
    is_src = np.arange(layout.length) < layout.n_source
    for q in range(0, layout.length, 7):
        for kv in range(0, layout.length, 5):
            if is_src[q]:
                want = is_src[kv] and scale[kv] <= scale[q]
            else:
                want = scale[kv] <= scale[q]
            assert dense[q, kv] == want, (q, kv)
    np.testing.assert_array_equal(layout.first_mask.dense(), dense)  # no SAR: block 0 as the others
    np.testing.assert_array_equal(layout.level, scale)
    offset = np.array(rope.final_grid("1.333"))
    targets = rope.target_positions("1.333", schedule)
    np.testing.assert_array_equal(layout.positions[:layout.n_source], targets + offset)
    np.testing.assert_array_equal(layout.positions[layout.n_source:], targets)


def test_finest_and_sar_masks():
    schedule = schedules.scale_schedule("1.0", "0.06M")
    finest = conditioning.sequence_layout("finest", schedule)
    sar = conditioning.sequence_layout("sar", schedule)
    n_src, k_scales = finest.n_source, len(schedule)
    np.testing.assert_array_equal(finest.first_mask.dense(), finest.mask.dense())
    np.testing.assert_array_equal(sar.mask.dense(), finest.mask.dense())
    assert sar.pool_sizes == schedule[:-1] and sar.n_pooled == finest.n_target - n_src
    np.testing.assert_array_equal(sar.level[:n_src], k_scales - 1)
    first = sar.first_mask.dense()  # (L, n_pooled + L): [pooled 0..K-2 | source | targets]
    pooled_end = np.cumsum([h * w for h, w in sar.pool_sizes])
    for k in range(k_scales):
        row = first[sar.target_slice(k).start]
        seen_pooled = np.flatnonzero(row[:sar.n_pooled])
        if k < k_scales - 1:
            np.testing.assert_array_equal(seen_pooled, np.arange(pooled_end[k] - schedule[k][0] * schedule[k][1],
                                                                 pooled_end[k]))
            assert not row[sar.n_pooled:sar.n_pooled + n_src].any()
        else:  # the last scale sees the source itself (pooling to its own size is the identity)
            assert seen_pooled.size == 0 and row[sar.n_pooled:sar.n_pooled + n_src].all()
        np.testing.assert_array_equal(row[sar.n_pooled + n_src:], finest.mask.dense()[sar.target_slice(k).start,
                                                                                           n_src:])
    src_row = first[0]
    assert not src_row[:sar.n_pooled].any() and src_row[sar.n_pooled:sar.n_pooled + n_src].all()
    assert not src_row[sar.n_pooled + n_src:].any()


def _adaptive_avg_pool(x: np.ndarray, size) -> np.ndarray:
    """Reference adaptive average pooling of (B, H, W, C) (loops, float64)."""
    b, hh, ww, c = x.shape
    h, w = size
    out = np.zeros((b, h, w, c))
    for i in range(h):
        for j in range(w):
            r0, r1 = (i * hh) // h, -((-(i + 1) * hh) // h)
            c0, c1 = (j * ww) // w, -((-(j + 1) * ww) // w)
            out[:, i, j] = x[:, r0:r1, c0:c1].mean((1, 2))
    return out


def test_sar_pooling_is_area_pooling_of_the_source_rows():
    schedule = schedules.scale_schedule("1.333", "0.06M")
    layout = conditioning.sequence_layout("sar", schedule)
    h, w = layout.source_grid
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, h * w, 3, 4)).astype(np.float32)
    pooled = np.asarray(conditioning.pool_source(layout, jnp.asarray(x)))
    grid = x.reshape(2, h, w, 12)
    want = np.concatenate([_adaptive_avg_pool(grid, s).reshape(2, -1, 3, 4) for s in layout.pool_sizes], 1)
    np.testing.assert_allclose(pooled, want, atol=1e-6)


def test_full_source_tokens_are_area_resizes():
    schedule = schedules.scale_schedule("1.0", "0.06M")
    layout = conditioning.sequence_layout("full", schedule)
    source = np.random.default_rng(1).normal(size=(1, 16, 16, 5)).astype(np.float32)
    tokens = np.asarray(conditioning.source_segments(layout, jnp.asarray(source)))
    want = np.concatenate([np.asarray(resample.area_resize(jnp.asarray(source), s)).reshape(1, -1, 5)
                           for s in schedule], 1)
    np.testing.assert_array_equal(tokens, want)
    assert tokens.shape[1] == layout.n_source
    with pytest.raises(ValueError, match="source grid"):
        conditioning.source_segments(layout, jnp.zeros((1, 8, 8, 5)))


def test_layout_arguments_are_checked():
    with pytest.raises(ValueError, match="conditioning"):
        conditioning.sequence_layout("scale", ((1, 1), (2, 2)), "1.0")
    with pytest.raises(ValueError, match="templates"):
        conditioning.sequence_layout("sar", ((1, 1), (2, 2)))
    with pytest.raises(ValueError):
        conditioning.parse("none")
    assert conditioning.parse(None) == "sar"
    assert conditioning.sequence_layout("sar", schedules.scale_schedule("0.5", "0.25M")).template == "0.5"
