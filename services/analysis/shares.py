"""Where the evil-minus-safe score goes: its split into features, error nodes, the adapter and
tokens, next to every ranking.

Every source node ``s`` of a graph has a score (:mod:`services.analysis.ranking`): the
first-order change of ``P_evil - P_safe`` if ``s`` were switched off, all paths from ``s``
on. The *total* is the sum over the root nodes (tokens and error nodes, which have no
incoming edges): every path of the graph starts at exactly one root, so the roots' scores
add up to the whole linearised score the graph explains. A share is a score divided by that
total:

- ``errors`` at layer ``l``: the part of the score that starts in layer ``l``'s error nodes
  (what the transcoders do not explain there);
- ``features`` at layer ``l``: what switching off every feature of layer ``l`` would remove
  (no path runs through two nodes of one layer, so their scores add);
- ``adapter`` at layer ``l``: the same for the adapter nodes (:mod:`services.attribution.adapter`),
  i.e. how much of the score runs through the LoRA;
- ``tokens``: the part that starts at the input embeddings.

Shares are signed (a node can push the score the other way) and per-layer feature shares
need not add up to one (a path can cross several layers' features). When error nodes carry
more than the features do, ``ScoreShares.flag`` says so and names the layer: the ranking
of features then explains little of the score.
"""

from __future__ import annotations

import torch

from common.graph.model import AttributionGraph
from common.records import LayerShares, ScoreShares


def _share(x: float, total: float) -> float:
    return x / total if total else 0.0


def score_shares(graph: AttributionGraph, score: torch.Tensor) -> ScoreShares:
    """Shares of a graph's source scores ``score`` ``[S]`` (features, errors, tokens)."""
    f = graph.n_features
    m = graph.manifest
    n_layers, n_pos = m.n_layers, m.n_pos
    feat = score[:f].to(torch.float64)
    err = score[graph.error_slice].to(torch.float64).reshape(n_layers, n_pos)
    tok = score[graph.token_slice].to(torch.float64)
    total = float(err.sum() + tok.sum())
    layers_of = graph.features[:, 0]
    adapter = graph.features[:, 2] < 0
    rows = []
    for layer in range(n_layers):
        in_layer = layers_of == layer
        e = err[layer]
        rows.append(
            LayerShares(
                layer=layer,
                features=_share(float(feat[in_layer & ~adapter].sum()), total),
                errors=_share(float(e.sum()), total),
                adapter=_share(float(feat[in_layer & adapter].sum()), total),
                top_error_pos=int(e.abs().argmax()) if n_pos else None,
            )
        )
    plain = feat[~adapter]
    top = float(plain[plain.abs().argmax()]) if plain.numel() else 0.0
    shares = ScoreShares(
        total=total,
        tokens=_share(float(tok.sum()), total),
        errors=_share(float(err.sum()), total),
        adapter=_share(float(feat[adapter].sum()), total),
        top_feature=_share(top, total),
        layers=rows,
    )
    return shares.model_copy(update={"flag": error_flag(shares)})


def error_flag(shares: ScoreShares) -> str | None:
    """A sentence when some layer's error nodes carry more of the score than the features of
    any layer (by magnitude); None otherwise."""
    if not shares.layers or shares.total == 0:
        return None
    worst = max(shares.layers, key=lambda r: abs(r.errors))
    best = max(shares.layers, key=lambda r: abs(r.features))
    if abs(worst.errors) <= abs(best.features):
        return None
    where = (
        f" (mostly at position {worst.top_error_pos})" if worst.top_error_pos is not None else ""
    )
    return (
        f"error nodes of layer {worst.layer} carry {worst.errors:+.0%} of the score{where}, "
        f"more than the features of any layer (best: layer {best.layer}, {best.features:+.0%}): "
        "the transcoders do not explain it there"
        + (f"; the adapter nodes carry {shares.adapter:+.0%}" if shares.adapter else "")
    )
