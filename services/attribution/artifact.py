"""Attribution graphs as stored artifacts: a safetensors file + a GraphManifest JSON. No pickles.

Format ``emc-graph`` v1 (tensor names in the safetensors file; node order as in
:mod:`common.graphs`: ``[features F][errors L*P][tokens P][logits K]``, S = F + L*P + P
source nodes):

``features``               int32    [F, 3]  (layer, position, feature id) of each feature node
``activations``            float32  [F]     activation of each feature node
``feature_rows.indptr``    int32    [F+1]   CSR row pointer of the kept edges into features
``feature_rows.indices``   int16/32 [E]     source column of each kept edge (int16 when S < 2^15)
``feature_rows.values``    float16  [E]     edge weight / its row's scale
``feature_rows.scale``     float32  [F]     per-row scale (max |edge| of the row)
``logit_rows``             float32  [K, S]  edges into the logits (see 3.)

Why it is a small fraction of circuit-tracer's dense ``Graph.to_pt`` (4 N^2 bytes), and why the
analysis cannot tell the difference:

1. *Structure (lossless).* Error and token nodes are sources only and logits are sinks, so
   only the F feature rows and K logit rows of the N x N matrix can be non-zero, and only in
   the S source columns. Nothing else is stored.
2. *Edges into features (pruned, float16).* With ``T`` the signed total influence of every
   source on every logit and ``G = T[:, features]`` (:mod:`services.analysis.influence`), an
   edge ``s -> t`` carries ``A[t, s] * G[k, t] / a_t`` of source s's influence on logit k. Each
   edge is scored ``|A[t, s]| * sum_k |G[k, t]| / |a_t|`` (what it can carry to *any* logit,
   so to any evil/safe weighting); the highest-scoring edges holding ``EDGE_MASS_KEPT`` of the
   total score are kept (with any edge tied with the last one), in float16 relative to their
   row's max.
3. *Edges into logits (float32, made exact for influence).* Stored as the direct edges plus
   what the dropped and rounded feature edges carried:
   ``logit_rows = A_L + G (A_F - A'_F) diag(1/a)`` = ``T - G A'_F diag(1/a)``, where ``A'_F``
   is exactly what is read back. Then the total influence computed from the stored graph
   equals the full graph's, for every source and every logit: feature rankings (any signed
   evil/safe weighting) are unchanged. :func:`encode` solves the influence of the graph it
   is about to store afresh, from the float16/float32 values a reader will get, and refuses
   to store it if any value moved by more than ``INFLUENCE_TOLERANCE`` (relative to the
   largest). The price: a logit row is no longer the
   pure one-hop effect; ``manifest.limits["logit_rows_shift"]`` records the largest change
   relative to the largest direct edge (small on the organism; large only when many-hop paths
   dominate).

The viewer export of a loaded graph prunes a graph that already lacks the weakest feature
edges. Pruning settings and edge counts are in ``manifest.limits`` (``edges_*``).

The safetensors metadata carries the sha256 of the manifest JSON (without ``elapsed_s``), so
a tensors file and a manifest of different numbers are never paired silently. Recomputing a
graph gives identical tensors bytes (CPU, same fingerprint).
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from safetensors.numpy import save as st_save
from safetensors.torch import load as st_load

from common.errors import PromptFailure
from common.experiment import Experiment
from common.graphs import AttributionGraph
from common.records import GraphManifest
from common.store import ObjectStore, StoreError, keys
from common.store.base import dumps
from services.analysis.errors import AnalysisError
from services.analysis.influence import (
    LogitInfluence,
    layer_order,
    logit_influence,
    normalized_feature_rows,
    solve_total,
)

FORMAT = "emc-graph"
FORMAT_VERSION = "1"
#: fraction of the total edge-influence score mass of feature rows that is kept
EDGE_MASS_KEPT = 0.999
#: largest relative change of any logit influence a stored graph may have (checked on encode)
INFLUENCE_TOLERANCE = 1e-5
_META_KEY = "emc"


class GraphFormatError(StoreError):
    """A stored graph cannot be read: wrong format, version, or a torn write."""


def from_circuit_tracer(
    graph: Any,
    *,
    prompt_id: str,
    variant: str,
    fingerprint: str,
    prompt_text: str,
    tokenizer: Any,
    limits: dict[str, float | int | None],
    elapsed_s: float = 0.0,
) -> AttributionGraph:
    """Convert a circuit-tracer ``Graph`` (dense, unpruned) to :class:`AttributionGraph`.

    Feature nodes are the graph's *selected* features, in circuit-tracer's order.
    """
    sel = graph.selected_features.cpu()
    features = graph.active_features.cpu()[sel].to(torch.int64)
    activations = graph.activation_values.cpu()[sel].to(torch.float32)
    adjacency = graph.adjacency_matrix.cpu().to(torch.float32)
    ids = [int(x) for x in graph.input_tokens.cpu().tolist()]
    n_layers = int(graph.cfg.n_layers)
    n_pos, n_feat, n_logits = len(ids), int(features.shape[0]), len(graph.logit_targets)
    n = n_feat + (n_layers + 1) * n_pos + n_logits
    if tuple(adjacency.shape) != (n, n):
        raise ValueError(
            f"adjacency {tuple(adjacency.shape)} does not match {n_feat} features, "
            f"{n_layers} layers x {n_pos} positions and {n_logits} logits"
        )
    scan = graph.scan
    manifest = GraphManifest(
        prompt_id=prompt_id,
        variant=variant,
        fingerprint=fingerprint,
        prompt_text=prompt_text,
        input_ids=ids,
        input_tokens=[str(tokenizer.decode([i])) for i in ids],
        n_layers=n_layers,
        n_pos=n_pos,
        n_features=n_feat,
        n_logits=n_logits,
        logit_token_ids=[int(t.vocab_idx) for t in graph.logit_targets],
        logit_tokens=[str(t.token_str) for t in graph.logit_targets],
        logit_probabilities=[float(p) for p in graph.logit_probabilities.cpu().tolist()],
        adjacency_dtype="float32",
        tensors={"adjacency": [n, n], "features": [n_feat, 3], "activations": [n_feat]},
        limits=dict(limits),
        scan="-".join(scan) if isinstance(scan, list) else scan,
        elapsed_s=elapsed_s,
    )
    return AttributionGraph(
        manifest=manifest, adjacency=adjacency, features=features, activations=activations
    )


# ------------------------------------------------------------------------ pruning


def _influence(graph: AttributionGraph) -> LogitInfluence:
    """Signed total influence of every source on every logit (the analysis' computation)."""
    try:
        return logit_influence(graph, count_hops=False)
    except AnalysisError as e:
        m = graph.manifest
        raise PromptFailure(
            "attribution", f"graph cannot be stored: {e.reason}", variant=m.variant
        ) from e


def edge_scores(influence: LogitInfluence) -> torch.Tensor:
    """``[F, S]``: how much influence on any logit each edge into a feature carries,
    ``|A[t, s]| * sum_k |G[k, t]| / |a_t|`` (``influence`` from :func:`_influence`)."""
    f = influence.normalized.shape[0]
    return influence.normalized.abs().mul_(influence.total[:, :f].abs().sum(dim=0)[:, None])


@dataclass(frozen=True)
class Pruning:
    """Which edges are kept, and the share of the total score they carry."""

    mask: torch.Tensor  # bool, the shape of the scores
    kept_mass: float


def prune(scores: torch.Tensor, keep: float) -> Pruning:
    """Keep the largest scores until ``keep`` of their total mass is covered (every score
    equal to the smallest one kept is kept too; zeros never are)."""
    flat = scores.detach().cpu().flatten().numpy()
    # only positive scores can be kept, and numpy sorts values many times faster than torch
    values = np.sort(flat[flat > 0])[::-1]
    if values.size == 0:
        return Pruning(torch.zeros_like(scores, dtype=torch.bool), 1.0)
    cum = np.cumsum(values)
    n_keep = min(int(np.searchsorted(cum, keep * cum[-1])) + 1, values.size)
    threshold = values[n_keep - 1]
    n_kept = int(np.searchsorted(-values, -threshold, side="right"))  # ties included
    return Pruning(scores >= float(threshold), float(cum[n_kept - 1] / cum[-1]))


# ------------------------------------------------------------------------ encode / decode


def _feature_rows(
    indptr: torch.Tensor,
    indices: torch.Tensor,
    values: torch.Tensor,
    scale: torch.Tensor,
    shape: tuple[int, int],
) -> torch.Tensor:
    """Dense float32 ``[F, S]`` edges into features from the stored CSR (encode and decode
    both use this, so the logit-row correction is computed on exactly what is read back)."""
    dense = torch.zeros(shape, dtype=torch.float32)
    ptr = indptr.to(torch.int64)
    rows = torch.repeat_interleave(torch.arange(shape[0]), ptr[1:] - ptr[:-1])
    dense[rows, indices.to(torch.int64)] = values.to(torch.float32) * scale[rows]
    return dense


def _assemble(
    manifest: GraphManifest,
    feature_rows: torch.Tensor,
    logit_rows: torch.Tensor,
    graph_parts: dict[str, torch.Tensor],
) -> AttributionGraph:
    f = manifest.n_features
    s = f + (manifest.n_layers + 1) * manifest.n_pos
    n = s + manifest.n_logits
    adjacency = torch.zeros(n, n, dtype=torch.float32)
    adjacency[:f, :s] = feature_rows
    adjacency[s:, :s] = logit_rows
    return AttributionGraph(manifest=manifest, adjacency=adjacency, **graph_parts)


def encode(graph: AttributionGraph, keep: float = EDGE_MASS_KEPT) -> tuple[bytes, GraphManifest]:
    """safetensors bytes + the manifest that describes them (see module docstring)."""
    f = graph.n_features
    s = graph.token_slice.stop
    a = graph.adjacency
    influence = _influence(graph)
    total = influence.total
    scores = edge_scores(influence)
    pruning = prune(scores, keep)
    rows, cols = pruning.mask.nonzero(as_tuple=True)
    vals = a[:f, :s][rows, cols].to(torch.float32)
    scale = torch.zeros(f, dtype=torch.float32)
    if vals.numel():
        scale.scatter_reduce_(0, rows, vals.abs(), reduce="amax", include_self=True)
    rel = (vals / scale[rows].clamp_min(torch.finfo(torch.float32).tiny)).to(torch.float16)
    indptr = torch.zeros(f + 1, dtype=torch.int32)
    indptr[1:] = torch.cumsum(torch.bincount(rows, minlength=f), 0).to(torch.int32)
    # normalized feature rows exactly as a reader will rebuild them from the stored CSR
    kept = _feature_rows(indptr, cols, rel, scale, (f, s))
    n_kept = normalized_feature_rows(kept, graph.activations)
    # Logit rows: direct edges + what the dropped (and rounded) feature edges carried, so
    # that total influence computed from the stored graph equals the full graph's.
    logit_rows = (total - total[:, :f] @ n_kept).to(torch.float32)
    direct = a[graph.logit_slice, :s]
    # Verify by solving the stored graph's influence afresh (as the analysis will, from the
    # float16/float32 values written) instead of trusting the algebra.
    check, _ = solve_total(
        n_kept,
        logit_rows.to(torch.float64),
        triangular=influence.backward_edges == 0,
        order=layer_order(graph),
    )
    if check is None:  # the solve is not trusted (as for the full graph): the analysis' series
        parts = {"features": graph.features, "activations": graph.activations}
        check = _influence(_assemble(graph.manifest, kept, logit_rows, parts)).total
    scale_t = float(total.abs().max()) or 1.0
    error = float((check - total).abs().max()) / scale_t
    if error > INFLUENCE_TOLERANCE:
        raise RuntimeError(
            f"stored graph would change logit influences by {error:.2e} (relative): not storing "
            "it; this is a bug in the artifact encoding"
        )
    index_dtype = torch.int16 if s < 2**15 else torch.int32
    tensors = {
        "features": graph.features.to(torch.int32).contiguous(),
        "activations": graph.activations.to(torch.float32).contiguous(),
        "logit_rows": logit_rows.contiguous(),
        "feature_rows.indptr": indptr,
        "feature_rows.indices": cols.to(index_dtype).contiguous(),
        "feature_rows.values": rel.contiguous(),
        "feature_rows.scale": scale,
    }
    manifest = graph.manifest.model_copy(
        update={
            "adjacency_dtype": "float16",
            "tensors": {name: list(t.shape) for name, t in tensors.items()},
            "limits": {
                **graph.manifest.limits,
                "edges_mass_kept": pruning.kept_mass,
                "edges_keep_target": keep,
                "edges_feature_nonzero": int(torch.count_nonzero(a[:f, :s])),
                "edges_feature_kept": int(rows.numel()),
                "logit_rows_shift": float((logit_rows - direct).abs().max())
                / (float(direct.abs().max()) or 1.0),
                "influence_error": error,
                "n_nodes": graph.n_nodes,
            },
        }
    )
    # one metadata key: safetensors writes metadata in hash-map order, several keys would make
    # the bytes of identical graphs differ between runs
    meta = {
        _META_KEY: json.dumps(
            {
                "format": FORMAT,
                "version": FORMAT_VERSION,
                "manifest_sha256": _manifest_sha(manifest),
            },
            sort_keys=True,
        )
    }
    # safetensors' numpy writer gives the same bytes as its torch writer, which caches a new
    # ctypes array type for every distinct tensor size: a slow leak in a long-lived worker
    return st_save({k: t.numpy() for k, t in tensors.items()}, metadata=meta), manifest


def _manifest_sha(manifest: GraphManifest) -> str:
    """Digest of what the manifest says about the numbers (timing left out, so a re-run that
    was interrupted between its two writes still pairs with the previous run's manifest)."""
    return hashlib.sha256(
        dumps(manifest.model_dump(mode="json", exclude={"elapsed_s"}))
    ).hexdigest()


def _metadata(data: bytes) -> dict[str, str]:
    try:
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + n])
        meta = json.loads(header.get("__metadata__", {}).get(_META_KEY, "{}"))
    except (struct.error, ValueError, AttributeError) as e:
        raise GraphFormatError(f"graph tensors are not a readable safetensors file: {e}") from e
    return {str(k): str(v) for k, v in meta.items()}


def decode(data: bytes, manifest: GraphManifest) -> AttributionGraph:
    """Rebuild the dense in-memory graph from stored bytes and their manifest."""
    meta = _metadata(data)
    if meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
        raise GraphFormatError(
            f"graph tensors are format {meta.get('format')!r} v{meta.get('version')}, this emc "
            f"reads {FORMAT} v{FORMAT_VERSION}: recompute the graph or upgrade emc"
        )
    if meta.get("manifest_sha256") != _manifest_sha(manifest):
        raise GraphFormatError(
            f"graph tensors of {manifest.prompt_id}/{manifest.variant} belong to another "
            "manifest (a run was interrupted between the two writes): recompute the graph"
        )
    t = st_load(data)
    for name, shape in manifest.tensors.items():
        if name not in t or list(t[name].shape) != shape:
            raise GraphFormatError(f"tensor {name} is missing or not of shape {shape}")
    f = manifest.n_features
    s = f + (manifest.n_layers + 1) * manifest.n_pos
    kept = _feature_rows(
        t["feature_rows.indptr"],
        t["feature_rows.indices"],
        t["feature_rows.values"],
        t["feature_rows.scale"],
        (f, s),
    )
    parts = {
        "features": t["features"].to(torch.int64),
        "activations": t["activations"].to(torch.float32),
    }
    return _assemble(manifest, kept, t["logit_rows"], parts)


# ------------------------------------------------------------------------ store


def save_graph(store: ObjectStore, exp: Experiment | str, graph: AttributionGraph) -> GraphManifest:
    """Write tensors, then the manifest (a reader that finds the manifest finds both)."""
    name = exp if isinstance(exp, str) else exp.name
    m = graph.manifest
    data, manifest = encode(graph)
    store.put_bytes(keys.graph_tensors(name, m.prompt_id, m.fingerprint, m.variant), data)
    store.put_json(
        keys.graph_manifest(name, m.prompt_id, m.fingerprint, m.variant),
        manifest.model_dump(mode="json"),
    )
    return manifest


def load_graph(
    store: ObjectStore, exp_name: str, pid: str, fp: str, variant: str
) -> AttributionGraph:
    """Read a stored graph (raises :class:`common.store.NotFound` if there is none)."""
    manifest = store.get_record(keys.graph_manifest(exp_name, pid, fp, variant), GraphManifest)
    data = store.get_bytes(keys.graph_tensors(exp_name, pid, fp, variant))
    return decode(data, manifest)


def graph_exists(store: ObjectStore, exp_name: str, pid: str, fp: str, variant: str) -> bool:
    return store.exists(keys.graph_manifest(exp_name, pid, fp, variant))
