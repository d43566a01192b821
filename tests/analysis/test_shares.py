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
