"""Exact toy-task metrics (varedit_jax/eval/toy_metrics.py) and the balance score (eval/scores.py)."""
import ml_dtypes
import numpy as np
import pytest

from data_pipelines.toy import render_pair
from varedit_jax.eval import scores
from varedit_jax.eval import toy_metrics as tm


def _batch(n=10, size=48, seed=3):
    pairs = [render_pair(seed, i, size) for i in range(n)]
    stack = lambda key: np.stack([p[key] for p in pairs])  # noqa: E731
    return stack("source"), stack("target"), stack("mask"), [p["op"] for p in pairs]


def test_balance_is_the_harmonic_mean():
    s, o = np.array([8.0, 0.0, 10.0, 3.0, 0.0]), np.array([6.0, 9.0, 10.0, 0.0, 0.0])
    bal = scores.balance(s, o)
    np.testing.assert_allclose(bal[0], 2 * 8 * 6 / 14)
    np.testing.assert_array_equal(bal[1:], [0.0, 10.0, 0.0, 0.0])  # 0 when either is 0, no NaN at (0, 0)
    assert (bal <= np.maximum(s, o) + 1e-12).all() and (bal >= np.minimum(s, o) - 1e-12).all()
    assert bal[0] <= (8 + 6) / 2  # harmonic <= arithmetic mean
    np.testing.assert_array_equal(scores.balance(o, s), bal)  # symmetric
    assert np.isnan(scores.balance(np.nan, 5.0))
    with pytest.raises(ValueError):
        scores.balance(-1.0, 5.0)


def test_summarize_reports_both_aggregates_and_skips_undefined():
    row = scores.summarize([10.0, 0.0, np.nan], [0.0, 10.0, 7.0])
    assert row["n"] == 2 and row["n_undefined"] == 1
    assert row["balance"] == 0.0  # each sample is 0
    assert row["balance_of_means"] == pytest.approx(5.0)  # harmonic mean of (5, 5)
    assert row["success"] == pytest.approx(5.0) and row["preservation"] == pytest.approx(5.0)
    empty = scores.summarize([np.nan], [1.0])
    assert empty["n"] == 0 and np.isnan(empty["balance"])


def test_copy_source_preserves_everything_and_fails_real_edits():
    source, target, mask, ops = _batch()
    copy = tm.reference_scores(source, target, mask)["copy_source"]
    np.testing.assert_array_equal(copy["preservation"], 10.0)
    np.testing.assert_array_equal(copy["mae_keep"], 0.0)
    for op in ("recolor", "add", "remove"):  # every mask pixel changes under these edits
        idx = [i for i, o in enumerate(ops) if o == op]
        np.testing.assert_array_equal(copy["success"][idx], 0.0)
        np.testing.assert_array_equal(copy["balance"][idx], 0.0)
    assert (copy["success"] < 10).all()  # no toy edit is a no-op
    row = tm.summarize_toy(copy)
    assert row["preservation"] == 10.0 and row["success"] < 3.0 and row["balance"] < 3.0 and row["n"] == len(ops)


def test_oracle_equal_to_target_is_perfect_and_scores_are_exact_fractions():
    source, target, mask, _ = _batch()
    ref = tm.reference_scores(source, target, mask, reconstruct=lambda x: x)
    for key in ("success", "preservation", "balance"):
        np.testing.assert_array_equal(ref["oracle"][key], 10.0)
    # Corrupt a known number of mask pixels of sample 0: success drops by exactly that fraction.
    out = target.copy()
    ys, xs = np.nonzero(mask[0])
    k = len(ys) // 4
    out[0, ys[:k], xs[:k]] = 255 - out[0, ys[:k], xs[:k]]
    changed = np.abs(out[0, ys[:k], xs[:k]].astype(int) - target[0, ys[:k], xs[:k]]).max(-1) > 0.125 * 255
    got = tm.toy_scores(source, target, out, mask)
    assert got["success"][0] == pytest.approx(10.0 * (1 - changed.sum() / len(ys)))
    assert got["preservation"][0] == 10.0 and (got["success"][1:] == 10.0).all()


def test_float_images_tolerance_and_monotonicity():
    source, target, mask, _ = _batch(n=5)
    to_float = lambda x: x.astype(np.float32) / 255.0 * 2.0 - 1.0  # noqa: E731
    src, tgt = to_float(source), to_float(target)
    # Same result for uint8 and [-1, 1] float inputs.
    a = tm.toy_scores(source, target, target, mask)
    b = tm.toy_scores(src, tgt, tgt, mask)
    for key in tm.COLUMNS:
        np.testing.assert_allclose(a[key], b[key], atol=1e-6)
    bf16 = tm.toy_scores(src, tgt, tgt.astype(ml_dtypes.bfloat16), mask)  # e.g. a bfloat16 sampler output
    np.testing.assert_array_equal(bf16["balance"], 10.0)
    # Uniform noise below the tolerance is invisible to success/preservation, above it everything fails;
    # the scores never increase with the noise amplitude.
    prev = None
    for amp in (0.0, 0.05, 0.2, 0.4, 1.0):
        noisy = np.clip(tgt + amp, -1, 1)  # [-1, 1] units: amp / 2 in [0, 1] units
        s = tm.toy_scores(src, tgt, noisy, mask)
        if prev is not None:
            assert (s["success"] <= prev["success"]).all() and (s["preservation"] <= prev["preservation"]).all()
            assert (s["mae_edit"] >= prev["mae_edit"]).all()
        prev = s
        if amp / 2 <= tm.TOLERANCE:
            np.testing.assert_array_equal(s["balance"], 10.0)
    assert (prev["preservation"] < 10.0).all()


def test_oracle_reconstruction_is_clipped_and_has_mask_respected():
    source, target, mask, _ = _batch(n=4)
    tgt = target.astype(np.float32) / 127.5 - 1.0
    ref = tm.reference_scores(source, tgt, mask, reconstruct=lambda x: x * 1.02, has_mask=[True, False, True, True])
    assert np.isnan(ref["oracle"]["success"][1]) and np.isnan(ref["copy_source"]["balance"][1])
    np.testing.assert_array_equal(ref["oracle"]["success"][[0, 2, 3]], 10.0)
    row = tm.summarize_toy(ref["oracle"])
    assert row["n"] == 3 and row["n_undefined"] == 1
    joined = tm.concat([ref["oracle"], ref["copy_source"]])
    assert joined["success"].shape == (8,)


def test_empty_mask_gives_undefined_success_and_bad_input_raises():
    source, target, mask, _ = _batch(n=2)
    empty = np.zeros_like(mask)
    s = tm.toy_scores(source, target, target, empty)
    assert np.isnan(s["success"]).all() and (s["preservation"] < 10).all()
    with pytest.raises(ValueError, match="mask shape"):
        tm.toy_scores(source, target, target, mask[:, :-1])
    with pytest.raises(ValueError, match="differ in shape"):
        tm.toy_scores(source, target, target[:1], mask)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        tm.toy_scores(source, target, target.astype(np.float32), mask)  # 0..255 floats are not [-1, 1]
    with pytest.raises(ValueError, match="NaN"):
        tm.toy_scores(source, target, np.full(target.shape, np.nan, np.float32), mask)
