"""Statistics shared by the rollout guards and monitoring: one implementation of each, in one place.

- PSI (population stability index): bins from quantiles of the reference, a small epsilon on every
  share. `psi` takes two samples (the rollout's two arms); monitoring has no reference sample, only its
  profile, so it asks `psi_bin_edges` for the same bins from the profile's quantiles and hands the
  reference shares it derives to `psi_from_shares`, the one formula both use.
- Benjamini-Hochberg: which of several p-values stay significant when the false discovery rate across
  them is controlled at `q` (monitoring tests many features per window).

Pure numpy: no I/O, no pandas objects in or out.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

PSI_EPSILON = 1e-4  # added to every bin share, so an empty bin costs a finite amount


def psi_bin_edges(quantiles: np.ndarray) -> np.ndarray:
    """PSI bin edges from the reference's quantiles at `np.linspace(0, 1, bins + 1)`: the distinct
    quantiles, the outer two widened to +-inf so every current value falls in a bin."""
    q = np.asarray(quantiles, float)
    edges = np.unique(q)
    if len(edges) < 2:  # a constant reference
        edges = np.array([q[0] - 1e-9, q[0] + 1e-9])
    edges[0], edges[-1] = -np.inf, np.inf
    return edges


def psi_from_shares(expected: np.ndarray, actual: np.ndarray, eps: float = PSI_EPSILON) -> float:
    """PSI of `actual` bin shares against `expected` ones (the same bins, each side summing to 1)."""
    e = np.asarray(expected, float) + eps
    a = np.asarray(actual, float) + eps
    return float(np.sum((a - e) * np.log(a / e)))


def psi(reference: np.ndarray, current: np.ndarray, bins: int = 10) -> float:
    """Population stability index of `current` against `reference` (quantile bins of the reference)."""
    ref, cur = np.asarray(reference, float), np.asarray(current, float)
    edges = psi_bin_edges(np.quantile(ref, np.linspace(0, 1, bins + 1)))
    e = np.histogram(ref, edges)[0] / len(ref)
    a = np.histogram(cur, edges)[0] / len(cur)
    return psi_from_shares(e, a)


def benjamini_hochberg(pvalues: Sequence[float], q: float) -> list[bool]:
    """Which hypotheses are rejected at false discovery rate `q` (Benjamini-Hochberg step-up).

    The p-values sorted ascending, p_(1) <= ... <= p_(m): the largest k with p_(k) <= k/m * q is found
    and the k smallest are rejected. Returned in the input order."""
    if not 0 < q < 1:
        raise ValueError(f"q must be in (0, 1), got {q}")
    p = np.asarray(pvalues, float)
    m = len(p)
    if m == 0:
        return []
    order = np.argsort(p, kind="stable")
    below = p[order] <= q * np.arange(1, m + 1) / m
    rejected = np.zeros(m, bool)
    if below.any():
        k = int(np.nonzero(below)[0].max())
        rejected[order[: k + 1]] = True
    return rejected.tolist()
