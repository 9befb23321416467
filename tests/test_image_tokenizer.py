"""The tokenizer autoencoder: structure, logical axes, and parity with the official d32 / d56 fixtures
(`vae/`, `vae_d56/`): encoder, decoder, quantization, trainer inputs, decoding from bits, the sampler's image."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bsq_compare import TIE, max_err, nhwc, teacher_force
from helpers import case_params, load_index, load_npz
from varedit_jax import configlib, image_tokenizer, quantizer as Q, schedules, sharding
from varedit_jax.convert import image_tokenizer as convert_image_tokenizer

LATENT_TOL, IMAGE_TOL, QUANT_TOL = 5e-5, 1e-4, 1e-6
REPO = __import__("helpers").REPO_ROOT
TINY = dict(base_ch=32, ch_mult=(1, 2), num_res_blocks=1, patch_size=2, codebook_dim=8)


def _config(**overrides):
    return image_tokenizer.default_model_config(**{**TINY, **overrides})


def _abstract(**overrides):
    """Structure only (no random init, nothing compiled)."""
    return nnx.eval_shape(lambda: image_tokenizer.ImageTokenizer(_config(**overrides), rngs=nnx.Rngs(0)))


@pytest.fixture(scope="module")
def tiny():
    """One randomly initialised tiny model for the tests that compute (random init compiles per shape)."""
    return image_tokenizer.build(_config())


# ---------------------------------------------------------------------------------------------------------------
# Structure
# ---------------------------------------------------------------------------------------------------------------

def test_shapes_stride_clamp_and_bad_sizes(tiny):
    x = jax.random.uniform(jax.random.key(0), (2, 8, 12, 3), minval=-1, maxval=1)
    features = jax.jit(tiny.encode)(x)
    assert features.shape == (2, 4, 6, 8) and tiny.stride == 2
    assert _abstract(patchify=True).stride == 4
    big = jax.jit(tiny.decode)(features * 100.0)
    assert big.shape == (2, 8, 12, 3) and float(jnp.max(jnp.abs(big))) <= 1.0
    with pytest.raises(ValueError, match="multiples of 2"):
        tiny.encode(x[:, :7])


def test_group_norm_rule():
    assert image_tokenizer.norm_groups(64) == 32 and image_tokenizer.norm_groups(48) == 24 and image_tokenizer.norm_groups(16, 4) == 4
    with pytest.raises(ValueError, match="neither 32 nor 24"):
        image_tokenizer.norm_groups(40)
    with pytest.raises(ValueError, match="neither 32 nor 24"):
        _abstract(base_ch=20)
    with pytest.raises(ValueError, match="not divisible by norm_groups"):
        _abstract(norm_groups=5)
    assert _abstract(base_ch=24, ch_mult=(1, 1)).encoder.norm_out.num_groups == 24
    assert _abstract(norm_groups=8).decoder.norm_out.num_groups == 8


def test_every_parameter_has_logical_axes_from_the_vocabulary():
    vocab = {name for name, _ in sharding.DEFAULT_RULES}
    leaves = jax.tree_util.tree_leaves_with_path(nnx.state(_abstract(), nnx.Param),
                                                 is_leaf=lambda x: isinstance(x, nnx.Variable))
    assert leaves
    for path, var in leaves:
        names = var.get_metadata().get("out_sharding")
        assert names is not None and len(names) == len(var.shape) and set(names) <= vocab, (path, names)


def test_downsample_pads_right_and_bottom_only():
    layer = image_tokenizer.Downsample(4, image_tokenizer.Layers(jax.lax.Precision.HIGHEST, 0), rngs=nnx.Rngs(1))
    x = jax.random.normal(jax.random.key(2), (1, 6, 5, 4))
    padded = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    want = jax.lax.conv_general_dilated(padded, layer.conv.kernel[...], (2, 2), "VALID",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC")) + layer.conv.bias[...]
    np.testing.assert_allclose(np.asarray(layer(x)), np.asarray(want), atol=1e-6)
    assert layer(x).shape == (1, 3, 2, 4)


def test_decode_from_bits_equals_decoding_the_quantized_latent(tiny):
    model = image_tokenizer.build(_config(patchify=True), image_tokenizer.param_dict(tiny))
    sched = ((1, 1), (2, 2))
    x = jax.random.uniform(jax.random.key(3), (1, 8, 8, 3), minval=-1, maxval=1)
    codes = jax.jit(lambda x: model.quantize(model.encode(x), sched))(x)
    bits = Q.to_sequence(codes.bits, True)
    assert bits.shape == (1, 5, 32)
    np.testing.assert_allclose(np.asarray(jax.jit(lambda b: model.decode_from_bits(b, sched))(bits)),
                               np.asarray(jax.jit(model.decode)(codes.quantized)), atol=1e-5)


@pytest.mark.parametrize("family", ["image_tokenizer_d32", "image_tokenizer_d56"])
def test_official_architectures_build(family):
    cfg = configlib.load(REPO / "configs" / f"{family}.py")
    model = nnx.eval_shape(lambda: image_tokenizer.ImageTokenizer(cfg.model, rngs=nnx.Rngs(0)))
    count = lambda m: sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(m, nnx.Param)))
    assert model.stride == 16
    if family == "image_tokenizer_d32":  # infinity_official.md 1.2: encoder 45.03M, decoder 65.09M parameters
        assert round(count(model.encoder) / 1e6, 2) == 45.03 and round(count(model.decoder) / 1e6, 2) == 65.09
    else:
        assert model.encoder.conv_out.kernel.shape == (3, 3, 512, 14) and len(model.decoder.up) == 4


# ---------------------------------------------------------------------------------------------------------------
# Parity with the official code (fixtures/vae, fixtures/vae_d56)
# ---------------------------------------------------------------------------------------------------------------

VAE_CASES = case_params("vae") + case_params("vae_d56")


@functools.lru_cache(maxsize=None)
def _model(path):
    index = load_index(path / "config.json")
    config = convert_image_tokenizer.config_from_file(path / "config.json")
    _, params = convert_image_tokenizer.import_weights(path / index.get("weights", "weights.safetensors"), config)
    model = image_tokenizer.build(config.model, params)
    fns = dict(encode=jax.jit(model.encode), decoder=jax.jit(model.decoder), decode=jax.jit(model.decode),
               quantize=jax.jit(Q.encode_multiscale, static_argnums=1),
               flip_requant=jax.jit(Q.flip_requant, static_argnums=1, static_argnames="patchify"))
    return model, fns


def _case(path, name, case):
    model, fns = _model(path)
    z = load_npz(path / f"{name}.npz")
    sched = schedules.as_schedule(case["scale_schedule"])
    vae_sched = Q.vae_schedule(sched, model.patchify)
    assert vae_sched == schedules.as_schedule(case["vae_scale_schedule"])
    assert vae_sched == schedules.as_schedule(z["vae_scale_schedule"])
    assert model.codebook_dim == z["raw_features"].shape[1]
    return model, fns, z, sched, vae_sched


@pytest.mark.parity
@pytest.mark.parametrize("path,name,case", VAE_CASES)
def test_encoder_and_decoder_match_official(path, name, case):
    model, fns, z, _, _ = _case(path, name, case)
    assert max_err(fns["encode"](nhwc(z["images"])), nhwc(z["raw_features"])) < LATENT_TOL
    assert max_err(fns["decode"](nhwc(z["raw_features"])), nhwc(z["decoded_from_raw_features"])) < IMAGE_TOL
    assert max_err(fns["decoder"](nhwc(z["quantized_latent"])), nhwc(z["decoder_out_unclamped"])) < IMAGE_TOL
    assert max_err(fns["decode"](nhwc(z["quantized_latent"])), nhwc(z["decoded"])) < IMAGE_TOL


@pytest.mark.parity
@pytest.mark.parametrize("path,name,case", VAE_CASES)
def test_quantize_and_trainer_inputs_match_official(path, name, case):
    model, fns, z, sched, vae_sched = _case(path, name, case)
    features = fns["encode"](nhwc(z["images"]))
    official = [z[f"bits_s{k:02d}"] for k in range(len(vae_sched))]
    ties = [np.abs(nhwc(z[f"residual_in_s{k:02d}"])) < TIE for k in range(len(vae_sched))]

    def run_vae(negate):
        out = fns["quantize"](features, vae_sched, negate=negate)
        return out, out.bits

    out, n_vae = teacher_force(run_vae, official, ties, Q.to_sequence)
    for k in range(len(vae_sched)):
        assert max_err(out.residuals[k], nhwc(z[f"residual_in_s{k:02d}"])) < LATENT_TOL
    assert max_err(out.quantized, nhwc(z["quantized_latent"])) < LATENT_TOL

    clean = fns["flip_requant"](features, sched, patchify=model.patchify)
    bsc_ties = [np.asarray(Q.to_tokens(jnp.abs(r) < TIE, model.patchify)) | np.asarray(Q.to_tokens(t, model.patchify))
                for r, t in zip(clean.residuals, ties)]

    def run_bsc(flip):
        out = fns["flip_requant"](features, sched, flip, patchify=model.patchify)
        return out, Q.split_scales(out.gt_bits, sched)

    bsc, n_bsc = teacher_force(run_bsc, [np.asarray(b) for b in Q.split_scales(z["bsc_gt_bits_BLd"], sched)],
                               bsc_ties, lambda masks: np.concatenate(masks, axis=1))
    print(f"{path.name}/{name}: tie bits teacher-forced: tokenizer path {n_vae}, trainer path {n_bsc}")
    assert max_err(bsc.x_BLC_wo_prefix, z["bsc_x_BLC_wo_prefix"]) < LATENT_TOL


@pytest.mark.parity
@pytest.mark.parametrize("path,name,case", VAE_CASES)
def test_decoding_from_bits_matches_official(path, name, case):
    model, fns, z, sched, vae_sched = _case(path, name, case)
    # decode_from_indices of the encoder's own bits (VAE layout -> transformer tokens)
    bits = Q.to_sequence([jnp.asarray(z[f"bits_s{k:02d}"]) for k in range(len(vae_sched))], model.patchify)
    infer = jax.jit(Q.infer_sequence, static_argnums=1, static_argnames="patchify")
    summed, _ = infer(bits, sched, patchify=model.patchify)
    assert max_err(summed, nhwc(z["decode_from_indices_summed_codes"])) < QUANT_TOL
    assert max_err(fns["decode"](summed), nhwc(z["decode_from_indices_image"])) < IMAGE_TOL
    # the sampler's loop on stand-in sampled bits, then the uint8 BGR image (truncating cast)
    summed, x = infer(z["infer_bits_BLd"], sched, patchify=model.patchify)
    assert max_err(summed, nhwc(z["infer_summed_codes"])) < QUANT_TOL
    assert max_err(x, z["infer_x_BLC_wo_prefix"]) < QUANT_TOL
    image = fns["decode"](summed)
    assert max_err(image, nhwc(z["infer_decoded"])) < IMAGE_TOL
    u8 = ((np.asarray(image) + 1) / 2 * 255).astype(np.uint8)[..., ::-1]
    diff = np.abs(u8.astype(np.int32) - z["infer_image_uint8_BHWC_bgr"].astype(np.int32))
    print(f"{path.name}/{name}: uint8 pixels off by one: {int((diff == 1).sum())} of {diff.size}")
    assert diff.max() <= 1
