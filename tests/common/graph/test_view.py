"""The graph viewer's document, built from stored graphs whose exact answer is known: random
layered *linear* networks (tests/analysis/synthetic.py), where switching a node or an edge
off and re-running the network gives the true change of the evil-minus-safe score."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from common.experiment import Experiment
from common.graph.artifact import load_graph, save_graph
from common.graph.model import AttributionGraph
from common.graph.scores import direction_weights
from common.graph.view import (
    GraphView,
    NoGraphToView,
    ViewLimits,
    graph_view,
    merged_labels,
    stored_graph_view,
)
from common.records import Label, TokenVerdict, Verdict
from common.store import FsStore
from common.store import keys as K
from tests.analysis.synthetic import LinearNet, linear_net

PID = "synthetic000"
FP = "fp-synthetic"
EVIL, SAFE, OTHER = 1000, 1001, 1002
LABELS: dict[int, Label] = {EVIL: "evil", SAFE: "safe"}


def _net(seed: int, variant: str, adapter_at: int | None = None) -> LinearNet:
    """A linear net as ``variant``'s graph; ``adapter_at``: that feature node becomes the
    layer's adapter node (feature id -1), as attribution writes it."""
    net = linear_net(seed=seed, n_layers=3, n_pos=4, n_logits=3, per_cell=2)
    g = net.graph
    features = g.features.clone()
    if adapter_at is not None:
        features[adapter_at, 2] = -1
    net.graph = AttributionGraph(
        g.manifest.model_copy(update={"variant": variant}), g.adjacency, features, g.activations
    )
    return net


def _weights(graph: AttributionGraph) -> torch.Tensor:
    w_evil, w_safe, _, _ = direction_weights(graph, LABELS)
    return w_evil - w_safe


def _true_score(net: LinearNet, index: int) -> float:
    """Exact change of the score when node ``index`` is switched off in the network."""
    w = _weights(net.graph)
    return float(w @ (net.run() - net.run(off=index)))


@pytest.fixture
def nets() -> dict[str, LinearNet]:
    return {"base": _net(3, "base"), "adapted": _net(4, "adapted", adapter_at=5)}


@pytest.fixture
def stored(tmp_path: Path, nets: dict[str, LinearNet]) -> FsStore:
    store = FsStore(tmp_path / "store")
    for net in nets.values():
        save_graph(store, "exp", net.graph)
    return store


def _view(store: FsStore, limits: ViewLimits | None = None) -> GraphView:
    graphs = {v: load_graph(store, "exp", PID, FP, v) for v in ("adapted", "base")}
    return graph_view(graphs, LABELS, reference="base", limits=limits)


def test_node_scores_are_what_switching_the_node_off_removes(
    stored: FsStore, nets: dict[str, LinearNet]
) -> None:
    view = _view(stored, ViewLimits(node_mass=1.0, max_nodes=1000))
    assert view.variants == ["base", "adapted"] and view.diffs == ["adapted"]
    assert view.evil_token_ids == [EVIL] and view.safe_token_ids == [SAFE]
    g = nets["base"].graph
    n_err = g.manifest.n_layers * g.manifest.n_pos
    kinds = [n.kind for n in view.nodes]
    # every feature, adapter, error, token and logit node of either graph is drawn
    assert kinds.count("feature") == g.n_features and kinds.count("adapter") == 1
    assert kinds.count("error") == n_err and kinds.count("token") == g.manifest.n_pos
    assert kinds.count("logit") == g.manifest.n_logits
    checked = 0
    for node in view.nodes:
        for variant, value in node.values.items():
            net = nets[variant]
            if node.kind == "logit":
                assert node.token_id is not None
                k = net.graph.manifest.logit_token_ids.index(node.token_id)
                assert value.probability == net.graph.manifest.logit_probabilities[k]
                continue
            i = _graph_index(net.graph, node.kind, node.layer, node.pos, node.feature)
            truth = _true_score(net, i)
            assert value.score == pytest.approx(truth, rel=1e-4, abs=1e-6), node.id
            checked += 1
    assert checked > 2 * g.n_features
    # the totals are the roots' scores: every path starts at a token or an error node, so
    # the total is what switching off every root at once removes (the biases are no nodes)
    for variant, net in nets.items():
        w = _weights(net.graph)
        no_roots = LinearNet(net.graph, net.weights, net.bias, torch.zeros_like(net.inputs))
        truth = float(w @ (net.run() - no_roots.run()))
        assert view.summaries[variant].total == pytest.approx(truth, rel=1e-4)


def _graph_index(
    g: AttributionGraph, kind: str, layer: int | None, pos: int | None, feature: int | None
) -> int:
    if kind in ("feature", "adapter"):
        rows = g.features.tolist()
        return rows.index([layer, pos, feature])
    assert pos is not None
    if kind == "error":
        assert layer is not None
        return int(g.error_slice.start + layer * g.manifest.n_pos + pos)
    return int(g.token_slice.start + pos)


def test_diff_is_adapted_minus_base_where_both_have_the_node(stored: FsStore) -> None:
    view = _view(stored, ViewLimits(node_mass=1.0, max_nodes=1000))
    adapter = [n for n in view.nodes if n.kind == "adapter"]
    assert len(adapter) == 1 and adapter[0].label == f"L{adapter[0].layer}/adapter"
    assert set(adapter[0].values) == {"adapted"} and adapter[0].diff == {}
    both = [n for n in view.nodes if set(n.values) == {"base", "adapted"}]
    assert len(both) == len(view.nodes) - 2  # the adapter node and the feature it replaced
    for n in both:
        if n.kind == "logit":
            expected = (n.values["adapted"].probability or 0) - (n.values["base"].probability or 0)
        else:
            expected = (n.values["adapted"].score or 0) - (n.values["base"].score or 0)
        assert n.diff["adapted"] == pytest.approx(expected)
    for e in view.edges:
        if "base" in e.values and "adapted" in e.values:
            want = e.values["adapted"].carried - e.values["base"].carried
            assert e.diff["adapted"] == pytest.approx(want)
        else:
            assert e.diff == {}


def test_edges_carry_what_cutting_them_removes(stored: FsStore, nets: dict[str, LinearNet]) -> None:
    view = _view(stored, ViewLimits(node_mass=1.0, max_nodes=1000, edge_mass=1.0))
    net = nets["adapted"]
    g = load_graph(stored, "exp", PID, FP, "adapted")  # what the view was built from
    by_id = {n.id: n for n in view.nodes}
    w = _weights(g)
    edges = [e for e in view.edges if "adapted" in e.values]
    assert len(edges) == int(torch.count_nonzero(g.adjacency))  # every stored edge, once
    into_features = 0
    for e in edges:
        s, t = by_id[e.source], by_id[e.target]
        si = _graph_index(g, s.kind, s.layer, s.pos, s.feature)
        value = e.values["adapted"]
        if t.kind == "logit":
            # stored logit rows also hold what pruned feature edges carried (graph-format.md)
            assert t.token_id is not None
            k = g.manifest.logit_token_ids.index(t.token_id)
            ti = g.logit_slice.start + k
            assert value.carried == pytest.approx(float(g.adjacency[ti, si]) * float(w[k]))
            continue
        ti = _graph_index(g, t.kind, t.layer, t.pos, t.feature)
        assert value.weight == pytest.approx(float(g.adjacency[ti, si]))
        cut = net.weights.clone()
        cut[ti, si] = 0.0
        truth = float(w @ (net.run() - LinearNet(net.graph, cut, net.bias, net.inputs).run()))
        # stored feature edges are float16 relative to their row's largest
        assert value.carried == pytest.approx(truth, rel=2e-3, abs=1e-5), (e.source, e.target)
        into_features += 1
    assert into_features > 20


def test_pruning_keeps_the_strongest_nodes_and_the_adapter(stored: FsStore) -> None:
    full = _view(stored, ViewLimits(node_mass=1.0, max_nodes=1000))
    small = _view(stored, ViewLimits(node_mass=0.5, max_nodes=6, max_edges=20))
    inner = [n for n in small.nodes if n.kind in ("feature", "adapter", "error")]
    assert 0 < len(inner) <= 2 * 6 + 1
    assert any(n.kind == "adapter" for n in inner)  # always shown
    assert len(small.edges) <= 2 * 20
    # per variant, the kept nodes are the strongest: none left out beats the weakest kept
    for v in ("base", "adapted"):
        kept = {n.id for n in inner}
        score = {
            n.id: abs(n.values[v].score or 0)
            for n in full.nodes
            if n.kind in ("feature", "error") and v in n.values
        }
        top = sorted(score, key=lambda i: -score[i])[: len([k for k in kept if k in score])]
        assert set(top[:3]) <= kept
        assert 0 < small.summaries[v].shown_mass <= 1
    # layout: one slot per node in each (row, column) cell; rows follow layers
    cells: dict[tuple[int, int], list[int]] = {}
    for n in small.nodes:
        cells.setdefault((n.row, n.col), []).append(n.slot)
        if n.layer is not None:
            assert n.row == n.layer + 1
    for slots in cells.values():
        assert sorted(slots) == list(range(len(slots)))
    assert GraphView.model_validate_json(small.model_dump_json()) == small


def test_stored_view_merges_the_variants_labels(
    stored: FsStore, experiment: Experiment, nets: dict[str, LinearNet]
) -> None:
    exp = experiment.model_copy(update={"name": "exp"})
    judge = exp.judge.judge_id

    def verdict(variant: str, labels: dict[int, Label]) -> None:
        stored.put_json(
            K.verdicts("exp", PID, FP, judge, variant),
            Verdict(
                prompt_id=PID,
                variant=variant,
                judge=judge,
                fingerprint=FP,
                verdicts=[
                    TokenVerdict(token_id=t, token=f"w{t}", label=lab) for t, lab in labels.items()
                ],
            ),
        )

    # base's top-k held the safe token, adapted's the evil one; they disagree on OTHER
    verdict("base", {SAFE: "safe", OTHER: "safe"})
    verdict("adapted", {EVIL: "evil", OTHER: "evil"})
    labels, conflicts = merged_labels(stored, "exp", PID, FP, ["base", "adapted"], judge)
    assert labels == LABELS and conflicts == [OTHER]
    view = stored_graph_view(stored, exp, PID, fingerprint=FP)
    assert view.label_conflicts == [OTHER] and view.evil_token_ids == [EVIL]
    assert view == _view(stored).model_copy(update={"label_conflicts": [OTHER]})
    logits = {n.token_id: n.verdict for n in view.nodes if n.kind == "logit"}
    assert logits == {EVIL: "evil", SAFE: "safe", OTHER: None}
    with pytest.raises(NoGraphToView):
        stored_graph_view(stored, exp, "0123456789ab", fingerprint=FP)


def test_nothing_to_explain_still_draws_the_graph(stored: FsStore) -> None:
    graphs = {"base": load_graph(stored, "exp", PID, FP, "base")}
    view = graph_view(graphs, {SAFE: "safe"}, reference="base")
    assert view.summaries["base"].nothing_to_explain is not None
    assert any(n.kind == "feature" for n in view.nodes) and view.edges
    assert all(n.values["base"].score == 0 for n in view.nodes if n.kind != "logit")
