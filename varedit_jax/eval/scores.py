"""The balance score and the aggregation shared by the toy metrics and the GPT judge.

Balance (the paper's GPT-Bal., Appendix A.2.2) of one sample = harmonic mean 2 S O / (S + O) of its success S and
its preservation / over-edit score O, 0 when either is 0. The reported dataset value is the mean of the per-sample
balances; `balance_of_means` (the harmonic mean of the mean S and the mean O) is given beside it because papers differ.
A sample with an undefined score (NaN: empty region, failed judge reply) is left out of every mean and counted.
"""
import numpy as np


def balance(success, preservation) -> np.ndarray:
    """Elementwise harmonic mean, 0 where either score is 0, NaN where either is NaN; negative scores raise."""
    s, o = np.asarray(success, np.float64), np.asarray(preservation, np.float64)
    if np.any(s < 0) or np.any(o < 0):
        raise ValueError("scores must be >= 0")
    total = s + o
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(total > 0, 2.0 * s * o / np.where(total > 0, total, 1.0), 0.0)
    return np.where(np.isnan(s) | np.isnan(o), np.nan, out)


def summarize(success, preservation) -> dict[str, float | int]:
    """Dataset means over the samples where both scores are defined.

    Returns success, preservation, balance (mean of per-sample balances: the reported one), balance_of_means,
    n (samples used) and n_undefined (samples left out); the means are NaN when n is 0.
    """
    s, o = np.asarray(success, np.float64).ravel(), np.asarray(preservation, np.float64).ravel()
    if s.shape != o.shape:
        raise ValueError(f"success and preservation differ in length: {s.shape} vs {o.shape}")
    ok = ~(np.isnan(s) | np.isnan(o))
    n = int(ok.sum())
    if n == 0:
        nan = float("nan")
        return dict(success=nan, preservation=nan, balance=nan, balance_of_means=nan, n=0, n_undefined=int(s.size))
    mean_s, mean_o = float(s[ok].mean()), float(o[ok].mean())
    return dict(success=mean_s, preservation=mean_o, balance=float(balance(s[ok], o[ok]).mean()),
                balance_of_means=float(balance(mean_s, mean_o)), n=n, n_undefined=int(s.size - n))


def nanmean(values) -> tuple[float, int]:
    """(mean ignoring NaN, count of non-NaN values) - PIE-Bench's aggregation of per-image "nan" cells."""
    v = np.asarray(values, np.float64).ravel()
    ok = ~np.isnan(v)
    return (float(v[ok].mean()) if ok.any() else float("nan")), int(ok.sum())
