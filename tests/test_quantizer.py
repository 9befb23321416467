"""BSQ, multi-scale residual quantization (tokenizer and trainer paths), bitwise self-correction and the sampling
inverse, against the official fixtures (`quantizer/`) and by their own invariants."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bsq_compare import TIE, max_err, nhwc, teacher_force
from helpers import case_params, load_npz
from varedit_jax import quantizer as Q
from varedit_jax import resample, schedules

FLOAT_TOL = 1e-6
SMALL = ((1, 1), (2, 2), (4, 3), (8, 6))

# Jitted entry points (schedules static): one compile per shape instead of op-by-op dispatch.
bsq = jax.jit(Q.bsq)
encode_multiscale = jax.jit(Q.encode_multiscale, static_argnums=1)
flip_requant = jax.jit(Q.flip_requant, static_argnums=1,
                       static_argnames=("patchify", "noise_apply_layers", "noise_apply_strength", "requant"))
infer_sequence = jax.jit(Q.infer_sequence, static_argnums=1, static_argnames="patchify")


def _latent(shape, seed=0, scale=1.0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * scale)


# ---------------------------------------------------------------------------------------------------------------
# Invariants (no fixtures)
# ---------------------------------------------------------------------------------------------------------------

def test_bsq_values_sign_rule_and_scale_invariance():
    r = _latent((3, 5, 16), seed=1).at[0, 0].set(0.0).at[1, 2, 3].set(0.0)
    q, bits = bsq(r)
    s = 1 / np.sqrt(16)
    np.testing.assert_allclose(np.abs(q), s, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(bits), (np.asarray(r) > 0).astype(np.uint8))
    assert np.all(np.asarray(q)[0, 0] < 0) and np.asarray(q)[1, 2, 3] < 0  # exact 0 -> bit 0, code -s
    q2, bits2 = bsq(r * 7.5)
    np.testing.assert_array_equal(np.asarray(bits2), np.asarray(bits))
    np.testing.assert_allclose(np.asarray(Q.codes_from_bits(bits)), np.asarray(q), atol=1e-7)


def test_bsq_straight_through_gradient_is_the_normalisation_gradient():
    r = _latent((4, 8), seed=2)
    w = _latent((4, 8), seed=3)
    g_st = jax.grad(lambda x: jnp.sum(w * bsq(x)[0]))(r)
    g_norm = jax.grad(lambda x: jnp.sum(w * Q.l2_normalize(x)))(r)
    np.testing.assert_allclose(np.asarray(g_st), np.asarray(g_norm), rtol=1e-5, atol=1e-7)
    assert np.abs(np.asarray(g_st)).max() > 0


def test_tokenizer_and_trainer_paths_agree_and_inference_replays_training_inputs():
    latent = _latent((2, 8, 6, 16), seed=4)
    ms = encode_multiscale(latent, SMALL)
    tr = flip_requant(latent, SMALL)
    assert tr.x_BLC_wo_prefix.shape == (2, schedules.num_tokens(SMALL) - 1, 16)
    np.testing.assert_array_equal(np.asarray(Q.to_sequence(ms.bits)), np.asarray(tr.gt_bits))
    summed, x = infer_sequence(tr.gt_bits, SMALL)
    np.testing.assert_allclose(np.asarray(x), np.asarray(tr.x_BLC_wo_prefix), atol=FLOAT_TOL)
    np.testing.assert_allclose(np.asarray(summed), np.asarray(ms.quantized), atol=FLOAT_TOL)
    # the reconstruction gets closer to the latent with every scale
    errs = [float(jnp.mean((latent - sum(resample.bilinear_resize(c, (8, 6)) for c in ms.codes[:k + 1])) ** 2))
            for k in range(len(SMALL))]
    assert all(a > b for a, b in zip(errs, errs[1:])), errs


def test_patchify_layout_and_inverse():
    sched = ((1, 1), (2, 2), (4, 3))
    latent = _latent((2, 8, 6, 4), seed=5)
    vae_sched = Q.vae_schedule(sched, True)
    assert vae_sched == ((2, 2), (4, 4), (8, 6))
    tr = flip_requant(latent, sched, patchify=True)
    assert tr.gt_bits.shape == (2, schedules.num_tokens(sched), 16)
    ms = encode_multiscale(latent, vae_sched)
    want = Q.to_sequence(ms.bits, True)
    np.testing.assert_array_equal(np.asarray(tr.gt_bits), np.asarray(want))
    summed, x = infer_sequence(tr.gt_bits, sched, patchify=True)
    np.testing.assert_allclose(np.asarray(x), np.asarray(tr.x_BLC_wo_prefix), atol=FLOAT_TOL)
    np.testing.assert_allclose(np.asarray(summed), np.asarray(ms.quantized), atol=FLOAT_TOL)
    np.testing.assert_array_equal(np.asarray(Q.from_tokens(Q.to_tokens(latent, True), (4, 3), True)),
                                  np.asarray(latent))
    grid = np.asarray(Q.source_grid(latent, sched, True))
    assert grid.shape == (2,) + sched[-1] + (16,)
    np.testing.assert_array_equal(grid.reshape(2, -1, 16), np.asarray(Q.to_tokens(latent, True)))


def test_infer_step_inside_jit_matches_whole_sequence():
    bits = jnp.asarray(np.random.default_rng(6).integers(0, 2, (2, schedules.num_tokens(SMALL), 8)), jnp.uint8)

    @jax.jit
    def loop(bits):
        summed = jnp.zeros((2, 8, 6, 8), jnp.float32)
        inputs = []
        for k, bits_k in enumerate(Q.split_scales(bits, SMALL)):
            summed, nxt = Q.infer_step(summed, bits_k, SMALL, k)
            inputs += [] if nxt is None else [nxt]
        return summed, jnp.concatenate(inputs, 1)

    want = infer_sequence(bits, SMALL)
    for got, ref in zip(loop(bits), want):
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=1e-7)


def test_random_self_correction_flips():
    latent = _latent((2, 8, 6, 16), seed=7)
    clean = flip_requant(latent, SMALL)
    run = lambda lat, key: flip_requant(lat, SMALL, key, noise_apply_layers=3, noise_apply_strength=0.3)
    noisy = run(latent, jax.random.key(0))
    again = run(latent, jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(noisy.flip_mask), np.asarray(again.flip_mask))
    mask = np.asarray(noisy.flip_mask)
    first3 = schedules.scale_offsets(SMALL)[3]
    assert mask[:, :first3].any() and not mask[:, first3:].any()  # only the first noise_apply_layers scales
    np.testing.assert_array_equal(np.asarray(noisy.gt_bits[:, :1]), np.asarray(clean.gt_bits[:, :1]))
    assert max_err(noisy.x_BLC_wo_prefix, clean.x_BLC_wo_prefix) > 1e-3
    # the flipped inputs are exactly the inference replay of the flipped bits
    _, x = infer_sequence(jnp.asarray(np.asarray(noisy.gt_bits) ^ mask), SMALL)
    np.testing.assert_allclose(np.asarray(x), np.asarray(noisy.x_BLC_wo_prefix), atol=FLOAT_TOL)
    no_requant = flip_requant(latent, SMALL, jax.random.key(0), noise_apply_layers=3, noise_apply_strength=0.3,
                                requant=False)
    np.testing.assert_array_equal(np.asarray(no_requant.flip_mask), mask)
    np.testing.assert_allclose(np.asarray(no_requant.x_BLC_wo_prefix), np.asarray(clean.x_BLC_wo_prefix), atol=1e-7)


def test_flip_strengths_stay_within_the_official_levels():
    rates = []
    for seed in range(40):
        (mask,) = Q.draw_flip_masks(jax.random.key(seed), 1, 16, ((64, 64),), 1, 0.3)
        rates.append(float(np.mean(np.asarray(mask))))
    assert max(rates) <= 0.3 + 0.01 and max(rates) >= 0.2
    assert len({round(r, 2) for r in rates}) > 10  # a strength is drawn per call
    assert Q.draw_flip_masks(jax.random.key(0), 1, 4, ((2, 2),), 0, 0.3) == [None]


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="does not match the last"):
        encode_multiscale(_latent((1, 8, 8, 4)), SMALL)
    with pytest.raises(ValueError, match="flip mask shape"):
        flip_requant(_latent((1, 8, 6, 4)), SMALL, jnp.zeros((1, 5, 4), jnp.uint8))
    with pytest.raises(ValueError, match="sequence length"):
        infer_sequence(jnp.zeros((1, 7, 4), jnp.uint8), SMALL)


# ---------------------------------------------------------------------------------------------------------------
# Parity with the official code (fixtures/quantizer)
# ---------------------------------------------------------------------------------------------------------------

QUANTIZER_CASES = case_params("quantizer", index="cases.json", key=None)


def _case(path, name, case):
    z = load_npz(path / f"{name}.npz")
    sched = schedules.as_schedule(case["schedule"])
    assert sched == schedules.as_schedule(z["scale_schedule"])
    patchify = bool(case.get("patchify", 0))
    return z, sched, patchify, Q.vae_schedule(sched, patchify)


@pytest.mark.parity
@pytest.mark.parametrize("path,name,case", QUANTIZER_CASES)
def test_case_schedule_is_the_template_prefix(path, name, case):
    _, sched, _, _ = _case(path, name, case)
    assert sched == schedules.full_schedule(case["template"])[:case["n_scales"]]


@pytest.mark.parity
@pytest.mark.parametrize("path,name,case", QUANTIZER_CASES)
def test_bsq_on_official_residuals(path, name, case):
    z, _, _, vae_sched = _case(path, name, case)
    for k in range(len(vae_sched)):
        r = nhwc(z[f"msbsq_residual_in_s{k:02d}"])
        q, bits = bsq(r)
        tie = np.abs(r) < TIE
        assert not (np.asarray(bits) != z[f"msbsq_bits_s{k:02d}"])[~tie].any()
        assert max_err(np.asarray(q)[~tie], nhwc(z[f"msbsq_codes_s{k:02d}"])[~tie]) < FLOAT_TOL


@pytest.mark.parity
@pytest.mark.parametrize("path,name,case", QUANTIZER_CASES)
def test_encode_multiscale_matches_official(path, name, case):
    z, _, _, vae_sched = _case(path, name, case)
    latent = nhwc(z["latent"])
    official = [z[f"msbsq_bits_s{k:02d}"] for k in range(len(vae_sched))]
    ties = [np.abs(nhwc(z[f"msbsq_residual_in_s{k:02d}"])) < TIE for k in range(len(vae_sched))]

    def run(negate):
        out = encode_multiscale(latent, vae_sched, negate=negate)
        return out, out.bits

    out, n_forced = teacher_force(run, official, ties, Q.to_sequence)
    print(f"{name}: {n_forced} tie bits teacher-forced")
    full = vae_sched[-1]
    cum = 0
    for k in range(len(vae_sched)):
        assert max_err(out.residuals[k], nhwc(z[f"msbsq_residual_in_s{k:02d}"])) < FLOAT_TOL
        assert max_err(np.abs(out.codes[k]), np.abs(nhwc(z[f"msbsq_codes_s{k:02d}"]))) < FLOAT_TOL
        cum = cum + resample.bilinear_resize(out.codes[k], full)
        assert max_err(cum, nhwc(z[f"msbsq_cum_s{k:02d}"])) < FLOAT_TOL
    assert max_err(out.quantized, nhwc(z["msbsq_quantized_out"])) < FLOAT_TOL


def _trainer_ties(z, residuals, sched, patchify, key):
    """Per transformer scale (B, hw, D) tie masks from the official BSC residuals (or our own if not stored)."""
    maps = [nhwc(z[f"{key}_s{k:02d}"]) if f"{key}_s{k:02d}" in z else np.asarray(residuals[k])
            for k in range(len(sched))]
    return [np.asarray(Q.to_tokens(jnp.abs(jnp.asarray(m)) < TIE, patchify)) for m in maps]


@pytest.mark.parity
@pytest.mark.parametrize("path,name,case", QUANTIZER_CASES)
@pytest.mark.parametrize("noise", [False, True], ids=["clean", "stored_masks"])
def test_flip_requant_matches_official(path, name, case, noise):
    z, sched, patchify, _ = _case(path, name, case)
    latent = nhwc(z["latent"])
    prefix = "bscn" if noise else "bsc"
    stored = z["bscn_flip_mask_BLd"].astype(bool) if noise else None
    official = Q.split_scales(z[f"{prefix}_gt_bits_BLd"], sched)
    residuals = flip_requant(latent, sched, stored, patchify=patchify).residuals
    ties = _trainer_ties(z, residuals, sched, patchify, "bsc_residual_in" if not noise else "bscn_residual_in")

    def run(forced):
        flip = stored if forced is None else (forced if stored is None else stored ^ forced)
        out = flip_requant(latent, sched, flip, patchify=patchify)
        return out, Q.split_scales(out.gt_bits, sched)

    out, n_forced = teacher_force(run, [np.asarray(o) for o in official], ties,
                                  lambda masks: np.concatenate(masks, axis=1))
    print(f"{name} ({prefix}): {n_forced} tie bits teacher-forced")
    assert max_err(out.x_BLC_wo_prefix, z[f"{prefix}_x_BLC_wo_prefix"]) < FLOAT_TOL
    if noise:
        np.testing.assert_array_equal(np.asarray(out.flip_mask), z["bscn_flip_mask_BLd"])
    else:
        for k in range(len(sched)):
            assert max_err(out.residuals[k], nhwc(z[f"bsc_residual_in_s{k:02d}"])) < FLOAT_TOL


@pytest.mark.parity
@pytest.mark.parametrize("path,name,case", QUANTIZER_CASES)
def test_inference_bits_to_latent_matches_official(path, name, case):
    z, sched, patchify, _ = _case(path, name, case)
    bits = z["infer_bits_BLd"]
    summed, x = infer_sequence(bits, sched, patchify=patchify)
    assert max_err(summed, nhwc(z["infer_summed_codes"])) < FLOAT_TOL
    assert max_err(summed, nhwc(z["decode_from_indices_summed_codes"])) < FLOAT_TOL
    assert max_err(x, z["infer_x_BLC_wo_prefix"]) < FLOAT_TOL
    for k, (bits_k, hw) in enumerate(zip(Q.split_scales(bits, sched), sched)):
        codes = Q.codes_from_bits(Q.from_tokens(jnp.asarray(bits_k), hw, patchify))
        assert max_err(codes, nhwc(z[f"infer_codes_s{k:02d}"])) < FLOAT_TOL
