"""Attribution graphs as stored artifacts: a safetensors file + a GraphManifest JSON. No pickles.

Format ``emc-graph`` v1 (tensor names in the safetensors file; node order as in
:mod:`common.graphs`: ``[features F][errors L*P][tokens P][logits K]``, S = F + L*P + P
source nodes):

``features``               int32   [F, 3]   (layer, position, feature id) of each feature node
``activations``            float32 [F]      activation of each feature node
``logit_rows``             float32 [K, S]   every edge into the logit nodes, exact
``feature_rows.indptr``    int32   [F+1]    CSR row pointer of the edges into feature nodes
``feature_rows.indices``   int16/32 [E]     source column of each kept edge (int16 when S < 2^15)
``feature_rows.values``    float16 [E]      edge weight / its row's scale
``feature_rows.scale``     float32 [F]      per-row scale (max |edge| of the row)

Why this is a fraction of circuit-tracer's dense ``Graph.to_pt`` (4 N^2 bytes):

1. *Structure (lossless).* Error and token nodes are sources only and logits are sinks, so
   only the F feature rows and K logit rows of the N x N matrix can be non-zero, and only in
   the S source columns. Everything else is not stored.
2. *Edges into features (lossy, bounded).* An edge ``s -> t`` changes the total signed
   influence of ``s`` on logit ``k`` by ``A[t, s] * G[k, t] / a_t`` (see
   :mod:`services.analysis.influence`: G is the total influence of feature t, a_t its
   activation). Each edge is scored ``|A[t, s]| * sum_k |G[k, t]| / |a_t|``, i.e. by how much
   influence on *any* logit (any signed evil/safe weighting) it can carry; the smallest
   scores are dropped until the dropped score mass reaches ``1 - EDGE_MASS_KEPT`` of the total.
   The kept values are stored as float16 relative to the row's max (relative error < 5e-4).
3. *Edges into logits* are kept exactly (float32), so direct effects are unchanged.

Consequence: influences on logits computed from a loaded graph differ from the full graph's
by at most about ``(1 - EDGE_MASS_KEPT)`` of the total influence mass; the top features of the
signed evil-minus-safe ranking are unchanged (tested on the toy organism). The viewer export
of a loaded graph prunes a graph that already lacks the weakest feature edges. Pruning
parameters and the edge counts are recorded in ``manifest.limits`` (``edges_*`` keys).

The safetensors metadata carries the sha256 of the manifest JSON, so a tensors file and a
manifest from different runs are never paired silently.
"""

from __future__ import annotations

import hashlib
import json
import struct
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from common.errors import PromptFailure
from common.experiment import Experiment
from common.graphs import AttributionGraph
from common.records import GraphManifest
from common.store import ObjectStore, StoreError, keys
from common.store.base import dumps

FORMAT = "emc-graph"
FORMAT_VERSION = "1"
#: fraction of the total edge-influence score mass of feature rows that is kept
EDGE_MASS_KEPT = 0.999
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


def edge_scores(graph: AttributionGraph) -> torch.Tensor:
    """``[F, S]``: how much influence on any logit each edge into a feature can carry."""
    from services.analysis.errors import AnalysisError
    from services.analysis.influence import logit_influence

    f = graph.n_features
    s = graph.token_slice.stop
    try:
        infl = logit_influence(graph)
    except AnalysisError as e:
        m = graph.manifest
        raise PromptFailure(
            "attribution", f"graph cannot be stored: {e.reason}", variant=m.variant
        ) from e
    g = infl.total[:, :f].abs().sum(dim=0)  # [F] total |influence| of each feature
    act = graph.activations.to(torch.float64).abs()
    weight = torch.where(act > 0, g / torch.where(act > 0, act, 1.0), 0.0)
    return graph.adjacency[:f, :s].to(torch.float64).abs() * weight[:, None]


def prune_mask(scores: torch.Tensor, keep: float) -> torch.Tensor:
    """Keep the largest scores until ``keep`` of their total mass is covered."""
    flat = scores.flatten()
    total = float(flat.sum())
    mask = torch.zeros_like(flat, dtype=torch.bool)
    if total <= 0.0:
        return mask.view_as(scores)
    order = torch.argsort(flat, descending=True)
    cum = torch.cumsum(flat[order], dim=0)
    n_keep = int(torch.searchsorted(cum, keep * total).item()) + 1
    mask[order[: min(n_keep, flat.numel())]] = True
    mask &= flat > 0
    return mask.view_as(scores)


# ------------------------------------------------------------------------ encode / decode


def encode(graph: AttributionGraph, keep: float = EDGE_MASS_KEPT) -> tuple[bytes, GraphManifest]:
    """safetensors bytes + the manifest that describes them (see module docstring)."""
    f = graph.n_features
    s = graph.token_slice.stop
    a = graph.adjacency
    scores = edge_scores(graph)
    mask = prune_mask(scores, keep)
    kept_mass = float(scores[mask].sum() / scores.sum()) if float(scores.sum()) > 0 else 1.0
    rows, cols = mask.nonzero(as_tuple=True)
    vals = a[:f, :s][rows, cols].to(torch.float32)
    scale = torch.zeros(f, dtype=torch.float32)
    if vals.numel():
        scale.scatter_reduce_(0, rows, vals.abs(), reduce="amax", include_self=True)
    rel = vals / scale[rows].clamp_min(torch.finfo(torch.float32).tiny)
    indptr = torch.zeros(f + 1, dtype=torch.int32)
    indptr[1:] = torch.cumsum(torch.bincount(rows, minlength=f), 0).to(torch.int32)
    index_dtype = torch.int16 if s < 2**15 else torch.int32
    tensors = {
        "features": graph.features.to(torch.int32).contiguous(),
        "activations": graph.activations.to(torch.float32).contiguous(),
        "logit_rows": a[graph.logit_slice, :s].to(torch.float32).contiguous(),
        "feature_rows.indptr": indptr,
        "feature_rows.indices": cols.to(index_dtype).contiguous(),
        "feature_rows.values": rel.to(torch.float16).contiguous(),
        "feature_rows.scale": scale,
    }
    nonzero = int((a[:f, :s] != 0).sum())
    manifest = graph.manifest.model_copy(
        update={
            "adjacency_dtype": "float16",
            "tensors": {name: list(t.shape) for name, t in tensors.items()},
            "limits": {
                **graph.manifest.limits,
                "edges_mass_kept": kept_mass,
                "edges_keep_target": keep,
                "edges_feature_nonzero": nonzero,
                "edges_feature_kept": int(rows.numel()),
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
    return st_save(tensors, metadata=meta), manifest


def _manifest_sha(manifest: GraphManifest) -> str:
    return hashlib.sha256(dumps(manifest.model_dump(mode="json"))).hexdigest()


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
    f, k = manifest.n_features, manifest.n_logits
    s = f + (manifest.n_layers + 1) * manifest.n_pos
    n = s + k
    adjacency = torch.zeros(n, n, dtype=torch.float32)
    indptr = t["feature_rows.indptr"].to(torch.int64)
    rows = torch.repeat_interleave(torch.arange(f), indptr[1:] - indptr[:-1])
    cols = t["feature_rows.indices"].to(torch.int64)
    scale = t["feature_rows.scale"]
    adjacency[rows, cols] = t["feature_rows.values"].to(torch.float32) * scale[rows]
    adjacency[s:, :s] = t["logit_rows"]
    return AttributionGraph(
        manifest=manifest,
        adjacency=adjacency,
        features=t["features"].to(torch.int64),
        activations=t["activations"].to(torch.float32),
    )


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
