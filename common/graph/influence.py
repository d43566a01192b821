"""Signed multi-hop influence of every graph node on every logit of an attribution graph.

Notation: ``A`` is the graph's adjacency, rows = targets, columns = sources, node order
``[features F][errors L*P][tokens P][logits K]``. circuit-tracer computes
``A[t, s] = a_s * d pre_t / d a_s``: the direct contribution of source ``s`` at its actual
activation ``a_s`` to target ``t``'s pre-activation in the frozen local replacement model
(attention patterns and norm scales fixed, so everything between nodes is linear).

An active feature passes a change of its pre-activation through with slope 1 (JumpReLU,
ReLU), so a change ``d`` of ``a_t`` changes ``t``'s outgoing edge into ``u`` by
``d * A[u, t] / a_t``. A path ``s -> t1 -> ... -> tn -> k`` thus contributes
``A[t1, s] * A[t2, t1]/a_t1 * ... * A[k, tn]/a_tn``. With ``N = diag(1/a) A_FF`` (each
feature row divided by that target's activation) the sum over all paths is::

    T = A_L,S + G N_F,S      with      G = A_LF (I - N)^-1        (and T[:, F] = G)

where ``S`` are all source nodes (features, errors, tokens). Error and token nodes are
sources only (zero rows), logits are sinks (zero columns), and a feature only feeds
features of later layers, so ``N`` is nilpotent and ``(I - N)^-1 = I + N + ... + N^depth``.
We solve ``G (I - N) = A_LF`` in float64 and check the residual; if the solve fails or its
residual is too large we sum the (finite) series and require it to terminate.

Unlike circuit-tracer's pruning influence (``normalize_matrix``: ``|A|`` rows scaled to sum
1), signs are kept and the result is in logit units: ``T[k, s]`` is the first-order change
of (demeaned) logit ``k`` if source ``s`` were switched off, with everything downstream
recomputed through the features.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from common.errors import AnalysisError
from common.graph.model import AttributionGraph, all_finite

NodeKind = Literal["feature", "error", "token", "logit"]

#: backward error above which the linear solve is not trusted (float64; typical ~1e-15)
SOLVE_TOLERANCE = 1e-8


def backward_error(err: float, a_max: float, g_max: float, n_colsum_max: float) -> float:
    """Normwise backward error of a solve of ``G (I - N) = A``: the largest residual entry
    ``err`` over ``max |A| + max |G| * ||I - N||_1`` with ``||I - N||_1 <= 1 + max_j sum_i |N_ij|``
    (the infinity-norm backward error of a row system). Relative to ``max |A|`` alone, a graph
    whose paths amplify (``|G|`` many times ``|A|``) fails an exact solve on rounding alone."""
    scale = a_max + g_max * (1.0 + n_colsum_max)
    return err / scale if scale > 0 else err


@dataclass(frozen=True)
class NodeInfo:
    """What a graph index stands for."""

    kind: NodeKind
    index: int
    layer: int | None
    pos: int | None
    feature: int | None
    token: str
    token_id: int | None = None

    @property
    def label(self) -> str:
        """A short human label, e.g. ``L3/F120@5 'word'`` for a feature or ``err L2@5 'word'`` for
        an error node."""
        if self.kind == "feature":
            return f"L{self.layer}/F{self.feature}@{self.pos} {self.token!r}"
        if self.kind == "error":
            return f"err L{self.layer}@{self.pos} {self.token!r}"
        if self.kind == "token":
            return f"tok@{self.pos} {self.token!r}"
        return f"logit {self.token!r}"


@dataclass(frozen=True)
class LogitInfluence:
    """Signed total effect of each source node on each logit node of one graph."""

    total: torch.Tensor  # [K, S] float64, S = F + errors + tokens; rows follow the logit nodes
    direct: torch.Tensor  # [K, S] float64: the one-hop part (A_L,S)
    method: Literal["solve", "series"]
    residual: float  # backward error of G (I - N) = A_LF (:func:`backward_error`)
    hops: int  # longest path (in feature hops) that carries any weight; -1 if unknown
    backward_edges: int  # feature edges not from an earlier to a later layer (should be 0)

    @property
    def indirect(self) -> torch.Tensor:
        """The multi-hop part of each effect, ``total - direct`` ([K, S] float64)."""
        return self.total - self.direct


def describe_node(graph: AttributionGraph, index: int) -> NodeInfo:
    """Map a graph index to (kind, layer, position, feature id) and the token string."""
    m = graph.manifest
    n = graph.n_nodes
    if not 0 <= index < n:
        raise IndexError(f"node {index} outside graph of {n} nodes")

    def tok(pos: int) -> str:
        return m.input_tokens[pos] if 0 <= pos < len(m.input_tokens) else "?"

    if index < graph.n_features:
        layer, pos, feat = (int(x) for x in graph.features[index].tolist())
        return NodeInfo("feature", index, layer, pos, feat, tok(pos), m.input_ids[pos])
    if index < graph.error_slice.stop:
        e = index - graph.n_features
        layer, pos = divmod(e, m.n_pos)
        return NodeInfo("error", index, layer, pos, None, tok(pos), m.input_ids[pos])
    if index < graph.token_slice.stop:
        pos = index - graph.token_slice.start
        return NodeInfo("token", index, None, pos, None, tok(pos), m.input_ids[pos])
    k = index - graph.logit_slice.start
    return NodeInfo("logit", index, None, None, None, m.logit_tokens[k], m.logit_token_ids[k])


def check_graph(graph: AttributionGraph) -> None:
    """Refuse a graph whose shapes, values or node order cannot give a meaningful influence."""
    m = graph.manifest
    a = graph.adjacency
    where = {"prompt_id": m.prompt_id, "variant": m.variant}
    n_expected = graph.n_features + graph.n_errors + m.n_pos + m.n_logits
    if a.ndim != 2 or a.shape[0] != a.shape[1] or a.shape[0] != n_expected:
        raise AnalysisError(
            f"adjacency has shape {tuple(a.shape)} but the manifest implies a square matrix of "
            f"{n_expected} nodes ({graph.n_features} features + {graph.n_errors} errors + "
            f"{m.n_pos} tokens + {m.n_logits} logits): the graph artifact is inconsistent, "
            "recompute the graph",
            **where,
        )
    if tuple(graph.features.shape) != (graph.n_features, 3) or graph.activations.shape != (
        graph.n_features,
    ):
        raise AnalysisError(
            f"features {tuple(graph.features.shape)} / activations "
            f"{tuple(graph.activations.shape)} do not match {graph.n_features} feature nodes",
            **where,
        )
    if not all_finite(a):
        bad = ~torch.isfinite(a)
        t, s = (int(x) for x in bad.nonzero()[0].tolist())
        raise AnalysisError(
            f"adjacency has {int(bad.sum())} non-finite edges (first: into "
            f"{describe_node(graph, t).label} from {describe_node(graph, s).label}): the model "
            "produced NaN/Inf activations; recompute the graph in float32 and check the "
            "variant's health report",
            **where,
        )
    bad_act = ~torch.isfinite(graph.activations)
    if bool(bad_act.any()):
        i = int(bad_act.nonzero()[0])
        raise AnalysisError(
            f"{int(bad_act.sum())} non-finite feature activations (first: "
            f"{describe_node(graph, i).label}): recompute the graph in float32",
            **where,
        )
    sources_only = a[graph.n_features : graph.token_slice.stop]
    if bool(sources_only.any()):
        raise AnalysisError(
            "error/token rows of the adjacency are not zero: error and token nodes must be "
            "sources only, so the node order is not circuit-tracer's "
            "[features][errors][tokens][logits]",
            **where,
        )
    if bool(a[:, graph.logit_slice].any()):
        raise AnalysisError(
            "logit columns of the adjacency are not zero: logits must be sinks "
            "(rows = targets, columns = sources); was the matrix transposed?",
            **where,
        )


def logit_influence(
    graph: AttributionGraph, *, max_hops: int | None = None, count_hops: bool = True
) -> LogitInfluence:
    """Signed total (direct + all indirect paths through features) effect on every logit.

    ``count_hops=False`` skips measuring the longest path (``hops`` is then -1).
    Raises :class:`AnalysisError` for non-finite or inconsistent graphs and when neither the
    linear solve nor the series converges.
    """
    check_graph(graph)
    f = graph.n_features
    src = slice(0, graph.token_slice.stop)
    a = graph.adjacency
    a_ls = a[graph.logit_slice, src].to(torch.float64)
    a_lf = a_ls[:, :f]
    backward = _backward_edges(graph, a[:f, :f])
    order = layer_order(graph)
    if backward == 0 and order is None:
        # circuit-tracer's layout: solved by layer blocks on the float32 rows, in place
        total, residual = solve_rows(a[:f, src], graph.activations, a_ls, graph.features[:, 0])
        if residual <= SOLVE_TOLERANCE:
            active = (graph.activations != 0)[:, None]
            hops = _depth((a[:f, :f] != 0) & active) if count_hops else -1
            return LogitInfluence(total, a_ls, "solve", residual, hops, backward)
    # only the feature and logit rows can be non-zero (check_graph): convert just those
    n_fs = normalized_feature_rows(a[:f, src], graph.activations)
    n_ff = n_fs[:, :f]
    method: Literal["solve", "series"] = "solve"
    g, residual = _solve(n_ff, a_lf, triangular=backward == 0, order=order)
    if g is None:
        g, hops = _series(n_ff, a_lf, max_hops if max_hops is not None else f + 1, graph)
        method, residual = "series", _residual(g, n_ff, a_lf)
    else:
        hops = _depth(n_ff != 0) if count_hops else -1
    return LogitInfluence(
        total=a_ls + g @ n_fs,
        direct=a_ls,
        method=method,
        residual=residual,
        hops=hops,
        backward_edges=backward,
    )


#: feature rows converted to float64 at a time (bounds the memory of the products)
_CHUNK_ROWS = 1024

#: stored edges of a row block scattered at a time (bounds the ``[K, nnz]`` temporary)
_CHUNK_EDGES = 1 << 20

#: a sparse row block denser than this is densified and multiplied instead of scattered
_DENSE_BLOCK = 0.05


@dataclass(frozen=True)
class SparseRows:
    """Feature rows ``[F, S]`` as CSR: int64 ``indptr`` ``[F + 1]`` and column ``indices``,
    float32 ``values`` (what a stored graph's reader rebuilds, so products on it are products
    on the stored graph)."""

    indptr: torch.Tensor
    indices: torch.Tensor
    values: torch.Tensor
    shape: tuple[int, int]

    def row_blocks(self, r0: int, r1: int) -> Iterator[tuple[int, int]]:
        """Consecutive ``(q0, q1)`` row ranges of ``r0:r1`` of about ``_CHUNK_EDGES`` cells each
        (small temporaries, which the allocator reuses instead of faulting in fresh pages)."""
        step = max(1, _CHUNK_EDGES // max(self.shape[1], 1))
        for q0 in range(r0, r1, step):
            yield q0, min(q0 + step, r1)

    def block(self, r0: int, r1: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Rows ``r0:r1`` as a dense ``[r1 - r0, S]`` matrix."""
        out = torch.zeros(r1 - r0, self.shape[1], dtype=dtype)
        p0, p1 = int(self.indptr[r0]), int(self.indptr[r1])
        out[self.row_ids(r0, r1) - r0, self.indices[p0:p1]] = self.values[p0:p1].to(dtype)
        return out

    def to_dense(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """The dense float32 ``[F, S]`` matrix (written into ``out``, a view of that shape,
        when given)."""
        dense = torch.empty(self.shape, dtype=torch.float32) if out is None else out
        for q0, q1 in self.row_blocks(0, self.shape[0]):
            dense[q0:q1] = self.block(q0, q1)
        return dense

    def row_ids(self, r0: int, r1: int) -> torch.Tensor:
        """Row index (absolute) of every stored edge of rows ``r0:r1``."""
        counts = self.indptr[r0 + 1 : r1 + 1] - self.indptr[r0:r1]
        return torch.repeat_interleave(torch.arange(r0, r1), counts)


Rows = torch.Tensor | SparseRows


def _push(
    out: torch.Tensor, coef: torch.Tensor, rows: Rows, r0: int, r1: int, cols: Sequence[slice]
) -> None:
    """``out[:, c] += coef @ rows[r0:r1, c]`` for each column range ``c`` (float64; ``coef``
    ``[K, r1 - r0]``). A sparse block adds every stored edge of those rows (``cols`` only
    narrows dense blocks, whose entries outside them are zero)."""
    if isinstance(rows, torch.Tensor):
        for c in cols:
            out[:, c].addmm_(coef, rows[r0:r1, c].to(torch.float64))
        return
    for q0, q1 in rows.row_blocks(r0, r1):
        p0, p1 = int(rows.indptr[q0]), int(rows.indptr[q1])
        cq = coef[:, q0 - r0 : q1 - r0]
        if p1 == p0:
            continue
        if (p1 - p0) > _DENSE_BLOCK * (q1 - q0) * rows.shape[1]:
            block = rows.block(q0, q1, torch.float64)
            for c in cols:
                out[:, c].addmm_(cq, block[:, c])
        else:
            vals = rows.values[p0:p1].to(torch.float64)
            out.index_add_(1, rows.indices[p0:p1], cq[:, rows.row_ids(q0, q1) - q0] * vals)


def _inverse(activations: torch.Tensor) -> torch.Tensor:
    """``1 / a`` in float64, 0 for an inactive feature (slope 0)."""
    act = activations.to(torch.float64)
    return torch.where(act != 0, 1.0 / torch.where(act != 0, act, 1.0), 0.0)


def scaled_rows_product(coef: torch.Tensor, rows: Rows, inv_act: torch.Tensor) -> torch.Tensor:
    """``coef @ diag(inv_act) @ rows`` ``[K, S]`` in float64 from float32 rows (dense: converted
    a chunk of rows at a time; sparse: edge by edge), with no float64 copy of the matrix."""
    f, s = rows.shape
    out = torch.zeros(coef.shape[0], s, dtype=torch.float64)
    for r0 in range(0, f, _CHUNK_ROWS):
        r1 = min(r0 + _CHUNK_ROWS, f)
        _push(out, coef[:, r0:r1] * inv_act[r0:r1], rows, r0, r1, [slice(0, s)])
    return out


def solve_rows(
    feature_rows: Rows,
    activations: torch.Tensor,
    a_ls: torch.Tensor,
    layers: torch.Tensor,
) -> tuple[torch.Tensor, float]:
    """``T = A_L,S + G N`` with ``G (I - N) = A_LF`` and ``N = diag(1/a) A_F,S``, for features
    in layer order with edges only from earlier layers (``layers`` non-decreasing).

    Back substitution over layer blocks, last layer first, pushing each finished block's
    ``G_m N_m,S`` into an accumulator: when block ``m`` is reached every later layer has
    pushed, so ``G_m = A_m + acc_m``, and at the end ``T = A_L,S + acc``. Each row of the
    float32 ``feature_rows`` ``[F, S]`` (dense, or :class:`SparseRows`) is read once, and only
    its columns that can be non-zero (earlier features, errors, tokens).

    Returns ``T`` and a residual: 0.0, as the substitution satisfies ``G (I - N) = A_LF`` by
    construction (its products are the residual's); ``inf`` when a value is not finite."""
    f = feature_rows.shape[0]
    s = a_ls.shape[1]
    inv_act = _inverse(activations)
    acc = torch.zeros_like(a_ls)
    if f:
        starts = torch.searchsorted(layers.contiguous(), torch.unique_consecutive(layers))
        bounds = [*starts.tolist(), f]
        for b0, b1 in reversed(list(itertools.pairwise(bounds))):
            g_m = a_ls[:, b0:b1] + acc[:, b0:b1]
            _push(acc, g_m * inv_act[b0:b1], feature_rows, b0, b1, [slice(0, b0), slice(f, s)])
    total = a_ls + acc
    if not bool(torch.isfinite(total).all()):
        return total, float("inf")
    return total, 0.0


def normalized_feature_rows(feature_rows: torch.Tensor, activations: torch.Tensor) -> torch.Tensor:
    """``N = diag(1/a) A_F,S`` in float64. A feature with zero activation is inactive: slope 0,
    row 0."""
    return feature_rows.to(torch.float64, copy=True).mul_(_inverse(activations)[:, None])


def layer_order(graph: AttributionGraph) -> torch.Tensor | None:
    """Feature indices sorted by layer (stable): the order in which ``I - N`` is triangular;
    None when the features already are in that order (circuit-tracer's own)."""
    layers = graph.features[:, 0]
    if bool((layers[1:] >= layers[:-1]).all()):
        return None
    return torch.argsort(layers, stable=True)


def _residual(g: torch.Tensor, n_ff: torch.Tensor, a_lf: torch.Tensor) -> float:
    if a_lf.numel() == 0:
        return 0.0
    err = float((g - g @ n_ff - a_lf).abs().max())
    colsum = float(n_ff.abs().sum(0).max()) if n_ff.numel() else 0.0
    return backward_error(err, float(a_lf.abs().max()), float(g.abs().max()), colsum)


def _solve(
    n_ff: torch.Tensor,
    a_lf: torch.Tensor,
    *,
    triangular: bool = False,
    order: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, float]:
    """``G (I - N) = A_LF``. ``triangular`` (no backward edge; features in layer order after
    permuting by ``order``, None = as they are): a triangular solve, O(F^2 K) instead of the
    general O(F^3)."""
    f = n_ff.shape[0]
    if f == 0:
        return a_lf.clone(), 0.0
    try:
        if triangular:
            # (I - N)^T G^T = A_LF^T, with (I - N)^T unit upper-triangular in layer order; the
            # solver reads only the strict upper triangle, so -N^T is all it needs
            if order is None:
                g = torch.linalg.solve_triangular(-n_ff.T, a_lf.T, upper=True, unitriangular=True).T
            else:
                m = -n_ff[order[:, None], order].T
                gt = torch.linalg.solve_triangular(
                    m, a_lf[:, order].T, upper=True, unitriangular=True
                )
                g = torch.empty_like(a_lf)
                g[:, order] = gt.T
        else:
            # G (I - N) = A_LF  <=>  (I - N)^T G^T = A_LF^T
            eye = torch.eye(f, dtype=n_ff.dtype)
            g = torch.linalg.solve((eye - n_ff).T, a_lf.T).T
    except RuntimeError:  # singular: not acyclic; let the series decide
        return None, float("inf")
    if not bool(torch.isfinite(g).all()):
        return None, float("inf")
    res = _residual(g, n_ff, a_lf)
    if res > SOLVE_TOLERANCE:
        return None, res
    return g, res


def _series(
    n_ff: torch.Tensor, a_lf: torch.Tensor, max_hops: int, graph: AttributionGraph
) -> tuple[torch.Tensor, int]:
    """G = A_LF (I + N + N^2 + ...): must reach an all-zero term (acyclic graph)."""
    g = a_lf.clone()
    term = a_lf
    scale = float(a_lf.abs().max()) if a_lf.numel() else 0.0
    for hop in range(1, max_hops + 1):
        term = term @ n_ff
        g = g + term
        size = float(term.abs().max()) if term.numel() else 0.0
        if not torch.isfinite(term).all():
            break
        if size == 0.0 or size <= 1e-14 * max(scale, float(g.abs().max())):
            return g, hop - 1 if size == 0.0 else hop
    m = graph.manifest
    raise AnalysisError(
        f"influence did not converge within {max_hops} hops: the feature graph has cycles "
        "or exploding edges (is the adjacency in circuit-tracer's node order?)",
        prompt_id=m.prompt_id,
        variant=m.variant,
    )


def _depth(edges: torch.Tensor) -> int:
    """Longest chain of feature->feature edges (``edges``: [F, F] bool, target x source;
    0 if none); -1 if there is a cycle."""
    f = edges.shape[0]
    reach = edges.to(torch.float32)
    v = torch.ones(f, dtype=torch.float32)
    for hop in range(f + 1):
        v = ((reach @ v) != 0).to(torch.float32)  # v[t]: some path of hop+1 edges ends at t
        if not bool(v.any()):
            return hop
    return -1


def _backward_edges(graph: AttributionGraph, a_ff: torch.Tensor) -> int:
    """Feature edges whose target's layer is not after the source's (0 in a sound graph)."""
    layers = graph.features[:, 0].contiguous()
    if layer_order(graph) is None:
        # layer-sorted (circuit-tracer's order): the rows of a layer may only have sources
        # before that layer's first feature, so count what lies at or after it
        bounds = torch.searchsorted(layers, torch.unique_consecutive(layers)).tolist()
        bounds.append(len(layers))
        return sum(
            int(torch.count_nonzero(a_ff[b0:b1, b0:])) for b0, b1 in itertools.pairwise(bounds)
        )
    not_forward = layers[:, None] <= layers[None, :]  # target layer <= source layer
    return int(((a_ff != 0) & not_forward).sum())
