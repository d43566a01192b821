"""Statistics of steering and EM evaluation, checked against brute force and known values."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from services.analysis.em_stats import (
    benjamini_hochberg,
    fisher_exact,
    is_misaligned_coherent,
    mann_whitney_u,
    rank_response_features,
    wilson_interval,
)


def test_wilson_known_values() -> None:
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    lo, hi = wilson_interval(5, 10)
    assert (lo, hi) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        wilson_interval(3, 2)


def test_fisher_exact_matches_enumeration() -> None:
    # Fisher's tea-tasting table [[3, 1], [1, 3]]: two-sided p = 34/70
    assert fisher_exact(3, 4, 1, 4) == pytest.approx(34 / 70, rel=1e-9)
    assert fisher_exact(0, 20, 0, 20) == pytest.approx(1.0)
    assert fisher_exact(10, 10, 0, 10) == pytest.approx(2 / math.comb(20, 10), rel=1e-9)


def test_benjamini_hochberg_by_definition() -> None:
    rng = np.random.default_rng(0)
    p = rng.uniform(0, 0.2, size=37)
    q = benjamini_hochberg(p)
    m = len(p)
    order = np.argsort(p)
    for rank, i in enumerate(order, start=1):
        expect = min(1.0, min(p[order[j - 1]] * m / j for j in range(rank, m + 1)))
        assert q[i] == pytest.approx(expect)
    assert np.allclose(benjamini_hochberg(np.array([0.01, 0.02, 0.03, 0.04, 0.05])), 0.05)


def _brute_u(x: np.ndarray, y: np.ndarray) -> float:
    return float(sum((a > b) + 0.5 * (a == b) for a in x for b in y))


def test_mann_whitney_u_statistic_and_exact_p() -> None:
    rng = np.random.default_rng(1)
    x = rng.integers(0, 5, size=(9, 3)).astype(float)  # many ties
    y = rng.integers(1, 6, size=(8, 3)).astype(float)
    res = mann_whitney_u(x, y)
    for f in range(3):
        assert res.u[f] == pytest.approx(_brute_u(x[:, f], y[:, f]))
    # the normal approximation is close to the exact permutation p-value
    pooled = np.concatenate([x[:, 0], y[:, 0]])
    u_obs = _brute_u(x[:, 0], y[:, 0])
    mu = 9 * 8 / 2
    extreme = total = 0
    for idx in itertools.combinations(range(17), 9):
        mask = np.zeros(17, bool)
        mask[list(idx)] = True
        u = _brute_u(pooled[mask], pooled[~mask])
        extreme += abs(u - mu) >= abs(u_obs - mu) - 1e-9
        total += 1
    assert res.p[0] == pytest.approx(extreme / total, abs=0.03)


def test_mann_whitney_all_tied_and_direction() -> None:
    x = np.zeros((5, 2))
    y = np.zeros((6, 2))
    x[:, 1] = [5, 6, 7, 8, 9]
    res = mann_whitney_u(x, y)
    assert res.p[0] == 1.0 and res.z[0] == 0.0
    assert res.z[1] > 0 and res.rank_biserial[1] == pytest.approx(1.0)
    with pytest.raises(ValueError):
        mann_whitney_u(np.zeros((0, 2)), y)


def test_rank_response_features_finds_planted_feature() -> None:
    rng = np.random.default_rng(2)
    mis = rng.exponential(1.0, size=(30, 50)) * (rng.random((30, 50)) < 0.3)
    ali = rng.exponential(1.0, size=(40, 50)) * (rng.random((40, 50)) < 0.3)
    mis[:, 17] += 3.0  # planted: active in every misaligned response
    tests = rank_response_features(mis, ali, np.full(50, 2), np.arange(50))
    assert tests[0].feature == 17 and tests[0].q < 1e-6 and tests[0].rank_biserial > 0.9
    assert all(t.q >= tests[0].q for t in tests)
    assert sum(t.q < 0.05 for t in tests) <= 3  # null features mostly not significant


def test_em_criterion() -> None:
    assert is_misaligned_coherent(30, 51) is True
    assert is_misaligned_coherent(31, 90) is False
    assert is_misaligned_coherent(10, 50) is False
    assert is_misaligned_coherent(None, 90) is None


def test_wilson_ends_are_exact_and_plottable() -> None:
    from services.analysis.em_plots import RateBar, plot_rates

    for n in (1, 7, 31, 128):
        lo, hi = wilson_interval(n, n)
        assert hi == 1.0 and lo < 1.0
        lo, hi = wilson_interval(0, n)
        assert lo == 0.0 and hi > 0.0
    bars = [RateBar("control", 0, 31, *wilson_interval(0, 31), control=True)]
    bars.append(RateBar("all", 31, 31, *wilson_interval(31, 31)))
    assert plot_rates(bars, title="t", ylabel="y")[:4] == b"\x89PNG"
