"""Aggregation over prompts and the reference-vs-variant comparison (hand-computed cases)."""

from __future__ import annotations

import pytest

from common.records import FeatureRanking, RankedFeature
from services.analysis.aggregate import PromptFeatures, aggregate, compare, feature_changes
from tests.analysis.synthetic import linear_net


def ranking(
    pid: str, rows: list[tuple[int, int, int, float, float]], variant: str = "adapted"
) -> FeatureRanking:
    """rows: (layer, pos, feature, score, activation)."""
    return FeatureRanking(
        prompt_id=pid,
        variant=variant,
        fingerprint="fp",
        labels_version="v",
        label_source="judge",
        evil_token_ids=[1],
        safe_token_ids=[2],
        features=[
            RankedFeature(
                layer=layer,
                pos=pos,
                feature=feat,
                token=f"t{pos}",
                score=s,
                evil=s,
                safe=0.0,
                activation=a,
            )
            for layer, pos, feat, s, a in rows
        ],
    )


def test_aggregate_folds_positions_and_averages_over_all_prompts() -> None:
    rs = [
        ranking("p1", [(2, 3, 7, 1.0, 2.0), (2, 4, 7, 0.5, 1.0), (0, 1, 5, -0.2, 1.0)]),
        ranking("p2", [(2, 3, 7, 0.9, 1.0), (1, 2, 9, 0.3, 3.0)]),
        ranking("p3", [(2, 4, 7, -0.1, 0.5), (0, 1, 5, -0.4, 2.0)]),
    ]
    agg = aggregate(rs, experiment="e", fingerprint="fp", variant="adapted")
    rows = {(r.layer, r.feature): r for r in agg.features}
    f7 = rows[(2, 7)]
    assert f7.mean_score == pytest.approx((1.5 + 0.9 - 0.1) / 3)
    assert f7.mean_score_present == pytest.approx((1.5 + 0.9 - 0.1) / 3)
    assert f7.n_prompts == 3 and f7.frac_prompts == pytest.approx(1.0)
    assert f7.sign_consistency == pytest.approx(2 / 3)
    assert f7.mean_activation == pytest.approx((3.0 + 1.0 + 0.5) / 3)
    assert f7.top_prompts[0] == "p1" and f7.tokens[0] in {"t3", "t4"}
    f9 = rows[(1, 9)]  # present in one prompt of three: absent counts as 0 in the mean
    assert f9.mean_score == pytest.approx(0.1) and f9.mean_score_present == pytest.approx(0.3)
    f5 = rows[(0, 5)]
    assert f5.mean_score == pytest.approx(-0.2) and f5.sign_consistency == pytest.approx(1.0)
    assert f5.top_prompts[0] == "p3"  # most negative first for a negative feature
    assert [(r.layer, r.feature) for r in agg.features] == [(2, 7), (1, 9), (0, 5)]
    shares = {s.layer: s for s in agg.layers}
    assert shares[0].negative == pytest.approx(-0.2) and shares[0].positive == 0.0
    assert shares[2].positive == pytest.approx(f7.mean_score)


def test_aggregate_keeps_both_ends_when_truncating() -> None:
    rows = [(1, 1, i, float(i - 5), 1.0) for i in range(11)]  # scores -5..5
    agg = aggregate([ranking("p", rows)], experiment="e", fingerprint="fp", variant="a", top_n=4)
    assert [r.mean_score for r in agg.features] == [5.0, 4.0, -4.0, -5.0]
    assert agg.n_features_total == 11 and sum(s.n_features for s in agg.layers) == 11


def test_compare_reference_and_variant() -> None:
    base = ranking("p1", [(1, 2, 4, 0.1, 1.0)], variant="base")
    adapted = ranking("p1", [(1, 2, 4, 0.6, 3.0), (2, 3, 8, 0.9, 2.0)])
    unscored = PromptFeatures("p2", {(1, 4): 1.0}, None)
    adapted2 = PromptFeatures.from_ranking(ranking("p2", [(1, 2, 4, 0.2, 1.0)]))
    pairs = [
        (PromptFeatures.from_ranking(base), PromptFeatures.from_ranking(adapted)),
        (unscored, adapted2),
    ]
    rows = {(c.layer, c.feature): c for c in feature_changes(pairs)}
    c4 = rows[(1, 4)]
    assert c4.reference_activation == pytest.approx(1.0) and c4.variant_activation == pytest.approx(
        2.0
    )
    assert c4.reference_score == pytest.approx(0.1) and c4.variant_score == pytest.approx(0.6)
    assert c4.d_score == pytest.approx(0.5)
    c8 = rows[(2, 8)]
    assert c8.reference_activation == 0.0 and c8.d_activation == pytest.approx(1.0)
    cmp = compare(pairs, experiment="e", fingerprint="fp", reference="base", variant="adapted")
    assert cmp.scored_prompt_ids == ["p1"]
    assert [(c.layer, c.feature) for c in cmp.by_score] == [(2, 8), (1, 4)]
    with pytest.raises(ValueError, match="same prompt"):
        feature_changes([(unscored, PromptFeatures.from_ranking(adapted))])


def test_prompt_features_from_graph() -> None:
    g = linear_net(seed=1).graph
    pf = PromptFeatures.from_graph(g)
    assert pf.scores is None
    assert sum(pf.activations.values()) == pytest.approx(float(g.activations.sum()), rel=1e-5)
