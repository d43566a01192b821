"""The stored attribution graph (format ``emc-graph`` v1): safetensors tensors + a
:class:`~common.records.GraphManifest` JSON; no pickles. What is stored, why it is small,
and why the analysis cannot tell the difference: ``docs/graph-format.md``.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from safetensors.numpy import save as st_save
from safetensors.torch import load as st_load

from common.errors import AnalysisError, PromptFailure
from common.experiment import Experiment
from common.graph import influence as _influence_mod
from common.graph.influence import (
    LogitInfluence,
    SparseRows,
    layer_order,
    logit_influence,
    scaled_rows_product,
    solve_rows,
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


#: scores handled at a time: small temporaries, reused by the allocator (a fresh large
#: allocation costs a page fault per page, which dominated whole-matrix temporaries)
_CHUNK = 1 << 20

#: low bits of a positive float32's bit pattern dropped to name its bucket (2^15 buckets,
#: each a 1/128 slice of an octave)
_BUCKET_SHIFT = 16


@dataclass(frozen=True)
class EdgeScores:
    """How much influence on any logit each edge into a feature carries,
    ``|A[t, s]| * sum_k |G[k, t]| / |a_t|``, computed a block of rows at a time: the ``[F, S]``
    matrix of scores is never held."""

    rows: torch.Tensor  # [F, S] float32: the graph's edges into features
    per_row: torch.Tensor  # [F] float32: sum_k |G[k, t]| / |a_t|

    @classmethod
    def of(cls, influence: LogitInfluence, graph: AttributionGraph) -> EdgeScores:
        """The scores of ``graph``'s feature edges (``influence`` from :func:`_influence`)."""
        f = graph.n_features
        act = graph.activations.to(torch.float64).abs()
        weight = influence.total[:, :f].abs().sum(dim=0)
        per_row = torch.where(act > 0, weight / torch.where(act > 0, act, 1.0), 0.0)
        rows = graph.adjacency[:f, : graph.token_slice.stop]
        return cls(rows, per_row.to(torch.float32))

    def blocks(self) -> Iterator[tuple[int, int, torch.Tensor]]:
        """``(r0, r1, scores of rows r0:r1)`` for consecutive blocks of about ``_CHUNK``."""
        f, s = self.rows.shape
        step = max(1, _CHUNK // max(s, 1))
        for r0 in range(0, f, step):
            r1 = min(r0 + step, f)
            yield r0, r1, self.rows[r0:r1].abs().mul_(self.per_row[r0:r1, None])


@dataclass(frozen=True)
class Pruning:
    """The smallest score kept (every score at or above it is kept; > 0, so zeros never are),
    and the share of the total score the kept ones carry."""

    threshold: float
    kept_mass: float

    def keeps(self, scores: torch.Tensor) -> torch.Tensor:
        """Which of ``scores`` are kept (bool, their shape)."""
        return scores >= self.threshold


def _score_chunks(scores: torch.Tensor | EdgeScores) -> Iterator[torch.Tensor]:
    if isinstance(scores, EdgeScores):
        for _, _, block in scores.blocks():
            yield block.flatten()
        return
    flat = scores.detach().cpu().flatten()
    for c0 in range(0, flat.numel(), _CHUNK):
        yield flat[c0 : c0 + _CHUNK]


def _bucketed(scores: torch.Tensor | EdgeScores) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Each chunk of the scores (float32, negatives as 0) with its bucket keys."""
    for chunk in _score_chunks(scores):
        v = chunk.to(torch.float32).clamp_min(0.0)
        yield v, v.view(torch.int32) >> _BUCKET_SHIFT  # zeros (and subnormals) in bucket 0


def prune(scores: torch.Tensor | EdgeScores, keep: float) -> Pruning:
    """Keep the largest scores until ``keep`` of their total mass is covered (every score
    equal to the smallest one kept is kept too; zeros never are).

    No sort of every score: a non-negative float32's bit pattern orders like its value, so
    its high bits name a bucket; the mass per bucket (float64) finds the bucket where the
    dropped tail (at most ``1 - keep`` of the mass) ends, and only that bucket's values are
    sorted. Two passes over the scores, a chunk at a time."""
    mass = torch.zeros(1 << (31 - _BUCKET_SHIFT), dtype=torch.float64)
    for v, key in _bucketed(scores):
        chunk = torch.bincount(key, weights=v.to(torch.float64))
        mass[: chunk.numel()] += chunk
    below = torch.cumsum(mass, 0)
    total = float(below[-1])
    if total == 0.0:
        return Pruning(float("inf"), 1.0)
    limit = total - keep * total  # the most mass the smallest dropped values may carry
    at = torch.tensor([limit], dtype=torch.float64)
    b = min(int(torch.searchsorted(below, at, right=True)), mass.numel() - 1)
    while mass[b] == 0:  # the crossing bucket holds values (rounding may point past one)
        b -= 1
    base = float(below[b - 1]) if b > 0 else 0.0
    inside = torch.sort(torch.cat([v[(k == b) & (v > 0)] for v, k in _bucketed(scores)])).values
    partial = base + torch.cumsum(inside.to(torch.float64), 0)
    dropped = min(int(torch.searchsorted(partial, at, right=True)), inside.numel() - 1)
    threshold = inside[dropped : dropped + 1]
    first = int(torch.searchsorted(inside, threshold, right=False))  # ties are kept too
    dropped_mass = float(partial[first - 1]) if first > 0 else base
    return Pruning(float(threshold), (total - dropped_mass) / total)


# ------------------------------------------------------------------------ encode / decode


def _feature_rows(
    indptr: torch.Tensor,
    indices: torch.Tensor,
    values: torch.Tensor,
    scale: torch.Tensor,
    shape: tuple[int, int],
) -> SparseRows:
    """The float32 edges into features from the stored CSR, as a reader rebuilds them (encode
    and decode both use this, so the logit-row correction is computed on exactly what is read
    back)."""
    ptr = indptr.to(torch.int64)
    out = SparseRows(ptr, indices.to(torch.int64), values.to(torch.float32), shape)
    for r0, r1 in out.row_blocks(0, shape[0]):  # values * their row's scale, in place
        p0, p1 = int(ptr[r0]), int(ptr[r1])
        out.values[p0:p1] *= scale[out.row_ids(r0, r1)]
    return out


def _assemble(
    manifest: GraphManifest,
    feature_rows: SparseRows,
    logit_rows: torch.Tensor,
    graph_parts: dict[str, torch.Tensor],
) -> AttributionGraph:
    f = manifest.n_features
    s = f + (manifest.n_layers + 1) * manifest.n_pos
    n = s + manifest.n_logits
    adjacency = torch.zeros(n, n, dtype=torch.float32)
    feature_rows.to_dense(out=adjacency[:f, :s])
    adjacency[s:, :s] = logit_rows
    return AttributionGraph(manifest=manifest, adjacency=adjacency, **graph_parts)


def _kept_rows(
    scores: EdgeScores, pruning: Pruning
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """The kept edges of the feature rows as CSR (indptr int32, column indices, float16
    values relative to each row's largest kept magnitude, and that per-row scale), built a
    block of rows at a time; and the number of non-zero edges."""
    a = scores.rows
    f = a.shape[0]
    counts, cols, rel = [], [], []
    scale = torch.zeros(f, dtype=torch.float32)
    nonzero = 0
    for r0, r1, block in scores.blocks():
        nonzero += int(torch.count_nonzero(a[r0:r1]))
        rr, cc = pruning.keeps(block).nonzero(as_tuple=True)
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
        nonzero,
    )


def encode(graph: AttributionGraph, keep: float = EDGE_MASS_KEPT) -> tuple[bytes, GraphManifest]:
    """safetensors bytes + the manifest that describes them (see module docstring)."""
    f = graph.n_features
    s = graph.token_slice.stop
    a = graph.adjacency
    influence = _influence(graph)
    total = influence.total
    scores = EdgeScores.of(influence, graph)
    pruning = prune(scores, keep)
    indptr, cols, rel, scale, n_nonzero = _kept_rows(scores, pruning)
    n_kept_edges = int(cols.numel())
    # feature rows exactly as a reader will rebuild them from the stored CSR
    kept = _feature_rows(indptr, cols, rel, scale, (f, s))
    act = graph.activations.to(torch.float64)
    inv_act = torch.where(act != 0, 1.0 / torch.where(act != 0, act, 1.0), 0.0)
    # Logit rows: direct edges + what the dropped (and rounded) feature edges carried, so
    # that total influence computed from the stored graph equals the full graph's.
    logit_rows = (total - scaled_rows_product(total[:, :f], kept, inv_act)).to(torch.float32)
    direct = a[graph.logit_slice, :s]
    # Verify by solving the stored graph's influence afresh (as the analysis will, from the
    # float16/float32 values written) instead of trusting the algebra.
    check: torch.Tensor | None = None
    if influence.backward_edges == 0 and layer_order(graph) is None:
        check, residual = solve_rows(kept, graph.activations, logit_rows.to(torch.float64),
                                     graph.features[:, 0])  # fmt: skip
        if residual > _influence_mod.SOLVE_TOLERANCE:
            check = None
    if check is None:  # the solve is not trusted (as for the full graph): the analysis' path
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
                "edges_mass_kept": pruning.kept_mass,
                "edges_keep_target": keep,
                "edges_feature_nonzero": n_nonzero,
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
