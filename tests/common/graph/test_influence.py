"""Signed multi-hop influence: exact against switching nodes off in a known linear network."""

from __future__ import annotations

import pytest
import torch

from common.errors import AnalysisError
from common.graph.influence import describe_node, logit_influence
from tests.analysis.synthetic import linear_net


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_total_effect_equals_switching_each_source_off(seed: int) -> None:
    """T[k, s] = logits(network) - logits(network with s forced to 0, downstream recomputed)."""
    net = linear_net(seed=seed)
    inf = logit_influence(net.graph)
    base = net.run()
    n_src = net.graph.token_slice.stop
    truth = torch.stack([base - net.run(off=s) for s in range(n_src)], dim=1)
    assert inf.method == "solve"
    assert inf.backward_edges == 0
    torch.testing.assert_close(inf.total, truth, rtol=1e-4, atol=1e-5)
    # the indirect paths matter in this network: the direct part alone is wrong
    assert (inf.direct - truth).abs().max() > 1e-2


def test_hops_and_series_agree_with_solve() -> None:
    net = linear_net(n_layers=4, seed=3)
    solved = logit_influence(net.graph)
    # a 4-layer network has feature chains of at most 3 edges
    assert 1 <= solved.hops <= 3
    series = logit_influence(net.graph, max_hops=10)
    torch.testing.assert_close(series.total, solved.total)


def test_series_is_used_when_the_solve_is_not_trusted(monkeypatch: pytest.MonkeyPatch) -> None:
    import common.graph.influence as mod

    net = linear_net(seed=4)
    exact = logit_influence(net.graph)
    monkeypatch.setattr(mod, "SOLVE_TOLERANCE", -1.0)  # every residual is "too large"
    fallback = logit_influence(net.graph)
    assert fallback.method == "series"
    torch.testing.assert_close(fallback.total, exact.total)


def test_cycle_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import common.graph.influence as mod

    net = linear_net(seed=5)
    a = net.graph.adjacency
    # a feature->feature loop with gain > 1 (t <- s and s <- t)
    a[0, 1] = 5.0 * float(net.graph.activations[0])
    a[1, 0] = 5.0 * float(net.graph.activations[1])
    monkeypatch.setattr(mod, "SOLVE_TOLERANCE", -1.0)
    with pytest.raises(AnalysisError, match="did not converge"):
        logit_influence(net.graph, max_hops=50)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_edges_are_refused(value: float) -> None:
    net = linear_net(seed=6)
    net.graph.adjacency[net.graph.logit_slice.start, 2] = value
    with pytest.raises(AnalysisError, match="non-finite edges") as err:
        logit_influence(net.graph)
    assert err.value.prompt_id == net.graph.manifest.prompt_id
    assert "logit 'w0'" in str(err.value)


def test_non_finite_activation_is_refused() -> None:
    net = linear_net(seed=6)
    net.graph.activations[3] = float("nan")
    with pytest.raises(AnalysisError, match="non-finite feature activations"):
        logit_influence(net.graph)


def test_transposed_matrix_is_refused() -> None:
    net = linear_net(seed=7)
    net.graph.adjacency = net.graph.adjacency.T.contiguous()
    with pytest.raises(AnalysisError, match=r"sources only|sinks"):
        logit_influence(net.graph)


def test_shape_mismatch_is_refused() -> None:
    net = linear_net(seed=7)
    net.graph.adjacency = net.graph.adjacency[:-1, :-1]
    with pytest.raises(AnalysisError, match="inconsistent"):
        logit_influence(net.graph)


def test_zero_activation_feature_carries_nothing_downstream() -> None:
    """An inactive feature (a = 0) has slope 0: it passes nothing on, and is not a NaN."""
    net = linear_net(seed=8)
    g = net.graph
    t = int(torch.argmax(g.features[:, 0]))  # a last-layer feature: nothing downstream of it
    src_into_t = g.adjacency[t].clone()
    g.activations[t] = 0.0
    g.adjacency[:, t] = 0.0  # its outgoing edges are a_t * w = 0
    inf = logit_influence(g)
    assert torch.isfinite(inf.total).all()
    assert bool(src_into_t.any())


def test_node_mapping() -> None:
    net = linear_net(n_layers=3, n_pos=4)
    g = net.graph
    f = g.n_features
    info = describe_node(g, 0)
    assert info.kind == "feature"
    assert (info.layer, info.pos, info.feature) == tuple(g.features[0].tolist())
    assert info.pos is not None
    assert info.token == g.manifest.input_tokens[info.pos]
    err = describe_node(g, f + 1 * 4 + 2)  # layer-major errors
    assert (err.kind, err.layer, err.pos) == ("error", 1, 2)
    tok = describe_node(g, g.token_slice.start + 3)
    assert (tok.kind, tok.pos, tok.token) == ("token", 3, "t3")
    logit = describe_node(g, g.n_nodes - 1)
    assert (logit.kind, logit.token_id) == ("logit", g.manifest.logit_token_ids[-1])
    with pytest.raises(IndexError):
        describe_node(g, g.n_nodes)


def test_backward_edges_counted_alike_in_layer_order_and_shuffled() -> None:
    from common.graph.influence import _backward_edges

    gen = torch.Generator().manual_seed(7)
    layers = torch.sort(torch.randint(0, 5, (60,), generator=gen)).values
    a = torch.randn(60, 60, generator=gen) * (torch.rand(60, 60, generator=gen) < 0.3)
    # the general count: target layer <= source layer
    expected = int(((a != 0) & (layers[:, None] <= layers[None, :])).sum())
    assert expected > 0

    class G:  # just what _backward_edges reads
        def __init__(self, layers: torch.Tensor) -> None:
            self.features = torch.stack([layers, torch.zeros_like(layers), layers], dim=1)

    assert _backward_edges(G(layers), a) == expected  # type: ignore[arg-type]
    perm = torch.randperm(60, generator=gen)
    shuffled = a[perm][:, perm]
    assert _backward_edges(G(layers[perm]), shuffled) == expected  # type: ignore[arg-type]
    forward = a * (layers[:, None] > layers[None, :])
    assert _backward_edges(G(layers), forward) == 0  # type: ignore[arg-type]


def _in_layer_order(net: object) -> tuple[object, torch.Tensor]:
    """The same network with its features renumbered in layer order (circuit-tracer's
    layout, which takes the block solve), and the permutation of the source nodes."""
    from common.graph.model import AttributionGraph

    g = net.graph  # type: ignore[attr-defined]
    f = g.n_features
    perm_f = torch.argsort(g.features[:, 0], stable=True)
    perm = torch.cat([perm_f, torch.arange(f, g.n_nodes)])
    a = g.adjacency[perm][:, perm].clone()
    return AttributionGraph(g.manifest, a, g.features[perm_f], g.activations[perm_f]), perm


@pytest.mark.parametrize("seed", [0, 6])
def test_block_solve_in_layer_order_equals_switching_off(seed: int) -> None:
    """Layer-ordered graphs are solved by layer blocks on the float32 rows, without copying
    them: same totals as the truth, the input untouched, float64 inputs too."""
    from common.graph.influence import layer_order

    net = linear_net(seed=seed)
    ordered, perm = _in_layer_order(net)
    assert layer_order(ordered) is None  # type: ignore[arg-type]
    before = ordered.adjacency.clone()  # type: ignore[attr-defined]
    inf = logit_influence(ordered)  # type: ignore[arg-type]
    assert torch.equal(ordered.adjacency, before)  # type: ignore[attr-defined]
    base = net.run()
    n_src = net.graph.token_slice.stop
    truth = torch.stack([base - net.run(off=s) for s in range(n_src)], dim=1)
    assert inf.method == "solve" and inf.residual < 1e-9 and inf.hops >= 1
    torch.testing.assert_close(inf.total, truth[:, perm[:n_src]], rtol=1e-4, atol=1e-5)
    shuffled = logit_influence(net.graph)  # the general solve, on the shuffled order
    torch.testing.assert_close(inf.total, shuffled.total[:, perm[:n_src]], rtol=1e-12, atol=1e-14)
    assert inf.hops == shuffled.hops
    ordered.adjacency = ordered.adjacency.double()  # type: ignore[attr-defined]
    kept = ordered.adjacency.clone()  # type: ignore[attr-defined]
    again = logit_influence(ordered)  # type: ignore[arg-type]
    assert torch.equal(ordered.adjacency, kept)  # type: ignore[attr-defined]
    torch.testing.assert_close(again.total, inf.total, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("dense_block", [0.0, 1.0])
def test_block_solve_on_sparse_rows_equals_dense(
    dense_block: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CSR rows a stored graph is read into solve to the same totals as the dense rows,
    whether a row block is scattered edge by edge or densified first (and in several blocks)."""
    import common.graph.influence as mod

    monkeypatch.setattr(mod, "_DENSE_BLOCK", dense_block)
    monkeypatch.setattr(mod, "_CHUNK_EDGES", 64)
    ordered, _ = _in_layer_order(linear_net(seed=3, n_pos=6))
    g = ordered  # type: ignore[assignment]
    f, s = g.n_features, g.token_slice.stop  # type: ignore[attr-defined]
    rows = g.adjacency[:f, :s]  # type: ignore[attr-defined]
    nz = rows.nonzero(as_tuple=True)
    indptr = torch.zeros(f + 1, dtype=torch.int64)
    indptr[1:] = torch.cumsum(torch.bincount(nz[0], minlength=f), 0)
    sparse = mod.SparseRows(indptr, nz[1], rows[nz].float(), (f, s))
    assert torch.equal(sparse.to_dense(), rows.float())
    a_ls = g.adjacency[g.logit_slice, :s].double()  # type: ignore[attr-defined]
    layers = g.features[:, 0]  # type: ignore[attr-defined]
    dense_total, _ = mod.solve_rows(rows, g.activations, a_ls, layers)  # type: ignore[attr-defined]
    sparse_total, res = mod.solve_rows(sparse, g.activations, a_ls, layers)  # type: ignore[attr-defined]
    assert res == 0.0
    torch.testing.assert_close(sparse_total, dense_total, rtol=1e-12, atol=1e-14)
    inv = 1.0 / g.activations.double()  # type: ignore[attr-defined]
    coef = torch.randn(3, f, dtype=torch.float64)
    torch.testing.assert_close(
        mod.scaled_rows_product(coef, sparse, inv), mod.scaled_rows_product(coef, rows, inv)
    )


def test_amplifying_paths_are_solved_not_summed() -> None:
    """A graph whose paths amplify (total influence ~1e11 x the direct edges) is still solved
    directly: the solve's backward error is measured against the size of its terms, not of
    the direct edges alone (which failed exact solves on rounding and fell back to the slow
    series). Its result equals the series'."""
    net = linear_net(seed=1)
    g = net.graph
    f = g.n_features
    g.adjacency[:f, :f] *= 1e6
    inf = logit_influence(g)
    assert inf.method == "solve"
    assert float(inf.total.abs().max()) > 1e10 * float(inf.direct.abs().max())
    import common.graph.influence as mod

    n_ff = mod.normalized_feature_rows(g.adjacency[:f, :f], g.activations)
    series, _ = mod._series(n_ff, inf.direct[:, :f], f + 1, g)
    torch.testing.assert_close(inf.total[:, :f], series, rtol=1e-10, atol=0.0)
    ordered, perm = _in_layer_order(net)
    block = logit_influence(ordered)  # type: ignore[arg-type]
    assert block.method == "solve"
    n_src = g.token_slice.stop
    torch.testing.assert_close(block.total, inf.total[:, perm[:n_src]], rtol=1e-10, atol=1e-8)
