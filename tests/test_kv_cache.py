"""KV-cached incremental decoding: scale-by-scale logits equal the teacher-forcing forward (Infinity and every VAREdit
mode), and the official samplers' raw head logits teacher-forced through the cache (infinity_sampling,
varedit_sampling fixtures)."""
import functools

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import fixture_dir, load_npz
from transformer_cases import folder_config, layout_of, load_model, pad_text, scale_inputs, template_of
from varedit_jax import conditioning

ATOL = 1e-4


@functools.lru_cache(maxsize=None)
def _jitted(layout):
    """(init, [step of scale k]) jitted once per layout, so repeated calls reuse the compiled programs."""
    init = nnx.jit(lambda m, text, mask, drop, source: m.init_decode(text, mask, drop, source, layout))
    steps = [nnx.jit(functools.partial(lambda k, m, s, t: m.decode_scale(s, layout, k, t), k))
             for k in range(len(layout.schedule))]
    return init, steps


def _decode(model, layout, text, mask, drop, source, targets):
    """(B, L_tgt, 2d) logits of every target scale, run one scale at a time through the cache."""
    init, steps = _jitted(layout)
    state = init(model, text, mask, drop, source)
    b, heads, head_dim = len(drop), model.cfg.num_heads, model.head_dim
    assert state.first_k.shape == (b, layout.n_pooled + layout.length, heads, head_dim)
    assert state.k.shape == (model.cfg.depth - 1, b, layout.length, heads, head_dim)
    filled = layout.n_pooled + layout.n_source  # block 0: [pooled source | source | targets]
    assert (np.abs(np.asarray(state.first_k[:, :filled])).max(axis=(0, 2, 3)) > 0).all()
    assert not np.asarray(state.first_k[:, filled:]).any() and not np.asarray(state.k[:, :, layout.n_source:]).any()
    out = []
    for k in range(len(layout.schedule)):
        logits, state = steps[k](model, state, scale_inputs(targets, layout, k))
        assert logits.shape[1] == layout.schedule[k][0] * layout.schedule[k][1]
        out.append(logits)
    return jnp.concatenate(out, 1)


def _weights(folder_name: str) -> str:
    folder = fixture_dir(folder_name)
    return str(folder / folder_config(folder)["weights"])


@pytest.mark.parity
def test_infinity_cached_equals_teacher_forcing_and_the_official_sampler():
    folder = fixture_dir("infinity_sampling")
    z = load_npz(folder / "io.npz")
    _, model = load_model(_weights("infinity_sampling"), "infinity")
    layout = layout_of("none", z["scale_schedule"], template_of(folder_config(folder)))
    text, mask = pad_text(z["text_kv_compact"], z["text_lens"])
    b = len(z["text_lens"])
    # CFG batch as the official sampler: [cond rows; uncond rows (cfg_uncond text)]
    text2, mask2 = np.concatenate([text, text]), np.concatenate([mask, mask])
    drop = jnp.asarray(np.arange(2 * b) >= b)
    targets = np.concatenate([z["x_BLC_wo_prefix_from_bits"]] * 2)
    cached = _decode(model, layout, text2, mask2, drop, None, targets)
    err = float(np.abs(np.asarray(cached) - z["head_logits_cond_uncond"]).max())
    assert err <= ATOL, f"cached head logits vs official sampler: {err:.3g}"
    forced = nnx.jit(lambda m: m(text2, mask2, drop, None, targets, layout))(model)
    assert float(np.abs(np.asarray(cached) - np.asarray(forced)).max()) <= 1e-5


@pytest.mark.parity
def test_varedit_sar_cache_reproduces_the_official_sampler():
    folder = fixture_dir("varedit_sampling")
    z = load_npz(folder / "io.npz")
    cfg = folder_config(folder)
    _, model = load_model(_weights("varedit_sampling"), "varedit")
    layout = layout_of("sar", z["scale_schedule"], template_of(cfg))
    starts = np.concatenate([[0], np.cumsum(z["text_lens"])])
    for i in range(len(z["text_lens"])):
        text, mask = pad_text(z["text_kv_compact_concat"][starts[i]:starts[i + 1]], z["text_lens"][i:i + 1])
        d = z["source_prefix"].shape[-1]
        source = np.repeat(z["source_prefix"][i:i + 1].reshape((1,) + layout.source_grid + (d,)), 2, 0)
        targets = np.repeat(z["x_BLC_wo_prefix_from_bits"][i:i + 1], 2, 0)
        cached = _decode(model, layout, np.repeat(text, 2, 0), np.repeat(mask, 2, 0), jnp.array([False, True]),
                         source, targets)
        err = float(np.abs(np.asarray(cached) - z["head_logits_cond_uncond"][i]).max())
        assert err <= ATOL, f"sample {i}: cached head logits vs official sampler: {err:.3g}"


@pytest.mark.parity
@pytest.mark.parametrize("mode", [pytest.param(m, marks=[pytest.mark.slow] if m != "sar" else [])
                                  for m in conditioning.MODES])
def test_every_mode_cached_equals_teacher_forcing(mode):
    """The VAREdit sampler fixture's weights and inputs under each conditioning mode (the source is ignored by
    `none`); teacher forcing is the reference. Only `sar` (whose programs the sampler test already compiled) is in the
    quick subset; the Infinity sampler test covers `none`."""
    folder = fixture_dir("varedit_sampling")
    z = load_npz(folder / "io.npz")
    _, model = load_model(_weights("varedit_sampling"), "varedit")
    layout = layout_of(mode, z["scale_schedule"], template_of(folder_config(folder)))
    text, mask = pad_text(z["text_kv_compact_concat"], z["text_lens"])
    b, _, d = z["source_prefix"].shape
    source = None if mode == "none" else z["source_prefix"].reshape((b,) + layout.source_grid + (d,))
    drop = jnp.asarray(np.arange(b) % 2 == 1)
    targets = z["x_BLC_wo_prefix_from_bits"]
    forced = nnx.jit(lambda m: m(text, mask, drop, source, targets, layout))(model)
    cached = _decode(model, layout, text, mask, drop, source, targets)
    err = float(np.abs(np.asarray(cached) - np.asarray(forced)).max())
    assert err <= 1e-5, f"{mode}: cached vs teacher forcing {err:.3g}"
