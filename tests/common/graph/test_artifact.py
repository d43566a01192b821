"""Graph artifact: safetensors + manifest round trip, torn pairs refused, analysis unchanged."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch

from common.graph.artifact import (
    GraphFormatError,
    decode,
    encode,
    load_graph,
    prune,
    save_graph,
)
from common.graph.model import AttributionGraph
from common.records import GraphManifest
from common.store import FsStore, NotFound, keys
from services.attribution.runtime import Runtime
from tests.fixtures.tiny import PROMPTS


@pytest.fixture(scope="module")
def tiny_graph(tiny_rt: Runtime) -> AttributionGraph:
    return tiny_rt.attribute(PROMPTS[0], "adapted")


def test_from_circuit_tracer_layout(tiny_graph: AttributionGraph, tiny_rt: Runtime) -> None:
    g, m = tiny_graph, tiny_graph.manifest
    assert m.fingerprint == tiny_rt.fingerprint and m.variant == "adapted"
    assert m.input_ids == tiny_rt.tokenize(PROMPTS[0], "adapted") and m.input_ids[0] == 0
    assert m.n_features == g.features.shape[0] == g.activations.shape[0] <= 200
    assert g.n_nodes == m.n_features + (m.n_layers + 1) * m.n_pos + m.n_logits
    assert (g.features[1:, 0] >= g.features[:-1, 0]).all()  # layer-major order
    a = g.adjacency
    assert not a[g.n_features : g.token_slice.stop].any()  # errors/tokens are sources only
    assert not a[:, g.logit_slice].any()  # logits are sinks
    assert m.limits["max_feature_nodes"] == 200 and m.limits["batch_size"] == 64


def test_encode_decode(tiny_graph: AttributionGraph) -> None:
    from common.graph.influence import logit_influence

    g = tiny_graph
    data, m = encode(g)
    out = decode(data, m)
    assert out.manifest == m and m.adjacency_dtype == "float16"
    assert torch.equal(out.features, g.features) and torch.equal(out.activations, g.activations)
    f, s = g.n_features, g.token_slice.stop
    kept = out.adjacency[:f] != 0
    n_kept, n_nonzero = m.limits["edges_feature_kept"], m.limits["edges_feature_nonzero"]
    assert isinstance(n_kept, int) and isinstance(n_nonzero, int)
    assert int(kept.sum()) == n_kept < n_nonzero  # pruned
    # kept edges are the original ones up to float16 rounding
    rel = (out.adjacency[:f][kept] - g.adjacency[:f][kept]).abs() / g.adjacency[:f][kept].abs()
    assert float(rel.max()) < 1e-3
    assert not out.adjacency[f : g.token_slice.stop].any()
    assert not out.adjacency[:, g.logit_slice].any()
    # logit rows = direct edges + what the dropped/rounded feature edges carried to the logits
    full = logit_influence(g).total
    inv_a = 1.0 / g.activations.double()
    lost = (g.adjacency[:f, :s].double() - out.adjacency[:f, :s].double()) * inv_a[:, None]
    expected = g.adjacency[g.logit_slice, :s].double() + full[:, :f] @ lost
    got = out.adjacency[g.logit_slice, :s].double()
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))
    # so every logit influence is unchanged
    after = logit_influence(out).total
    assert float((after - full).abs().max() / full.abs().max()) < 1e-6
    assert (m.limits["influence_error"] or 0.0) < 1e-6
    # plain safetensors: an 8-byte header length, a JSON header with our metadata; no pickle
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    assert json.loads(header["__metadata__"]["emc"])["format"] == "emc-graph"
    assert set(m.tensors) == {k for k in header if k != "__metadata__"}


def test_encode_when_the_solve_is_not_trusted(
    tiny_graph: AttributionGraph, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every solve untrusted: influence comes from the series, and so does the check."""
    import common.graph.influence as mod

    monkeypatch.setattr(mod, "SOLVE_TOLERANCE", -1.0)
    _, m = encode(tiny_graph)
    assert (m.limits["influence_error"] or 0.0) < 1e-6


def test_prune_keeps_mass() -> None:
    s = torch.tensor([[5.0, 0.0, 1.0], [3.0, 0.5, 0.5]])
    half = prune(s, 0.5)
    assert half.keeps(s).tolist() == [[True, False, False], [False, False, False]]
    assert half.kept_mass == pytest.approx(0.5)
    p = prune(s, 0.9)
    assert float(s[p.keeps(s)].sum()) >= 0.9 * float(s.sum())
    assert p.kept_mass == pytest.approx(float(s[p.keeps(s)].sum() / s.sum()))
    # 0.95 needs one of the two 0.5s: both are kept (ties), and the mass says so
    tie = prune(s, 0.95)
    assert tie.keeps(s).tolist() == [[True, False, True], [True, True, True]]
    assert tie.kept_mass == pytest.approx(1.0)
    assert not prune(s, 1.0).keeps(s)[0, 1]  # zeros are never stored
    assert not prune(torch.zeros(2, 2), 0.9).keeps(torch.zeros(2, 2)).any()


@pytest.mark.parametrize("keep", [0.5, 0.9, 0.999, 1.0])
def test_prune_matches_a_full_sort(keep: float, monkeypatch: pytest.MonkeyPatch) -> None:
    """The bucketed threshold is the one a sort of every score gives, over several chunks and
    many octaves (heavy tails, ties, zeros)."""
    import common.graph.artifact as mod

    monkeypatch.setattr(mod, "_CHUNK", 4096)
    gen = torch.Generator().manual_seed(0)
    s = torch.exp(6.0 * torch.randn(300, 1000, generator=gen))
    s[torch.rand(s.shape, generator=gen) < 0.4] = 0.0
    s[:3] = 7.0  # ties
    ordered = torch.sort(s[s > 0].to(torch.float64)).values
    tail = torch.cumsum(ordered, 0)
    total = float(tail[-1])
    dropped = int((tail <= total - keep * total).sum())  # the smallest values that fit
    threshold = float(ordered[min(dropped, ordered.numel() - 1)])
    p = prune(s, keep)
    assert p.threshold == threshold
    assert p.kept_mass == pytest.approx(float(s[s >= threshold].double().sum()) / total, rel=1e-9)
    assert s.numel() > mod._CHUNK  # the scores were bucketed in several chunks


def test_store_round_trip_and_torn_pair(
    tiny_graph: AttributionGraph, tiny_rt: Runtime, tmp_path: Path
) -> None:
    store = FsStore(tmp_path / "store")
    m = tiny_graph.manifest
    with pytest.raises(NotFound):
        load_graph(store, "tiny", m.prompt_id, m.fingerprint, m.variant)
    saved = save_graph(store, tiny_rt.exp, tiny_graph)
    tkey = keys.graph_tensors("tiny", m.prompt_id, m.fingerprint, m.variant)
    mkey = keys.graph_manifest("tiny", m.prompt_id, m.fingerprint, m.variant)
    assert store.exists(tkey) and store.get_record(mkey, GraphManifest) == saved
    loaded = load_graph(store, "tiny", m.prompt_id, m.fingerprint, m.variant)
    assert loaded.manifest == saved
    assert torch.equal(loaded.adjacency, decode(*encode(tiny_graph)).adjacency)
    # recomputing and saving again gives identical tensor bytes (idempotent re-runs)
    before = store.get_bytes(tkey)
    save_graph(store, tiny_rt.exp, tiny_rt.attribute(PROMPTS[0], "adapted"))
    assert store.get_bytes(tkey) == before
    # tensors of another graph under this manifest: refused, not mixed
    other = tiny_rt.attribute(PROMPTS[1], "adapted")
    store.put_bytes(tkey, encode(other)[0])
    with pytest.raises(GraphFormatError, match="belong to another manifest"):
        load_graph(store, "tiny", m.prompt_id, m.fingerprint, m.variant)
