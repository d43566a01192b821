"""The stored attribution graph (format ``emc-graph`` v1): safetensors tensors + a
:class:`~common.records.GraphManifest` JSON; no pickles. What is stored, why it is small,
and why the analysis cannot tell the difference: ``docs/graph-format.md``.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from safetensors.numpy import save as st_save
from safetensors.torch import load as st_load

from common.errors import AnalysisError, PromptFailure
from common.experiment import Experiment
from common.graph import influence as _influence_mod
from common.graph.influence import (
    LogitInfluence,
    layer_order,
    logit_influence,
    normalized_feature_rows,
    scaled_rows_product,
    solve_rows,
    solve_total,
)
from common.graph.model import AttributionGraph
from common.records import GraphManifest
from common.store import CorruptArtifact, NotFound, ObjectStore, StoreError, keys
from common.store.base import dumps

FORMAT = "emc-graph"
FORMAT_VERSION = "1"
#: fraction of the total edge-influence score mass of feature rows that is kept
EDGE_MASS_KEPT = 0.999
#: largest relative change of any logit influence a stored graph may have (checked on encode)
INFLUENCE_TOLERANCE = 1e-5
_META_KEY = "emc"


class GraphFormatError(CorruptArtifact):
    """A stored graph cannot be read: wrong format, version, or a torn write (the message
    names the key once :func:`load_graph` knows it)."""

    def __init__(self, problem: str, key: str | None = None) -> None:
        if key is not None:
            super().__init__(key, problem)
        else:
            StoreError.__init__(self, problem)
            self.key, self.problem = "", problem


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


def edge_scores(influence: LogitInfluence, graph: AttributionGraph) -> torch.Tensor:
    """``[F, S]`` float32: how much influence on any logit each edge into a feature carries,
    ``|A[t, s]| * sum_k |G[k, t]| / |a_t|`` (``influence`` from :func:`_influence`)."""
    f = graph.n_features
    act = graph.activations.to(torch.float64).abs()
    weight = influence.total[:, :f].abs().sum(dim=0)
    per_row = torch.where(act > 0, weight / torch.where(act > 0, act, 1.0), 0.0)
    rows = graph.adjacency[:f, : graph.token_slice.stop]
    return rows.abs().mul_(per_row.to(torch.float32)[:, None])


@dataclass(frozen=True)
class Pruning:
    """Which edges are kept, and the share of the total score they carry."""

    mask: torch.Tensor  # bool, the shape of the scores
    kept_mass: float


#: rows of feature edges handled at a time when the kept ones are gathered
_PRUNE_ROWS = 2048


#: values summed per block while looking for the pruning threshold
_PRUNE_BLOCK = 1 << 14


def prune(scores: torch.Tensor, keep: float) -> Pruning:
    """Keep the largest scores until ``keep`` of their total mass is covered (every score
    equal to the smallest one kept is kept too; zeros never are).

    The positive scores are sorted ascending (numpy sorts many times faster than torch, and
    float32 scores are half the bytes); the dropped tail, at most ``1 - keep`` of the mass,
    is found from block sums, so no running sum of every value is written."""
    flat = scores.detach().cpu().flatten().numpy()
    ordered = np.sort(flat[flat > 0])
    n = ordered.size
    if n == 0:
        return Pruning(torch.zeros_like(scores, dtype=torch.bool), 1.0)
    total = float(ordered.sum(dtype=np.float64))
    limit = total - keep * total  # the most mass the smallest dropped values may carry
    blocks = np.cumsum(np.add.reduceat(ordered, np.arange(0, n, _PRUNE_BLOCK), dtype=np.float64))
    j = int(np.searchsorted(blocks, limit, side="right"))  # whole blocks that fit
    base = float(blocks[j - 1]) if j > 0 else 0.0
    partial = base + np.cumsum(ordered[j * _PRUNE_BLOCK : (j + 1) * _PRUNE_BLOCK], dtype=np.float64)
    dropped = min(j * _PRUNE_BLOCK + int(np.searchsorted(partial, limit, side="right")), n - 1)
    threshold = ordered[dropped]
    first = int(np.searchsorted(ordered, threshold, side="left"))  # ties are kept too
    kept = float(ordered[first:].sum(dtype=np.float64))
    return Pruning(scores >= float(threshold), kept / total)


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


def _kept_rows(
    a: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The kept edges of feature rows ``a`` ``[F, S]`` as CSR (indptr int32, column indices,
    float16 values relative to each row's largest kept magnitude, and that per-row scale),
    built a block of rows at a time (no int64 index pair per edge of the whole graph)."""
    f = a.shape[0]
    counts, cols, rel = [], [], []
    scale = torch.zeros(f, dtype=torch.float32)
    for r0 in range(0, f, _PRUNE_ROWS):
        r1 = min(r0 + _PRUNE_ROWS, f)
        rr, cc = mask[r0:r1].nonzero(as_tuple=True)
        vals = a[r0:r1][rr, cc].to(torch.float32)
        sc = torch.zeros(r1 - r0, dtype=torch.float32)
        if vals.numel():
            sc.scatter_reduce_(0, rr, vals.abs(), reduce="amax", include_self=True)
        scale[r0:r1] = sc
        rel.append((vals / sc[rr].clamp_min(torch.finfo(torch.float32).tiny)).to(torch.float16))
        cols.append(cc.to(torch.int32))
        counts.append(torch.bincount(rr, minlength=r1 - r0))
    indptr = torch.zeros(f + 1, dtype=torch.int32)
    if f:
        indptr[1:] = torch.cumsum(torch.cat(counts), 0).to(torch.int32)
    empty = torch.zeros(0)
    return (
        indptr,
        torch.cat(cols) if cols else empty.to(torch.int32),
        torch.cat(rel) if rel else empty.to(torch.float16),
        scale,
    )


def encode(graph: AttributionGraph, keep: float = EDGE_MASS_KEPT) -> tuple[bytes, GraphManifest]:
    """safetensors bytes + the manifest that describes them (see module docstring)."""
    f = graph.n_features
    s = graph.token_slice.stop
    a = graph.adjacency
    influence = _influence(graph)
    total = influence.total
    scores = edge_scores(influence, graph)
    pruning = prune(scores, keep)
    del scores
    indptr, cols, rel, scale = _kept_rows(a[:f, :s], pruning.mask)
    n_kept_edges = int(cols.numel())
    kept_mass = pruning.kept_mass
    del pruning
    # feature rows exactly as a reader will rebuild them from the stored CSR
    kept = _feature_rows(indptr, cols, rel, scale, (f, s))
    act = graph.activations.to(torch.float64)
    inv_act = torch.where(act != 0, 1.0 / torch.where(act != 0, act, 1.0), 0.0)
    # Logit rows: direct edges + what the dropped (and rounded) feature edges carried, so
    # that total influence computed from the stored graph equals the full graph's.
    logit_rows = (total - scaled_rows_product(total[:, :f], kept, inv_act, slice(0, s))).to(
        torch.float32
    )
    direct = a[graph.logit_slice, :s]
    # Verify by solving the stored graph's influence afresh (as the analysis will, from the
    # float16/float32 values written) instead of trusting the algebra.
    order = layer_order(graph)
    if influence.backward_edges == 0 and order is None:
        check: torch.Tensor | None
        check, residual = solve_rows(kept, graph.activations, logit_rows.to(torch.float64),
                                     graph.features[:, 0])  # fmt: skip
        if residual > _influence_mod.SOLVE_TOLERANCE:
            check = None
    else:
        check, _ = solve_total(
            normalized_feature_rows(kept, graph.activations),
            logit_rows.to(torch.float64),
            triangular=influence.backward_edges == 0,
            order=order,
        )
    if check is None:  # the solve is not trusted (as for the full graph): the analysis' series
        parts = {"features": graph.features, "activations": graph.activations}
        check = _influence(_assemble(graph.manifest, kept, logit_rows, parts)).total
    del kept
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
                "edges_mass_kept": kept_mass,
                "edges_keep_target": keep,
                "edges_feature_nonzero": int(torch.count_nonzero(a[:f, :s])),
                "edges_feature_kept": n_kept_edges,
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
    return hashlib.sha256(dumps(manifest.model_dump(mode="json", exclude=_NOT_HASHED))).hexdigest()


#: manifest fields outside its digest: timing, and the tensors' own checksums (the digest is
#: written into the tensors, so it cannot cover them)
_NOT_HASHED = {"elapsed_s", "tensors_bytes", "tensors_sha256"}


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
    """Write tensors, then the manifest with their size and sha256 (a reader that finds the
    manifest finds both, and can tell whether the tensors are the ones it describes)."""
    name = exp if isinstance(exp, str) else exp.name
    m = graph.manifest
    data, manifest = encode(graph)
    manifest = manifest.model_copy(
        update={"tensors_bytes": len(data), "tensors_sha256": hashlib.sha256(data).hexdigest()}
    )
    store.put_bytes(keys.graph_tensors(name, m.prompt_id, m.fingerprint, m.variant), data)
    store.put_json(
        keys.graph_manifest(name, m.prompt_id, m.fingerprint, m.variant),
        manifest.model_dump(mode="json"),
    )
    return manifest


def check_tensors(key: str, data: bytes, manifest: GraphManifest) -> None:
    """Raise :class:`CorruptArtifact` (naming ``key``) unless ``data`` are the tensors the
    manifest describes (size, sha256; manifests older than these checks: the format's own)."""
    if manifest.tensors_bytes is not None and len(data) != manifest.tensors_bytes:
        raise CorruptArtifact(
            key, f"{len(data)} bytes, its manifest says {manifest.tensors_bytes}: truncated?"
        )
    if manifest.tensors_sha256 is not None:
        digest = hashlib.sha256(data).hexdigest()
        if digest != manifest.tensors_sha256:
            raise CorruptArtifact(key, f"sha256 {digest[:12]}…, its manifest says another")


def load_graph(
    store: ObjectStore, exp_name: str, pid: str, fp: str, variant: str
) -> AttributionGraph:
    """Read a stored graph, verified: raises :class:`common.store.NotFound` if there is none
    and :class:`CorruptArtifact` (naming the key and the ``emc retry`` that recomputes it)
    if its tensors are not the ones its manifest describes."""
    manifest = store.get_record(keys.graph_manifest(exp_name, pid, fp, variant), GraphManifest)
    key = keys.graph_tensors(exp_name, pid, fp, variant)
    data = store.get_bytes(key)
    try:
        _check_pair(data, manifest)
        check_tensors(key, data, manifest)
        return decode(data, manifest)
    except GraphFormatError as e:
        if e.key:
            raise
        raise GraphFormatError(e.problem, key) from None
    except CorruptArtifact:
        raise
    except Exception as e:  # safetensors' own errors on bytes that passed no checksum
        raise CorruptArtifact(key, f"{type(e).__name__}: {e}") from None


def _check_pair(data: bytes, manifest: GraphManifest) -> None:
    """Raise :class:`GraphFormatError` unless the tensors' header names this manifest."""
    if _metadata(data).get("manifest_sha256") != _manifest_sha(manifest):
        raise GraphFormatError(
            f"graph tensors of {manifest.prompt_id}/{manifest.variant} belong to another "
            "manifest (a run was interrupted between the two writes)"
        )


def verified_manifest(
    store: ObjectStore, exp_name: str, pid: str, fp: str, variant: str, *, full: bool = True
) -> GraphManifest:
    """The manifest of a stored graph whose tensors match it: raises ``NotFound`` when
    there is no manifest and :class:`CorruptArtifact` otherwise. ``full``: read the tensors
    and check size, sha256 and format header (no decoding); else only compare their size
    with the manifest's (one stat, no read: what a cached ranking checks)."""
    manifest = store.get_record(keys.graph_manifest(exp_name, pid, fp, variant), GraphManifest)
    key = keys.graph_tensors(exp_name, pid, fp, variant)
    try:
        if full:
            data = store.get_bytes(key)
            _check_pair(data, manifest)
            check_tensors(key, data, manifest)
        else:
            size = store.size(key)
            if manifest.tensors_bytes is not None and size != manifest.tensors_bytes:
                raise CorruptArtifact(
                    key, f"{size} bytes, its manifest says {manifest.tensors_bytes}: truncated?"
                )
    except NotFound:
        raise CorruptArtifact(key, "missing, its manifest exists") from None
    except GraphFormatError as e:
        raise GraphFormatError(e.problem, key) from None
    return manifest


def graph_problem(
    store: ObjectStore, exp_name: str, pid: str, fp: str, variant: str, *, full: bool = True
) -> str | None:
    """Why the stored graph of (prompt, variant) cannot be used, or None if it can or if
    there is none (:func:`verified_manifest`)."""
    try:
        verified_manifest(store, exp_name, pid, fp, variant, full=full)
    except NotFound:
        return None
    except StoreError as e:
        return str(e)
    return None


def delete_graph(store: ObjectStore, exp_name: str, pid: str, fp: str, variant: str) -> None:
    """Remove a stored graph (manifest first: a reader never finds a manifest without tensors)."""
    store.delete(keys.graph_manifest(exp_name, pid, fp, variant))
    store.delete(keys.graph_tensors(exp_name, pid, fp, variant))


def graph_exists(store: ObjectStore, exp_name: str, pid: str, fp: str, variant: str) -> bool:
    """Whether the graph of ``variant`` for prompt ``pid`` in run ``fp`` is stored (its manifest
    exists; not verified)."""
    return store.exists(keys.graph_manifest(exp_name, pid, fp, variant))


def graphs_done(
    store: ObjectStore, exp_name: str, pid: str, fp: str, variants: Sequence[str]
) -> bool:
    """Whether every one of ``variants`` has a stored graph of this prompt."""
    return all(graph_exists(store, exp_name, pid, fp, v) for v in variants)
