"""The Infinity transformer: parity with the official teacher-forcing forward (infinity_transformer fixture), the
per-bit loss, dtype / layer-layout / remat switches, logical axis names, input validation."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from helpers import fixture_dir, load_npz
from transformer_cases import folder_config, kind_of, layout_of, load_model, random_params, template_of
from varedit_jax import sharding, transformer

ATOL = 1e-4


@pytest.fixture(scope="module")
def infinity():
    """(fixture arrays, layout, model, jitted forward) of the infinity_transformer fixture."""
    folder = fixture_dir("infinity_transformer")
    z = load_npz(folder / "io.npz")
    _, model = load_model(str(folder / "weights.safetensors"), kind_of(folder))
    layout = layout_of("none", z["scale_schedule"], template_of(folder_config(folder)))
    forward = nnx.jit(lambda m, drop: m(z["text_padded"], z["text_mask"], drop, None, z["x_BLC_wo_prefix"], layout,
                                        return_blocks=True))
    return z, layout, model, forward


def _close(got, want, atol=ATOL):
    got = np.asarray(got)
    assert got.shape == want.shape, (got.shape, want.shape)
    err = float(np.abs(got - want).max())
    assert err <= atol, f"max |diff| {err:.3g} > {atol}"
    return err


@pytest.mark.parity
def test_logits_blocks_and_loss_match_the_official_forward(infinity):
    z, layout, model, forward = infinity
    b = z["logits"].shape[0]
    logits, blocks = forward(model, jnp.zeros(b, bool))
    _close(logits, z["logits"])
    for i in range(len(blocks)):
        _close(blocks[i], z[f"block{i}_out_padded"][:, :layout.length])
    # the loss function alone, on the official logits: tight
    _, per_bit_of_theirs = transformer.bitwise_loss(jnp.asarray(z["logits"]), z["gt_bits"], layout.schedule)
    _close(per_bit_of_theirs, z["loss_per_bit"], 1e-5)
    # end to end: a per-bit CE moves by at most the sum of its two logits' errors (|d CE / d logit| <= 1)
    loss, per_bit = transformer.bitwise_loss(logits, z["gt_bits"], layout.schedule)
    _close(per_bit, z["loss_per_bit"], 2 * ATOL)
    np.testing.assert_allclose(float(loss), float(z["loss_mean"]), rtol=1e-5)
    loss_rw, _ = transformer.bitwise_loss(logits, z["gt_bits"], layout.schedule, reweight_by_scale=True)
    np.testing.assert_allclose(float(loss_rw), float(z["loss_reweighted"]), rtol=1e-5)
    np.testing.assert_allclose(transformer.token_weights(layout.schedule, True), z["loss_token_weights_reweighted"],
                               rtol=1e-6)
    head = model.head_nm(blocks[-1][:, layout.n_source:], model.encode_text(
        z["text_padded"], z["text_mask"], jnp.zeros(b, bool)).cond)
    _close(head, z["head_nm_out"])


@pytest.mark.parity
def test_dropped_text_uses_cfg_uncond(infinity):
    z, _, model, forward = infinity
    logits, _ = forward(model, jnp.ones(z["logits"].shape[0], bool))
    _close(logits, z["logits_all_uncond"])


@pytest.mark.parity
def test_text_path_and_adaln_parameters(infinity):
    z, _, model, _ = infinity
    b = z["cond_BD"].shape[0]
    ctx = model.encode_text(z["text_padded"], z["text_mask"], jnp.zeros(b, bool))
    _close(ctx.cond, z["cond_BD"])
    _close(ctx.ada, z["cond_BD_or_gss"][:, 0])
    _close(np.asarray(ctx.kv)[z["text_mask"]], z["ca_kv"])  # the packed (valid) rows, sample-major


@pytest.mark.parity
def test_attention_mask_is_the_official_block_causal_bias(infinity):
    z, layout, _, _ = infinity
    n = layout.length
    np.testing.assert_array_equal(layout.mask.dense(), z["attn_visible_padded"][:n, :n])
    np.testing.assert_array_equal(layout.level, z["scale_id_per_position"])


@pytest.mark.parity
def test_looped_blocks_equal_scanned_blocks(infinity):
    z, layout, model, forward = infinity
    folder = fixture_dir("infinity_transformer")
    _, looped = load_model(str(folder / "weights.safetensors"), kind_of(folder), scan_layers=False)
    assert isinstance(looped.blocks, nnx.List) and not isinstance(model.blocks, nnx.List)
    b = z["logits"].shape[0]
    drop = jnp.array([True] + [False] * (b - 1))
    want, _ = forward(model, drop)
    got = nnx.jit(lambda m: m(z["text_padded"], z["text_mask"], drop, None, z["x_BLC_wo_prefix"], layout))(looped)
    _close(got, np.asarray(want), 1e-5)


@pytest.mark.parity
def test_bfloat16_compute_stays_close_to_float32(infinity):
    z, layout, _, _ = infinity
    folder = fixture_dir("infinity_transformer")
    _, model = load_model(str(folder / "weights.safetensors"), kind_of(folder), dtype="bfloat16")
    assert model.blocks.sa.mat_qkv[...].dtype == jnp.float32  # parameters stay float32
    b = z["logits"].shape[0]
    logits = nnx.jit(lambda m: m(z["text_padded"], z["text_mask"], jnp.zeros(b, bool), None, z["x_BLC_wo_prefix"],
                                 layout))(model)
    assert logits.dtype == jnp.float32
    err = np.abs(np.asarray(logits) - z["logits"])
    assert 0 < err.max() < 0.25 and err.mean() < 0.02, (err.max(), err.mean())


def _tiny_config(**overrides) -> ml_collections.ConfigDict:
    return transformer.default_model_config(**{**dict(embed_dim=32, depth=3, num_heads=2, bits=4, text_dim=16,
                                                      text_max_len=6, text_pool_heads=2, block_chunks=1), **overrides})


def _tiny_inputs(cfg, layout, b=2):
    ks = jax.random.split(jax.random.key(1), 3)
    text = jax.random.normal(ks[0], (b, 5, cfg.text_dim))
    mask = jnp.arange(5)[None] < jnp.array([5, 2])[:, None]
    targets = jax.random.normal(ks[1], (b, layout.n_target - 1, cfg.bits))
    bits = jax.random.bernoulli(ks[2], 0.5, (b, layout.n_target, cfg.bits))
    return text, mask, jnp.array([False, True]), targets, bits


def test_remat_policies_and_drop_path():
    layout = layout_of("none", np.array([[1, 1, 1], [1, 2, 2], [1, 4, 4]]), "1.0")
    params = random_params(_tiny_config())
    results = []
    for remat in ("none", "full"):
        cfg = _tiny_config(remat=remat)
        model = transformer.build(cfg, params)
        text, mask, drop, targets, bits = _tiny_inputs(cfg, layout)

        def loss(m, key):
            logits = m(text, mask, drop, None, targets, layout, dropout_key=key)
            return transformer.bitwise_loss(logits, bits, layout.schedule)[0]

        @nnx.jit
        def run(m, key):
            return loss(m, None), loss(m, key), nnx.grad(loss)(m, None)
        results.append(run(model, jax.random.key(3)))
    (plain, dropped, grads), (plain_full, _, grads_full) = results
    np.testing.assert_allclose(float(plain), float(plain_full), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_full)):
        np.testing.assert_allclose(a, b, atol=1e-6)
    assert float(dropped) != float(plain)  # drop path (linspace(0, 0.1) over blocks) acts only with a key
    transformer.validate_config(_tiny_config(remat="dots_with_no_batch_dims_saveable"))
    with pytest.raises(ValueError, match="remat"):
        transformer.validate_config(_tiny_config(remat="everything"))


def test_every_parameter_has_logical_axis_names():
    vocabulary = {name for name, _ in sharding.DEFAULT_RULES}
    for scan in (True, False):
        model = nnx.eval_shape(lambda: transformer.Infinity(_tiny_config(scan_layers=scan), rngs=nnx.Rngs(0)))
        for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
            names = var.get_metadata().get("out_sharding")
            assert names is not None and len(names) == len(var.shape), (path, names, var.shape)
            assert set(names) <= vocabulary, (path, names)
            assert ("layers" in names) == (scan and "blocks" in path), (path, names)


def test_official_parameter_counts():
    for shape, want in (("2b", 2_204_564_032), ("8b", 8_375_791_824)):
        cfg = transformer.default_model_config(**transformer.OFFICIAL_SHAPES[shape])
        model = nnx.eval_shape(lambda: transformer.Infinity(cfg, rngs=nnx.Rngs(0)))
        assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(transformer.param_dict(model))) == want


def test_bad_inputs_are_refused():
    cfg = _tiny_config()
    model = nnx.eval_shape(lambda: transformer.Infinity(cfg, rngs=nnx.Rngs(0)))
    layout = layout_of("none", np.array([[1, 1, 1], [1, 2, 2]]), "1.0")
    text, mask, drop, targets, _ = _tiny_inputs(cfg, layout)

    def call(*args):  # traced abstractly: the checks run, nothing is computed
        return nnx.eval_shape(lambda m: m(*args), model)
    call(text, mask, drop, None, targets, layout)
    with pytest.raises(ValueError, match="text_max_len"):
        call(jnp.zeros((2, 7, cfg.text_dim)), jnp.ones((2, 7), bool), drop, None, targets, layout)
    with pytest.raises(ValueError, match="target inputs"):
        call(text, mask, drop, None, targets[:, :-1], layout)
    sar = layout_of("sar", np.array([[1, 1, 1], [1, 2, 2]]), "1.0")
    with pytest.raises(ValueError, match="source grid"):
        call(text, mask, drop, jnp.zeros((2, 3, 3, cfg.bits)), targets, sar)
    with pytest.raises(ValueError):
        transformer.default_model_config(embed_dimm=3)
    with pytest.raises(ValueError, match="head_dim"):
        transformer.Infinity(_tiny_config(num_heads=3), rngs=nnx.Rngs(0))


def test_bit_accuracy_and_label_smoothing():
    logits = jnp.array([[[2.0, -1.0, 0.0, 3.0]]])  # bit 0 -> 0, bit 1 -> 1
    np.testing.assert_array_equal(transformer.bit_accuracy(logits, jnp.array([[[0, 0]]])), [[[True, False]]])
    ce = transformer.bitwise_cross_entropy(logits, jnp.array([[[0, 1]]]), label_smoothing=0.1)
    logp = jax.nn.log_softmax(logits.reshape(1, 1, 2, 2), -1)
    want = -(0.9 * logp[0, 0, [0, 1], [0, 1]] + 0.1 * logp[0, 0].mean(-1))
    np.testing.assert_allclose(ce[0, 0], want, rtol=1e-6)
