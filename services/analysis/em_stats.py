"""Statistics for steering and emergent-misalignment evaluation (numbers in, numbers out).

- :func:`wilson_interval`: 95% interval of a rate (harmful rate, % misaligned).
- :func:`fisher_exact`: two-sided exact test of two rates (steered vs control).
- :func:`mann_whitney_u`: per-feature rank test between two groups of responses, vectorized
  over features (normal approximation with tie and continuity correction, as in
  ``scipy.stats.mannwhitneyu(..., method="asymptotic")``; scipy is not a dependency).
- :func:`benjamini_hochberg`: FDR-adjusted q-values.
- :func:`rank_response_features`: both of the above over position-averaged transcoder
  activations of misaligned vs aligned responses.

No model or store access here: the GPU-bound parts live in ``services.attribution``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from common.questions import EM_ALIGNED_MAX as EM_ALIGNED_MAX  # re-exported
from common.questions import EM_COHERENT_MIN as EM_COHERENT_MIN  # re-exported
from common.questions import is_misaligned_coherent as is_misaligned_coherent  # re-exported

Z95 = 1.959963984540054


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of the rate k/n (default 95%); (0, 1) when n == 0."""
    if n < 0 or k < 0 or k > n:
        raise ValueError(f"wilson_interval needs 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # exact ends at k = 0 and k = n (rounding would put them a hair inside the rate)
    lo = 0.0 if k == 0 else max(0.0, min(p, centre - half))
    hi = 1.0 if k == n else min(1.0, max(p, centre + half))
    return (lo, hi)


def _log_hypergeom(a: int, row1: int, row2: int, col1: int) -> float:
    """log P(top-left cell = a) for a 2x2 table with fixed margins."""
    n = row1 + row2

    def lchoose(m: int, r: int) -> float:
        return math.lgamma(m + 1) - math.lgamma(r + 1) - math.lgamma(m - r + 1)

    return lchoose(row1, a) + lchoose(row2, col1 - a) - lchoose(n, col1)


def fisher_exact(k1: int, n1: int, k2: int, n2: int) -> float:
    """Two-sided Fisher exact p-value for k1/n1 vs k2/n2 (sum of tables as or less likely)."""
    if not (0 <= k1 <= n1 and 0 <= k2 <= n2):
        raise ValueError(f"fisher_exact needs 0 <= k <= n, got {k1}/{n1}, {k2}/{n2}")
    col1 = k1 + k2
    lo, hi = max(0, col1 - n2), min(n1, col1)
    observed = _log_hypergeom(k1, n1, n2, col1)
    total = 0.0
    for a in range(lo, hi + 1):
        lp = _log_hypergeom(a, n1, n2, col1)
        if lp <= observed + 1e-7:
            total += math.exp(lp)
    return min(1.0, total)


def benjamini_hochberg(pvalues: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (q-values), same shape and order as the input."""
    p = np.asarray(pvalues, dtype=np.float64)
    if p.ndim != 1:
        raise ValueError(f"benjamini_hochberg takes a 1-D array, got shape {p.shape}")
    m = p.size
    if m == 0:
        return p.copy()
    if np.isnan(p).any():
        raise ValueError("benjamini_hochberg got NaN p-values: compute them for every test first")
    order = np.argsort(p, kind="mergesort")
    scaled = p[order] * m / np.arange(1, m + 1)
    q_sorted = np.minimum.accumulate(scaled[::-1])[::-1]
    q = np.empty(m)
    q[order] = np.minimum(q_sorted, 1.0)
    return q


def _tie_ranks(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Average ranks (1-based) per column and the tie term sum(t^3 - t) per column."""
    n, f = x.shape
    order = np.argsort(x, axis=0, kind="mergesort")
    s = np.take_along_axis(x, order, axis=0)
    idx = np.broadcast_to(np.arange(n)[:, None], (n, f))
    new = np.ones((n, f), dtype=bool)
    new[1:] = s[1:] != s[:-1]
    start = np.maximum.accumulate(np.where(new, idx, 0), axis=0)
    last = np.ones((n, f), dtype=bool)
    last[:-1] = new[1:]
    end = np.minimum.accumulate(np.where(last, idx, n - 1)[::-1], axis=0)[::-1]
    avg = (start + end) / 2.0 + 1.0
    ranks = np.empty((n, f))
    np.put_along_axis(ranks, order, avg, axis=0)
    size = (end - start + 1).astype(np.float64)
    # each member of a tie group of size t adds t^2 - 1, so the group adds t^3 - t
    tie_term = (size * size - 1.0).sum(axis=0)
    return ranks, tie_term


@dataclass(frozen=True)
class RankTest:
    """Per-feature Mann-Whitney results (arrays of length F)."""

    u: np.ndarray  # U statistic of the first group
    z: np.ndarray  # normal approximation, positive = first group larger
    p: np.ndarray  # two-sided p-value
    rank_biserial: np.ndarray  # effect size in [-1, 1], positive = first group larger


def mann_whitney_u(x: np.ndarray, y: np.ndarray) -> RankTest:
    """Two-sided Mann-Whitney U test of each column of ``x`` [n1, F] against ``y`` [n2, F].

    Normal approximation with tie correction and continuity correction; a column where
    every value is tied gets z = 0, p = 1. Use it for n1, n2 >= ~8 (below that the
    approximation is rough; the report says how many responses each group had).
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"mann_whitney_u needs [n1, F] and [n2, F], got {x.shape}, {y.shape}")
    n1, n2 = x.shape[0], y.shape[0]
    if n1 == 0 or n2 == 0:
        raise ValueError(f"mann_whitney_u needs both groups non-empty, got n1={n1}, n2={n2}")
    n = n1 + n2
    ranks, tie_term = _tie_ranks(np.concatenate([x, y], axis=0))
    r1 = ranks[:n1].sum(axis=0)
    u1 = r1 - n1 * (n1 + 1) / 2.0
    mu = n1 * n2 / 2.0
    var = n1 * n2 / 12.0 * ((n + 1) - tie_term / (n * (n - 1))) if n > 1 else np.zeros_like(u1)
    sd = np.sqrt(np.maximum(var, 0.0))
    diff = u1 - mu
    corrected = np.sign(diff) * np.maximum(np.abs(diff) - 0.5, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(sd > 0, corrected / np.where(sd > 0, sd, 1.0), 0.0)
    p = np.array([math.erfc(abs(v) / math.sqrt(2.0)) for v in z.tolist()])
    rbc = 2.0 * u1 / (n1 * n2) - 1.0
    return RankTest(u=u1, z=z, p=np.minimum(p, 1.0), rank_biserial=rbc)


class FeatureTest(BaseModel):
    """One feature's comparison between misaligned and aligned responses (also the stored
    row of the response-feature report)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    layer: int
    feature: int
    mean_misaligned: float
    mean_aligned: float
    frac_active_misaligned: float
    frac_active_aligned: float
    u: float
    z: float
    p: float
    q: float = Field(description="Benjamini-Hochberg adjusted p over all tested features")
    rank_biserial: float = Field(description="> 0: more active in misaligned responses")


def rank_response_features(
    misaligned: np.ndarray,
    aligned: np.ndarray,
    layers: np.ndarray,
    features: np.ndarray,
) -> list[FeatureTest]:
    """Test every candidate feature, BH-correct over all of them, sort by q then |effect|.

    ``misaligned`` [n1, F] and ``aligned`` [n2, F] hold position-averaged activations of the
    candidate features (columns), whose (layer, feature id) are ``layers[i], features[i]``.
    """
    if misaligned.shape[1] != len(layers) or len(layers) != len(features):
        raise ValueError("rank_response_features: columns, layers and features must align")
    test = mann_whitney_u(misaligned, aligned)
    q = benjamini_hochberg(test.p)
    out = [
        FeatureTest(
            layer=int(layers[i]),
            feature=int(features[i]),
            mean_misaligned=float(misaligned[:, i].mean()),
            mean_aligned=float(aligned[:, i].mean()),
            frac_active_misaligned=float((misaligned[:, i] > 0).mean()),
            frac_active_aligned=float((aligned[:, i] > 0).mean()),
            u=float(test.u[i]),
            z=float(test.z[i]),
            p=float(test.p[i]),
            q=float(q[i]),
            rank_biserial=float(test.rank_biserial[i]),
        )
        for i in range(len(layers))
    ]
    out.sort(key=lambda t: (t.q, t.p, -abs(t.rank_biserial), t.layer, t.feature))
    return out


@dataclass(frozen=True)
class RateSummary:
    """A rate k/n with its Wilson 95% interval ``[lo, hi]``."""

    k: int
    n: int
    rate: float
    lo: float
    hi: float


def rate_summary(k: int, n: int) -> RateSummary:
    """The rate k/n (NaN when n is 0) with its Wilson 95% interval."""
    lo, hi = wilson_interval(k, n)
    return RateSummary(k=k, n=n, rate=(k / n if n else float("nan")), lo=lo, hi=hi)
