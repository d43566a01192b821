"""Synthetic attribution graphs with a known answer: a random *linear* layered network.

Every feature's activation equals its pre-activation (a linear stand-in for an active
JumpReLU), plus a bias that is not a graph node, so switching a node off and re-running
the network gives the exact total effect that the influence computation must reproduce.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from common.graph.model import AttributionGraph
from common.records import GraphManifest


@dataclass
class LinearNet:
    """Ground truth behind a synthetic graph."""

    graph: AttributionGraph
    weights: torch.Tensor  # [N, N] float64, rows = targets; per-unit weights
    bias: torch.Tensor  # [F] float64
    inputs: torch.Tensor  # [E + T] float64 values of error and token nodes

    def run(self, off: int | None = None, factor: float = 0.0) -> torch.Tensor:
        """Logits [K] of the network; source ``off`` scaled by ``factor`` (0: switched off)."""
        g = self.graph
        f = g.n_features
        n_src = g.token_slice.stop
        values = torch.zeros(n_src, dtype=torch.float64)
        values[f:] = self.inputs
        if off is not None and off >= f:
            values[off] *= factor
        order = sorted(range(f), key=lambda i: int(g.features[i, 0]))
        for t in order:
            values[t] = self.weights[t, :n_src] @ values + self.bias[t]
            if t == off:
                values[t] *= factor
        return self.weights[g.logit_slice, :n_src] @ values


def linear_net(
    n_layers: int = 3,
    n_pos: int = 4,
    per_cell: int = 2,
    n_logits: int = 3,
    seed: int = 0,
    density: float = 0.6,
) -> LinearNet:
    """A random layered linear network and its attribution graph (circuit-tracer layout)."""
    gen = torch.Generator().manual_seed(seed)
    feats = [
        (layer, pos, 100 * layer + 10 * pos + j)
        for layer in range(n_layers)
        for pos in range(1, n_pos)
        for j in range(per_cell)
    ]
    # shuffle so the node order is not topological (circuit-tracer orders by influence)
    perm = torch.randperm(len(feats), generator=gen).tolist()
    feats = [feats[i] for i in perm]
    f = len(feats)
    e = n_layers * n_pos
    n_src = f + e + n_pos
    n = n_src + n_logits
    w = torch.zeros(n, n, dtype=torch.float64)

    def src_ok(t_layer: int | None, t_pos: int, s: int) -> bool:
        """Causal, layer-ordered edges only."""
        if s < f:
            sl, sp, _ = feats[s]
            return (t_layer is None or sl < t_layer) and sp <= t_pos
        if s < f + e:
            sl, sp = divmod(s - f, n_pos)
            return (t_layer is None or sl < t_layer) and sp <= t_pos
        return (s - f - e) <= t_pos

    for t in range(f):
        tl, tp, _ = feats[t]
        for s in range(n_src):
            if src_ok(tl, tp, s) and torch.rand(1, generator=gen) < density:
                w[t, s] = torch.randn(1, generator=gen, dtype=torch.float64) * 0.7
    for k in range(n_logits):
        for s in range(n_src):
            if src_ok(None, n_pos - 1, s) and torch.rand(1, generator=gen) < density:
                w[n_src + k, s] = torch.randn(1, generator=gen, dtype=torch.float64)
    bias = torch.randn(f, generator=gen, dtype=torch.float64) * 0.3
    inputs = torch.randn(e + n_pos, generator=gen, dtype=torch.float64)

    net = LinearNet(graph=None, weights=w, bias=bias, inputs=inputs)  # type: ignore[arg-type]
    manifest = make_manifest(n_layers, n_pos, f, n_logits)
    features = torch.tensor(feats, dtype=torch.int64)
    # activations from a forward pass; edges = source value * per-unit weight
    placeholder = AttributionGraph(
        manifest, torch.zeros(n, n), features, torch.zeros(f, dtype=torch.float32)
    )
    net.graph = placeholder
    values = _values(net)
    adjacency = (w[:, :n_src] * values[None, :]).to(torch.float32)
    full = torch.zeros(n, n, dtype=torch.float32)
    full[:f, :n_src] = adjacency[:f]
    full[n_src:, :n_src] = adjacency[n_src:]
    net.graph = AttributionGraph(manifest, full, features, values[:f].to(torch.float32))
    # the graph stores float32 activations; make the truth use exactly those numbers
    return net


def _values(net: LinearNet) -> torch.Tensor:
    g = net.graph
    f = g.n_features
    values = torch.zeros(g.token_slice.stop, dtype=torch.float64)
    values[f:] = net.inputs
    for t in sorted(range(f), key=lambda i: int(g.features[i, 0])):
        values[t] = net.weights[t, : g.token_slice.stop] @ values + net.bias[t]
    return values


def make_manifest(
    n_layers: int,
    n_pos: int,
    n_features: int,
    n_logits: int,
    *,
    prompt_id: str = "synthetic000",
    variant: str = "adapted",
    logit_token_ids: list[int] | None = None,
    logit_tokens: list[str] | None = None,
    logit_probabilities: list[float] | None = None,
) -> GraphManifest:
    ids = logit_token_ids or [1000 + k for k in range(n_logits)]
    return GraphManifest(
        prompt_id=prompt_id,
        variant=variant,
        fingerprint="fp-synthetic",
        prompt_text="synthetic",
        input_ids=list(range(n_pos)),
        input_tokens=[f"t{i}" for i in range(n_pos)],
        n_layers=n_layers,
        n_pos=n_pos,
        n_features=n_features,
        n_logits=n_logits,
        logit_token_ids=ids,
        logit_tokens=logit_tokens or [f"w{k}" for k in range(n_logits)],
        logit_probabilities=logit_probabilities or _default_probs(n_logits),
        adjacency_dtype="float32",
        tensors={},
        limits={},
    )


def _default_probs(n: int) -> list[float]:
    """Decreasing probabilities covering 90% of the vocabulary's mass."""
    raw = [1.0 / (k + 2) for k in range(n)]
    return [0.9 * r / sum(raw) for r in raw]
