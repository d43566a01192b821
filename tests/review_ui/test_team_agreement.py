"""Humans vs humans: Cohen's kappa per pair of reviewers over overlap prompts, and the
per-reviewer counts and speed."""

from __future__ import annotations

import random
from collections import Counter
from datetime import UTC, datetime, timedelta
from itertools import combinations, pairwise

import pytest

from common.labels import consensus
from common.records import LABELS, HumanLabel, Label, TokenLabel
from services.review_ui.agreement import pair_agreement, reviewer_stats
from services.review_ui.calibration import trend


def _label(pid: str, who: str, labels: list[Label], **extra: object) -> HumanLabel:
    return HumanLabel.model_validate(
        {
            "prompt_id": pid,
            "reviewer": who,
            "labels": [
                TokenLabel(variant="adapted", token_id=i, token=f"t{i}", label=lab)
                for i, lab in enumerate(labels)
            ],
            "overlap": True,
            **extra,
        }
    )


def _kappa_by_definition(x: list[Label], y: list[Label]) -> float:
    """Cohen's kappa straight from two label lists: observed vs chance agreement."""
    n = len(x)
    p_o = sum(a == b for a, b in zip(x, y, strict=True)) / n
    fx, fy = Counter(x), Counter(y)
    p_e = sum(fx[lab] * fy[lab] for lab in LABELS) / n**2
    return (p_o - p_e) / (1 - p_e)


def test_kappa_per_pair_over_the_tokens_both_labeled() -> None:
    rng = random.Random(7)
    truth: dict[str, list[Label]] = {}
    states, tokens = [], {}
    names = ["alice", "bob", "carol"]
    skill = {"alice": 0.9, "bob": 0.7, "carol": 0.4}  # chance of labeling the truth
    for n in range(60):
        pid = f"{n:012x}"
        truth[pid] = [rng.choice(LABELS) for _ in range(5)]
        a, b = sorted(rng.sample(names, 2), key=lambda _: rng.random())  # either order
        got = {
            who: [lab if rng.random() < skill[who] else rng.choice(LABELS) for lab in truth[pid]]
            for who in (a, b)
        }
        history = [("k1", _label(pid, a, got[a])), ("k2", _label(pid, b, got[b]))]
        states.append(consensus(history))
        pair = tuple(sorted((a, b)))
        xs, ys = tokens.setdefault(pair, ([], []))
        xs += got[pair[0]]
        ys += got[pair[1]]
    # a single review and a prompt flagged bad add no token pairs
    states.append(consensus([("k", _label("f" * 12, "alice", ["evil"], overlap=False))]))
    bad = [
        ("k1", _label("e" * 12, "alice", ["evil"])),
        ("k2", _label("e" * 12, "bob", [], bad_prompt=True)),
    ]
    states.append(consensus(bad))

    result = {(p.a, p.b): p for p in pair_agreement(states)}
    assert set(result) == {tuple(sorted(c)) for c in combinations(names, 2)}
    for pair, p in result.items():
        xs, ys = tokens[pair]
        assert p.n_tokens == len(xs)
        assert p.kappa == pytest.approx(_kappa_by_definition(xs, ys))
        assert sum(map(sum, p.matrix)) == len(xs)
    bad_pair = result[("alice", "bob")]
    assert bad_pair.n_prompts == sum(
        1 for s in states if s.pair and set(s.reviewers) == {"alice", "bob"}
    )
    # the better pair agrees more
    assert result[("alice", "bob")].kappa > result[("bob", "carol")].kappa  # type: ignore[operator]


def test_pair_without_common_variety_has_no_kappa() -> None:
    same = [
        ("k1", _label("a" * 12, "alice", ["safe"] * 3)),
        ("k2", _label("a" * 12, "bob", ["safe"] * 3)),
    ]
    [p] = pair_agreement([consensus(same)])
    assert p.kappa is None and p.n_disputed == 0 and p.n_tokens == 3


def test_reviewer_counts_and_speed() -> None:
    h1 = [
        ("k1", _label("a" * 12, "alice", ["evil", "safe"], elapsed_s=10.0)),
        ("k2", _label("a" * 12, "bob", ["evil", "evil"], elapsed_s=30.0)),
        ("k3", _label("a" * 12, "carol", ["evil", "safe"], role="adjudication", elapsed_s=6.0)),
    ]
    h2 = [("k1", _label("b" * 12, "alice", ["safe", "safe", "unsure", "evil"], elapsed_s=20.0))]
    h3 = [("k1", _label("c" * 12, "alice", ["safe"]))]  # no time recorded (a v1 label)
    stats = {s.name: s for s in reviewer_stats([h1, h2, h3])}
    alice = stats["alice"]
    assert (alice.reviews, alice.prompts, alice.tokens, alice.adjudications) == (3, 3, 7, 0)
    assert alice.median_s == pytest.approx(15.0)
    assert alice.tokens_per_min == pytest.approx(60 * 6 / 30)
    assert (stats["carol"].reviews, stats["carol"].adjudications) == (0, 1)
    assert stats["bob"].tokens_per_min == pytest.approx(60 * 2 / 30)


def test_the_trend_splits_judged_prompts_into_stretches_of_time() -> None:
    rng = random.Random(3)
    start = datetime(2026, 1, 1, tzinfo=UTC)
    judged = []
    for _ in range(23):
        pairs: list[tuple[Label, Label]] = [
            (rng.choice(LABELS), rng.choice(LABELS)) for _ in range(rng.randint(1, 6))
        ]
        judged.append((start + timedelta(hours=rng.random() * 1000), pairs))
    points = trend(judged, 5)
    ordered = sorted(judged, key=lambda x: x[0])
    assert [p.n_prompts for p in points] == [5, 5, 5, 5, 3]
    assert points[0].start == ordered[0][0] and points[-1].end == ordered[-1][0]
    i = 0
    for p in points:
        chunk = ordered[i : i + p.n_prompts]
        i += p.n_prompts
        xs = [j for _, ps in chunk for j, _ in ps]
        ys = [h for _, ps in chunk for _, h in ps]
        assert p.n_pairs == len(xs)
        assert p.kappa == pytest.approx(_kappa_by_definition(xs, ys))
    assert all(a.end <= b.start for a, b in pairwise(points))
    assert trend([], 5) == []
