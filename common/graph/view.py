"""What the review UI's graph viewer draws: the pruned graph of one prompt, every variant on
the same nodes, built from the stored graph artifacts (not circuit-tracer's viewer format).

Every variant of a prompt is attributed on the same logit targets (the union of their
top-k), so a node means the same thing in each graph and is drawn in the same place:

- **nodes** are transcoder features, adapter nodes (negative feature ids), error nodes
  ``(layer, pos)``, input tokens and logits. A node's ``score`` in a variant is its
  evil-minus-safe score (:mod:`common.graph.scores`): the first-order change of
  ``P_evil - P_safe`` if it were switched off. Logits carry their probability and label.
- **edges** carry the stored weight ``A[t, s]`` and the part of the score that runs
  through them, ``carried = A[t, s] * score_t / a_t`` into a feature ``t`` (what switching
  off the edge alone would remove) and ``A[k, s] * w_k`` into a logit ``k`` (``w`` the
  evil-minus-safe weight of each logit). Edges into logits are the stored logit rows,
  which include what pruned feature edges carried (``docs/graph-format.md``).
- **diff** of a variant: its value minus the reference's, where the node (edge) exists in
  both graphs; an adapter node or a feature active in one variant only has no diff.

Labels: one token means one continuation of this prompt, so the labels of all variants are
merged (human where present, else the judge's, per :func:`common.labels.resolve_labels`);
a token that two variants label differently counts in neither group and is reported.

Pruning for display: per variant, the feature, adapter and error nodes with the largest
``|score|`` that together hold ``node_mass`` of its total (at most ``max_nodes``; the
strongest adapter node of each layer always), then the edges among the nodes shown by
``|carried|`` (``edge_mass``, at most ``max_edges``). With no evil token to explain, the
nodes' influence on the logits (probability-weighted) takes the score's place.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from common.errors import AnalysisError, NothingToExplain
from common.experiment import Experiment
from common.graph.artifact import graph_exists, load_graph
from common.graph.influence import logit_influence
from common.graph.model import AttributionGraph
from common.graph.scores import direction_weights
from common.labels import resolve_labels
from common.records import Label, node_label
from common.store import CorruptArtifact, NotFound, ObjectStore, keys

VIEW_VERSION = 1

ViewKind = Literal["feature", "adapter", "error", "token", "logit"]


class ViewLimits(BaseModel):
    """How much of each variant's graph is drawn."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    node_mass: float = Field(default=0.8, gt=0, le=1)
    max_nodes: int = Field(default=120, ge=1)
    edge_mass: float = Field(default=0.9, gt=0, le=1)
    max_edges: int = Field(default=400, ge=1)


class NodeValue(BaseModel):
    """A node in one variant's graph."""

    model_config = ConfigDict(extra="forbid")
    score: float | None = Field(description="evil-minus-safe score; None for logits")
    activation: float | None = None
    probability: float | None = Field(default=None, description="logits only")


class ViewNode(BaseModel):
    """One drawn node: where it sits in the grid and its value per variant."""

    model_config = ConfigDict(extra="forbid")
    id: str
    kind: ViewKind
    layer: int | None = None
    pos: int | None = None
    feature: int | None = None
    token_id: int | None = None
    label: str
    token: str = Field(description="input token at pos, or the logit's token")
    verdict: Label | None = Field(default=None, description="logits: the label used")
    row: int = Field(description="0 = tokens, 1 + layer, n_layers + 1 = logits")
    col: int = Field(description="position; logits: rank by probability")
    slot: int = Field(description="index among the nodes of the same (row, col)")
    slots: int
    values: dict[str, NodeValue] = Field(description="variant -> value, where the node exists")
    diff: dict[str, float] = Field(
        default_factory=dict,
        description="variant -> score (logits: probability) minus the reference's",
    )


class EdgeValue(BaseModel):
    """An edge's weight in one variant and the part of the score it carries."""

    model_config = ConfigDict(extra="forbid")
    weight: float
    carried: float


class ViewEdge(BaseModel):
    """One drawn edge, its value per variant and its difference to the reference."""

    model_config = ConfigDict(extra="forbid")
    source: str
    target: str
    values: dict[str, EdgeValue]
    diff: dict[str, float] = Field(default_factory=dict, description="carried minus reference's")


class VariantSummary(BaseModel):
    """What one variant's graph explains and how much of it is drawn."""

    model_config = ConfigDict(extra="forbid")
    total: float = Field(description="sum of the root nodes' scores: the whole linearised score")
    features: int = Field(description="feature and adapter nodes in the stored graph")
    shown_mass: float = Field(description="share of the |score| mass of the nodes shown")
    nothing_to_explain: str | None = None


class GraphView(BaseModel):
    """The viewer's document for one prompt (every variant with a stored graph)."""

    model_config = ConfigDict(extra="forbid")
    schema_version: int = VIEW_VERSION
    prompt_id: str
    fingerprint: str
    prompt_text: str
    tokens: list[str]
    n_layers: int
    reference: str
    variants: list[str] = Field(description="variants with a graph, the reference first")
    diffs: list[str] = Field(description="variants shown as a diff against the reference")
    evil_token_ids: list[int]
    safe_token_ids: list[int]
    label_conflicts: list[int] = Field(description="tokens labelled differently by variants")
    summaries: dict[str, VariantSummary]
    limits: ViewLimits
    nodes: list[ViewNode]
    edges: list[ViewEdge]


class NoGraphToView(LookupError):
    """No variant of the prompt has a stored graph (yet)."""


# ----------------------------------------------------------------------------- one variant


@dataclass
class _Scored:
    """One variant's graph with the score of every source node."""

    graph: AttributionGraph
    score: torch.Tensor  # [S] float64
    weights: torch.Tensor  # [K] float64 evil-minus-safe weight per logit
    importance: torch.Tensor  # [S] what node pruning ranks by
    nothing: str | None
    index: dict[str, int] = field(default_factory=dict)  # node id -> graph index

    @property
    def total(self) -> float:
        g = self.graph
        return float(self.score[g.n_features : g.token_slice.stop].sum())


def _score(graph: AttributionGraph, labels: Mapping[int, Label]) -> _Scored:
    inf = logit_influence(graph, count_hops=False)
    nothing = None
    try:
        w_evil, w_safe, _, _ = direction_weights(graph, labels)
        weights = w_evil - w_safe
    except NothingToExplain as e:
        nothing = e.reason
        weights = torch.zeros(graph.manifest.n_logits, dtype=torch.float64)
    score = weights @ inf.total
    importance = score.abs()
    if not bool(importance.any()):
        probs = torch.tensor(graph.manifest.logit_probabilities, dtype=torch.float64)
        importance = probs @ inf.total.abs()
    scored = _Scored(graph, score, weights, importance, nothing)
    scored.index = _node_index(graph)
    return scored


def _node_index(graph: AttributionGraph) -> dict[str, int]:
    m = graph.manifest
    out = {
        _feature_id(layer, pos, feat): i
        for i, (layer, pos, feat) in enumerate(graph.features.tolist())
    }
    e0, t0, k0 = graph.error_slice.start, graph.token_slice.start, graph.logit_slice.start
    for layer in range(m.n_layers):
        for pos in range(m.n_pos):
            out[f"e{layer}.{pos}"] = e0 + layer * m.n_pos + pos
    for pos in range(m.n_pos):
        out[f"t{pos}"] = t0 + pos
    for k, tid in enumerate(m.logit_token_ids):
        out[f"l{tid}"] = k0 + k
    return out


def _feature_id(layer: int, pos: int, feature: int) -> str:
    return f"f{layer}.{pos}.{feature}"


def _top_mass(values: np.ndarray, mass: float, cap: int) -> list[int]:
    """Indices of the largest ``values`` (non-negative) holding ``mass`` of their sum, at
    most ``cap``, largest first; zeros never."""
    order = np.argsort(-values, kind="stable")
    order = order[values[order] > 0][:cap]
    if order.size == 0:
        return []
    cum = np.cumsum(values[order])
    total = float(values.sum())
    n = min(int(np.searchsorted(cum, mass * total * (1 - 1e-12))) + 1, order.size)
    return [int(i) for i in order[:n]]


def _shown_nodes(s: _Scored, limits: ViewLimits) -> list[int]:
    """Graph indices of the feature, adapter and error nodes drawn for this variant."""
    g = s.graph
    candidates = g.error_slice.stop  # features and errors
    imp = s.importance[:candidates].numpy()
    chosen = set(_top_mass(imp, limits.node_mass, limits.max_nodes))
    feats = g.features
    for layer in torch.unique(feats[feats[:, 2] < 0, 0]).tolist():
        rows = ((feats[:, 2] < 0) & (feats[:, 0] == layer)).nonzero().flatten()
        chosen.add(int(rows[int(s.importance[rows].argmax())]))
    return sorted(chosen)


# ----------------------------------------------------------------------------- whole view


def graph_view(
    graphs: Mapping[str, AttributionGraph],
    labels: Mapping[int, Label],
    *,
    reference: str,
    limits: ViewLimits | None = None,
    label_conflicts: Sequence[int] = (),
) -> GraphView:
    """The viewer document of one prompt's graphs (``variant -> graph``, same prompt)."""
    limits = limits or ViewLimits()
    if not graphs:
        raise ValueError("no graph to view")
    names = sorted(graphs, key=lambda v: (v != reference, v))
    first = graphs[names[0]].manifest
    for v in names[1:]:
        m = graphs[v].manifest
        if m.input_ids != first.input_ids or m.n_layers != first.n_layers:
            raise AnalysisError(
                f"graphs of {names[0]} and {v} are not of the same prompt and model depth",
                prompt_id=first.prompt_id,
                variant=v,
            )
    scored = {v: _score(graphs[v], labels) for v in names}
    shown: set[str] = set()
    summaries: dict[str, VariantSummary] = {}
    for v, s in scored.items():
        g = s.graph
        idx = _shown_nodes(s, limits)
        id_of = {i: nid for nid, i in s.index.items()}
        shown.update(id_of[i] for i in idx)
        imp = s.importance[: g.error_slice.stop]
        summaries[v] = VariantSummary(
            total=s.total,
            features=g.n_features,
            shown_mass=float(imp[idx].sum() / imp.sum()) if float(imp.sum()) else 0.0,
            nothing_to_explain=s.nothing,
        )
    for s in scored.values():  # every token and every logit
        shown.update(nid for nid in s.index if nid[0] in "tl")
    diffs = [v for v in names if v != reference] if reference in scored else []
    nodes = _nodes(shown, scored, labels, reference, diffs)
    edges = _edges(shown, scored, limits, reference, diffs)
    evil = sorted({t for t, lab in labels.items() if lab == "evil"})
    safe = sorted({t for t, lab in labels.items() if lab == "safe"})
    return GraphView(
        prompt_id=first.prompt_id,
        fingerprint=first.fingerprint,
        prompt_text=first.prompt_text,
        tokens=first.input_tokens,
        n_layers=first.n_layers,
        reference=reference,
        variants=names,
        diffs=diffs,
        evil_token_ids=evil,
        safe_token_ids=safe,
        label_conflicts=sorted(label_conflicts),
        summaries=summaries,
        limits=limits,
        nodes=nodes,
        edges=edges,
    )


def _describe(nid: str, s: _Scored) -> ViewNode:
    """Kind, place and label of a node (values and layout filled in later)."""
    m = s.graph.manifest
    i = s.index[nid]
    tok = m.input_tokens
    kind: ViewKind
    if nid[0] == "f":
        layer, pos, feat = (int(x) for x in s.graph.features[i].tolist())
        kind = "adapter" if feat < 0 else "feature"
        return ViewNode(
            id=nid, kind=kind, layer=layer, pos=pos, feature=feat, token_id=m.input_ids[pos],
            label=node_label(layer, feat), token=tok[pos], row=layer + 1, col=pos, slot=0,
            slots=1, values={},
        )  # fmt: skip
    if nid[0] == "e":
        layer, pos = (int(x) for x in nid[1:].split("."))
        return ViewNode(
            id=nid, kind="error", layer=layer, pos=pos, token_id=m.input_ids[pos],
            label=f"L{layer} error", token=tok[pos], row=layer + 1, col=pos, slot=0,
            slots=1, values={},
        )  # fmt: skip
    if nid[0] == "t":
        pos = int(nid[1:])
        return ViewNode(
            id=nid, kind="token", pos=pos, token_id=m.input_ids[pos], label=tok[pos],
            token=tok[pos], row=0, col=pos, slot=0, slots=1, values={},
        )  # fmt: skip
    k = i - s.graph.logit_slice.start
    return ViewNode(
        id=nid, kind="logit", token_id=m.logit_token_ids[k], label=m.logit_tokens[k],
        token=m.logit_tokens[k], row=m.n_layers + 1, col=0, slot=0, slots=1, values={},
    )  # fmt: skip


def _value(nid: str, s: _Scored) -> NodeValue:
    i = s.index[nid]
    g = s.graph
    if nid[0] == "l":
        k = i - g.logit_slice.start
        return NodeValue(score=None, probability=g.manifest.logit_probabilities[k])
    act = float(g.activations[i]) if i < g.n_features else None
    return NodeValue(score=float(s.score[i]), activation=act)


def _nodes(
    shown: set[str],
    scored: Mapping[str, _Scored],
    labels: Mapping[int, Label],
    reference: str,
    diffs: Sequence[str],
) -> list[ViewNode]:
    nodes: list[ViewNode] = []
    for nid in shown:
        present = {v: s for v, s in scored.items() if nid in s.index}
        node = _describe(nid, next(iter(present.values())))
        node.values = {v: _value(nid, s) for v, s in present.items()}
        if node.kind == "logit" and node.token_id is not None:
            node.verdict = labels.get(node.token_id)
        ref = node.values.get(reference)
        for v in diffs:
            val = node.values.get(v)
            if ref is None or val is None:
                continue
            if node.kind == "logit":
                node.diff[v] = (val.probability or 0.0) - (ref.probability or 0.0)
            else:
                node.diff[v] = (val.score or 0.0) - (ref.score or 0.0)
        nodes.append(node)
    _layout(nodes, reference)
    return nodes


def _strength(node: ViewNode) -> float:
    return max((abs(v.score or 0.0) for v in node.values.values()), default=0.0)


def _layout(nodes: list[ViewNode], reference: str) -> None:
    """Rows by layer, columns by position; within a cell adapter, features (strongest
    first), then the error node. Logits: one row, by probability (reference's first)."""
    cells: dict[tuple[int, int], list[ViewNode]] = {}
    logits: list[ViewNode] = []
    for n in nodes:
        if n.kind == "logit":
            logits.append(n)
        else:
            cells.setdefault((n.row, n.col), []).append(n)
    rank = {"adapter": 0, "feature": 1, "error": 2, "token": 3}
    for cell in cells.values():
        cell.sort(key=lambda n: (rank[n.kind], -_strength(n), n.id))
        for j, n in enumerate(cell):
            n.slot, n.slots = j, len(cell)

    def prob(n: ViewNode) -> float:
        val = n.values.get(reference) or next(iter(n.values.values()))
        return val.probability or 0.0

    logits.sort(key=lambda n: (-prob(n), n.id))
    for j, n in enumerate(logits):
        n.col, n.slot, n.slots = j, 0, 1
    nodes.sort(key=lambda n: (n.row, n.col, n.slot))


def _carried(s: _Scored, t: int, src: torch.Tensor) -> torch.Tensor:
    """Score carried by the edges ``src -> t`` of one graph (float64, like the weights)."""
    g = s.graph
    w = g.adjacency[t, src].to(torch.float64)
    if t >= g.logit_slice.start:
        return w * s.weights[t - g.logit_slice.start]
    act = float(g.activations[t])
    return w * (float(s.score[t]) / act) if act else torch.zeros_like(w)


def _edges(
    shown: set[str],
    scored: Mapping[str, _Scored],
    limits: ViewLimits,
    reference: str,
    diffs: Sequence[str],
) -> list[ViewEdge]:
    pairs: dict[tuple[str, str], None] = {}
    for s in scored.values():
        g = s.graph
        here = [nid for nid in shown if nid in s.index]
        sources = [nid for nid in here if s.index[nid] < g.token_slice.stop]
        targets = [nid for nid in here if s.index[nid] < g.n_features or nid[0] == "l"]
        src = torch.tensor([s.index[n] for n in sources], dtype=torch.int64)
        rows = [(t, _carried(s, s.index[t], src)) for t in targets]
        if not rows or not sources:
            continue
        strength = torch.stack([c for _, c in rows]).abs()
        if not bool(strength.any()):
            strength = g.adjacency[[s.index[t] for t, _ in rows]][:, src].abs().to(torch.float64)
        flat = strength.flatten().numpy()
        for j in _top_mass(flat, limits.edge_mass, limits.max_edges):
            pairs[sources[j % len(sources)], rows[j // len(sources)][0]] = None
    edges = []
    for source, target in sorted(pairs):
        values: dict[str, EdgeValue] = {}
        for v, s in scored.items():
            if source not in s.index or target not in s.index:
                continue
            si, ti = s.index[source], s.index[target]
            weight = float(s.graph.adjacency[ti, si])
            if weight:
                carried = float(_carried(s, ti, torch.tensor([si]))[0])
                values[v] = EdgeValue(weight=weight, carried=carried)
        ref = values.get(reference)
        diff = {v: values[v].carried - ref.carried for v in diffs if ref and v in values}
        edges.append(ViewEdge(source=source, target=target, values=values, diff=diff))
    return edges


# ----------------------------------------------------------------------------- from the store


def merged_labels(
    store: ObjectStore, exp_name: str, pid: str, fp: str, variants: Iterable[str], judge_id: str
) -> tuple[dict[int, Label], list[int]]:
    """Every variant's effective labels of this prompt merged (token id -> label), and the
    tokens that variants label differently (left out)."""
    merged: dict[int, Label] = {}
    conflicts: set[int] = set()
    for v in variants:
        try:
            labels = resolve_labels(store, exp_name, pid, fp, v, judge_id)
        except AnalysisError:  # no label of this variant yet
            continue
        for tid, lab in labels.labels.items():
            if merged.setdefault(tid, lab) != lab:
                conflicts.add(tid)
    for tid in conflicts:
        del merged[tid]
    return merged, sorted(conflicts)


def stored_graph_view(
    store: ObjectStore,
    exp: Experiment,
    pid: str,
    *,
    fingerprint: str | None = None,
    limits: ViewLimits | None = None,
) -> GraphView:
    """:func:`graph_view` of every stored graph of a prompt, with the merged labels.

    Raises :class:`NoGraphToView` when no variant has a graph, and
    :class:`~common.store.CorruptArtifact` (naming the key) for one that cannot be read."""
    fp = fingerprint or exp.fingerprint
    graphs = {}
    for v in exp.variant_names:
        if not graph_exists(store, exp.name, pid, fp, v):
            continue
        try:
            graphs[v] = load_graph(store, exp.name, pid, fp, v)
        except NotFound:  # the manifest without its tensors: not "no graph yet"
            raise CorruptArtifact(
                keys.graph_tensors(exp.name, pid, fp, v), "missing, its manifest exists"
            ) from None
    if not graphs:
        raise NoGraphToView(f"no graph yet for prompt {pid}")
    labels, conflicts = merged_labels(store, exp.name, pid, fp, graphs, exp.judge.judge_id)
    return graph_view(
        graphs, labels, reference=exp.reference, limits=limits, label_conflicts=conflicts
    )
