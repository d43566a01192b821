"""Score shares: the split of the evil-minus-safe score over node kinds and layers."""

from __future__ import annotations

import torch

from common.graph.influence import logit_influence
from services.analysis.shares import score_shares
from tests.analysis.synthetic import linear_net


def _weights(k: int) -> torch.Tensor:
    w = torch.zeros(k, dtype=torch.float64)
    w[0], w[1] = 1.0, -1.0
    return w


def test_roots_add_up_and_layers_are_what_switching_them_off_removes() -> None:
    net = linear_net(seed=3, n_layers=3)
    g = net.graph
    inf = logit_influence(g)
    w = _weights(g.manifest.n_logits)
    score = w @ inf.total
    shares = score_shares(g, score)
    assert abs(shares.tokens + shares.errors - 1.0) < 1e-9  # every path starts at one root
    for row in shares.layers:
        # switching off all of a layer's features at once, in the real network
        on = net.run()
        nodes = [i for i in range(g.n_features) if int(g.features[i, 0]) == row.layer]
        weights, bias = net.weights.clone(), net.bias.clone()
        weights[nodes] = 0.0  # a switched-off feature is 0 whatever its inputs
        bias[nodes] = 0.0
        off = type(net)(g, weights, bias, net.inputs).run()
        removed = float(w @ (on - off))
        assert abs(row.features * shares.total - removed) < 1e-6 * max(1.0, abs(removed))


def test_error_nodes_carrying_more_than_features_are_flagged() -> None:
    net = linear_net(seed=1, n_layers=3)
    g = net.graph
    w = _weights(g.manifest.n_logits)
    score = w @ logit_influence(g).total
    e0 = g.error_slice.start + g.manifest.n_pos * 1 + 2  # layer 1, position 2
    boosted = score.clone()
    boosted[e0] = 50.0 * float(score.abs().max())
    shares = score_shares(g, boosted)
    assert shares.flag is not None and "error nodes of layer 1" in shares.flag
    assert "position 2" in shares.flag
    assert max(abs(r.errors) for r in shares.layers) == abs(shares.layers[1].errors)
    assert score_shares(g, torch.zeros_like(score)).flag is None


def test_diff_ranking_orders_nodes_by_the_change_of_their_contribution() -> None:
    from common.diff import prompt_diff
    from common.records import FeatureRanking, LayerShares, RankedFeature, ScoreShares

    def ranking(
        variant: str, feats: list[tuple[int, int, int, float]], err1: float
    ) -> FeatureRanking:
        shares = ScoreShares(
            total=1.0,
            tokens=0.1,
            errors=err1,
            adapter=0.0,
            top_feature=0.0,
            layers=[
                LayerShares(layer=0, features=0, errors=0.0),
                LayerShares(layer=1, features=0, errors=err1),
            ],
        )
        return FeatureRanking(
            prompt_id="p",
            variant=variant,
            fingerprint="f",
            labels_version="v",
            label_source="judge",
            evil_token_ids=[1],
            safe_token_ids=[2],
            shares=shares,
            features=[
                RankedFeature(
                    layer=lay,
                    pos=p,
                    feature=i,
                    token="t",
                    score=sc,
                    evil=sc,
                    safe=0.0,
                    activation=1.0,
                )
                for lay, p, i, sc in feats
            ],
        )

    base = ranking("base", [(2, 3, 7, 0.01), (2, 3, 8, 0.05)], err1=0.1)
    adapted = ranking("adapted", [(2, 3, 7, 0.30), (1, 3, -1, 0.20)], err1=0.5)
    diff = prompt_diff(base, adapted)
    assert [n.label for n in diff.nodes[:3]] == ["L1 errors", "L2/F7@3", "L1/adapter@3"]
    by = {n.label: n for n in diff.nodes}
    assert by["L2/F8@3"].variant == 0.0 and by["L2/F8@3"].change == -0.05  # absent = 0
    assert by["L1/adapter@3"].kind == "adapter" and by["L1/adapter@3"].reference == 0.0


def test_diff_from_digests_equals_the_diff_from_rankings_and_a_full_sort() -> None:
    """The analysis page's diff from the rankings' digests, which build records only for the
    nodes that can make the top, is the diff of every node fully sorted (ties included)."""
    import random

    from common.diff import NodeChange, prompt_diff
    from common.records import FeatureRanking, RankedFeature, RankingDigest, node_label

    rng = random.Random(3)

    def ranking(variant: str) -> FeatureRanking:
        feats = {(rng.randrange(4), rng.randrange(6), rng.randrange(-1, 50)) for _ in range(400)}
        rows = [
            RankedFeature(
                layer=layer,
                pos=pos,
                feature=feat,
                token="t",
                score=round(rng.gauss(0, 1), 1),  # coarse: many ties
                evil=0.0,
                safe=0.0,
                activation=1.0,
            )
            for layer, pos, feat in sorted(feats)
        ]
        rows.sort(key=lambda r: -r.score)
        return FeatureRanking(
            prompt_id="p",
            variant=variant,
            fingerprint="f",
            labels_version="v",
            label_source="judge",
            evil_token_ids=[1],
            safe_token_ids=[2],
            features=rows,
        )

    base, adapted = ranking("base"), ranking("adapted")
    keyed: dict[tuple[int, int, int], list[float]] = {}
    for which, r in ((0, base), (1, adapted)):
        for f in r.features:
            keyed.setdefault((f.layer, f.pos, f.feature), [0.0, 0.0])[which] += f.score
    everything = sorted(
        (
            NodeChange(
                label=f"{node_label(layer, feat)}@{pos}",
                kind="adapter" if feat < 0 else "feature",
                layer=layer,
                pos=pos,
                feature=feat,
                reference=a,
                variant=b,
            )
            for (layer, pos, feat), (a, b) in keyed.items()
        ),
        key=lambda n: (-abs(n.change), n.label),
    )
    for top in (1, 7, 30, 10_000):
        full = prompt_diff(base, adapted, top=top)
        assert full.nodes == everything[:top]
        digests = prompt_diff(RankingDigest.of(base, rows=5), RankingDigest.of(adapted, rows=5))
        assert digests == prompt_diff(base, adapted)
