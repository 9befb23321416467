"""Comparing BSQ outputs with the official fixtures at exact ties (see fixtures/quantizer/README.md).

Bits must agree except where the BSQ input is within `TIE` of 0: there rounding noise of the official fp32 code
decides. To compare later floats anyway, the official bit decision is teacher-forced at those positions (code
negation on the tokenizer path, bit flip + requant on the trainer path) and the run repeated, earliest scale first.
"""
import numpy as np

TIE = 1e-5


def nhwc(x: np.ndarray) -> np.ndarray:
    """Fixture NCHW -> NHWC."""
    return np.transpose(np.asarray(x), (0, 2, 3, 1))


def teacher_force(run, official: list[np.ndarray], ties: list[np.ndarray], to_override):
    """Runs `run(override_or_None) -> (output, per-scale bits)` until its bits equal `official` outside forced ties.

    official / ties: per-scale arrays of the same shapes as the bits `run` returns (ties: bool, |residual| < TIE).
    to_override: list of per-scale bool masks -> the override argument of `run`.
    Returns (output, number of forced tie bits). Fails if any bit differs away from a tie.
    """
    forced = [np.zeros(np.shape(o), bool) for o in official]
    for _ in range(len(official) + 1):
        out, mine = run(to_override(forced) if any(f.any() for f in forced) else None)
        new = [(np.asarray(m) != np.asarray(o)) & ~f for m, o, f in zip(mine, official, forced)]
        off_tie = [int((n & ~t).sum()) for n, t in zip(new, ties)]
        assert sum(off_tie) == 0, f"bits differ away from ties (per scale: {off_tie})"
        first = next((k for k, n in enumerate(new) if n.any()), None)
        if first is None:
            return out, int(sum(f.sum() for f in forced))
        forced[first] |= new[first]
    raise AssertionError("teacher forcing did not converge")


def max_err(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)))) if np.size(a) else 0.0
