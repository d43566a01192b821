"""ct.fast.attribute (emc's attribution driver) gives stock circuit-tracer's graph: same active features, same selected
features, same logit targets, adjacency within 1e-5 (fp32).

Models (tests/fixtures/attribution_models.py, built once into the test cache): a tiny random Llama (3 layers, d 32)
with per-layer transcoders, the same Llama with a random cross-layer transcoder, and a
small Llama-shaped model (4 layers, d 128, 1024 features per layer, ~1.7k active features).
Rows per backward pass are deliberately different from ``batch_size`` (smaller, larger, not
a divisor) so the tests also cover the driver's split of ranking schedule and pass width.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from services.attribution.ct import fast as fast_attr
from tests.fixtures import attribution_models as models

TOL = 1e-5


@pytest.fixture(scope="module")
def tiny() -> Any:
    return models.load(models.TINY)


@pytest.fixture(scope="module")
def small() -> Any:
    return models.load(models.SMALL)


@pytest.fixture(scope="module")
def tiny_clt() -> Any:
    """The tiny Llama with a random cross-layer transcoder (decoders interleaved by output
    layer: exercises the plan's reordered-copy + index_add path)."""
    from circuit_tracer import ReplacementModel
    from circuit_tracer.transcoder.cross_layer_transcoder import CrossLayerTranscoder

    spec = models.TINY
    base = models.build(spec) / "base"
    gen = torch.Generator().manual_seed(7)
    clt = CrossLayerTranscoder(
        n_layers=spec.n_layers,
        d_transcoder=64,
        d_model=spec.d_model,
        lazy_decoder=False,
        lazy_encoder=False,
        feature_input_hook="mlp.hook_in",
        feature_output_hook="mlp.hook_out",
        scan="tiny-clt",
        device=torch.device("cpu"),
        dtype=torch.float32,
    )
    with torch.no_grad():
        clt.W_enc.normal_(0.0, spec.d_model**-0.5, generator=gen)
        clt.b_enc.fill_(-1.0)
        for w in clt.W_dec:
            w.normal_(0.0, 0.05, generator=gen)
    model = ReplacementModel.from_pretrained_and_transcoders(
        str(base), clt, backend="nnsight", device=torch.device("cpu"), dtype=torch.float32
    )
    model.tokenizer.model_input_names = ["input_ids", "attention_mask"]
    return model


def _pair(model: Any, ids: list[int], *, rows: int, **kw: Any) -> tuple[Any, Any]:
    stock = fast_attr.attribute(model, ids, fast=False, **kw)
    fast = fast_attr.attribute(model, ids, rows_per_pass=rows, **kw)
    return stock, fast


def stock_with_edit(model: Any, ids: list[int], edit: Any, **kw: Any) -> Any:
    """Stock ``attribute`` with ``edit(ctx)`` applied to the context ``setup_attribution``
    returns (a wrapper, as a user of stock circuit-tracer would add emc's adapter nodes)."""
    setup = model.setup_attribution

    def wrapped(inputs: Any) -> Any:
        ctx = setup(inputs)
        edit(ctx)
        return ctx

    model.setup_attribution = wrapped
    try:
        return fast_attr.attribute(model, ids, fast=False, **kw)
    finally:
        del model.setup_attribution


def assert_same_graph(stock: Any, fast: Any) -> float:
    """Everything equal, adjacency within TOL; returns the max |diff|."""
    assert torch.equal(stock.input_tokens, fast.input_tokens)
    assert torch.equal(stock.active_features, fast.active_features)
    assert torch.equal(stock.activation_values, fast.activation_values)
    assert torch.equal(stock.selected_features, fast.selected_features)
    assert stock.logit_targets == fast.logit_targets
    assert torch.equal(stock.logit_probabilities, fast.logit_probabilities)
    assert stock.adjacency_matrix.shape == fast.adjacency_matrix.shape
    assert stock.adjacency_matrix.dtype == fast.adjacency_matrix.dtype == torch.float32
    diff = float((stock.adjacency_matrix - fast.adjacency_matrix).abs().max())
    assert diff <= TOL, diff
    assert float(stock.adjacency_matrix.abs().max()) > 0.1  # not trivially zero
    return diff


# -- end to end ---------------------------------------------------------------------------------


def test_tiny_salient_targets_ranked(tiny: Any) -> None:
    """Salient logits; 60 of ~420 features over two ranking rounds (round = 8 * 4)."""
    ids = models.prompt(models.TINY, 10)
    kw: dict[str, Any] = {"max_feature_nodes": 60, "batch_size": 8, "max_n_logits": 5}
    stock, fast = _pair(tiny, ids, rows=5, desired_logit_prob=0.95, **kw)
    assert len(stock.logit_targets) > 1
    assert int(stock.selected_features.numel()) == 60
    assert_same_graph(stock, fast)


def test_tiny_explicit_targets_all_features(tiny: Any) -> None:
    """Explicit target token ids; every active feature gets a row (no ranking)."""
    ids = models.prompt(models.TINY, 10, seed=1)
    stock, fast = _pair(
        tiny, ids, rows=48, max_feature_nodes=None, batch_size=32, target_token_ids=[5, 9, 17]
    )
    assert [t.vocab_idx for t in stock.logit_targets] == [5, 9, 17]
    assert stock.selected_features.numel() == stock.active_features.shape[0]
    assert_same_graph(stock, fast)


def test_tiny_gather_driver_only(tiny: Any) -> None:
    """The driver with upstream's own contraction: isolates the driver's bookkeeping."""
    ids = models.prompt(models.TINY, 10, seed=2)
    kw: dict[str, Any] = {"max_feature_nodes": 40, "batch_size": 8}
    stock = fast_attr.attribute(tiny, ids, fast=False, **kw)
    fast = fast_attr.attribute(tiny, ids, rows_per_pass=3, contraction="gather", **kw)
    assert_same_graph(stock, fast)


def test_tiny_cross_layer_transcoder(tiny_clt: Any) -> None:
    ids = models.prompt(models.TINY, 10, seed=3)
    stock, fast = _pair(tiny_clt, ids, rows=6, max_feature_nodes=50, batch_size=8)
    assert_same_graph(stock, fast)


def test_llama_shaped_salient_targets(small: Any) -> None:
    """Llama-shaped (4 layers, d 128, 1024 features/layer), salient targets, 3 rounds."""
    ids = models.prompt(models.SMALL, 16)
    stock, fast = _pair(small, ids, rows=16, max_feature_nodes=300, batch_size=24)
    assert stock.active_features.shape[0] > 1000
    assert len(stock.logit_targets) == 10
    assert_same_graph(stock, fast)


def test_llama_shaped_explicit_targets(small: Any) -> None:
    ids = models.prompt(models.SMALL, 16, seed=1)
    targets = [7, 100, 1999, 4]
    stock, fast = _pair(
        small, ids, rows=40, max_feature_nodes=256, batch_size=32, target_token_ids=targets
    )
    assert [t.vocab_idx for t in fast.logit_targets] == targets
    assert_same_graph(stock, fast)


def _add_extra_nodes(ctx: Any) -> None:
    """Edit a context in place the way emc's adapter nodes do: one extra active "feature"
    (id ``d_transcoder``) per position >= 1 of layer 1, its write taken out of the error
    node, the sparse matrix re-coalesced with the vectors permuted to match."""
    gen = torch.Generator().manual_seed(11)
    acts = ctx.activation_matrix
    n_layers, n_pos, d_tc = acts.shape
    d = ctx.decoder_vecs.shape[1]
    new = torch.tensor([[1, p, d_tc] for p in range(1, n_pos)]).T
    writes = 0.1 * torch.randn(n_pos - 1, d, generator=gen)
    ctx.error_vectors[1, 1:] -= writes
    idx = torch.cat([acts.indices(), new], dim=1)
    key = (idx[0] * n_pos + idx[1]) * (d_tc + 1) + idx[2]
    order = torch.argsort(key)
    vals = torch.cat([acts.values(), torch.ones(n_pos - 1)])
    ctx.activation_matrix = torch.sparse_coo_tensor(
        idx[:, order], vals[order], (n_layers, n_pos, d_tc + 1), check_invariants=True
    ).coalesce()
    ctx.encoder_vecs = torch.cat([ctx.encoder_vecs, torch.randn(n_pos - 1, d, generator=gen)])[
        order
    ]
    ctx.decoder_vecs = torch.cat([ctx.decoder_vecs, writes])[order]
    n = int(ctx.activation_matrix._nnz())
    ctx.encoder_to_decoder_map = torch.arange(n)
    ctx.decoder_locations = ctx.activation_matrix.indices()[:2]
    ctx._row_size = n + (n_layers + 1) * n_pos


def test_prepare_hook_matches_wrapped_setup(tiny: Any) -> None:
    """``prepare`` edits the context like a ``setup_attribution`` wrapper does for stock."""
    ids = models.prompt(models.TINY, 10, seed=4)
    kw: dict[str, Any] = {"max_feature_nodes": 80, "batch_size": 8}
    stock = stock_with_edit(tiny, ids, _add_extra_nodes, **kw)
    fast = fast_attr.attribute(tiny, ids, rows_per_pass=6, prepare=_add_extra_nodes, **kw)
    d_tc = models.TINY.d_transcoder
    assert int((stock.active_features[:, 2] == d_tc).sum()) == 9
    assert bool((stock.active_features[stock.selected_features, 2] == d_tc).any())
    assert_same_graph(stock, fast)


# -- the contraction itself ----------------------------------------------------------------------


def _synthetic_ctx(seed: int, shuffle: bool) -> Any:
    """An upstream AttributionContext over random tensors; ``shuffle`` gives a CLT-like
    layout (decoders not grouped by layer, rows permuted, several decoders per row)."""
    from circuit_tracer.attribution.context_nnsight import AttributionContext

    gen = torch.Generator().manual_seed(seed)
    n_layers, n_pos, d_tc, d = 4, 7, 50, 16
    dense = torch.rand(n_layers, n_pos, d_tc, generator=gen)
    dense = dense * (dense > 0.8)
    acts = dense.to_sparse().coalesce()
    n = int(acts._nnz())
    layers, positions, _ = acts.indices()
    rows = torch.arange(n)
    if shuffle:  # as a CLT: each feature writes to its own and every later layer; scrambled
        k = n_layers - layers
        rows = torch.repeat_interleave(rows, k)
        positions = torch.repeat_interleave(positions, k)
        layers = torch.cat([torch.arange(int(s), n_layers) for s in layers])
        perm = torch.randperm(rows.numel(), generator=gen)
        layers, positions, rows = layers[perm], positions[perm], rows[perm]
    decoders = torch.randn(rows.numel(), d, generator=gen)
    return AttributionContext(
        activation_matrix=acts,
        error_vectors=torch.randn(n_layers, n_pos, d, generator=gen),
        token_vectors=torch.randn(n_pos, d, generator=gen),
        decoder_vecs=decoders,
        encoder_vecs=torch.randn(n, d, generator=gen),
        encoder_to_decoder_map=rows,
        decoder_locations=torch.stack([layers, positions]),
        logits=torch.zeros(1, n_pos, 3),
    )


@pytest.mark.parametrize("shuffle", [False, True])
def test_contraction_matches_upstream_method(shuffle: bool) -> None:
    stock_ctx, fast_ctx = _synthetic_ctx(0, shuffle), _synthetic_ctx(0, shuffle)
    fast = fast_attr.FastContraction.install(fast_ctx)
    assert (fast.plans[0] is not None) and ((fast.plans[0].row_start is None) == shuffle)
    batch, n_pos, d = 5, 7, 16
    grads = torch.randn(batch, n_pos, d, generator=torch.Generator().manual_seed(1))
    for ctx in (stock_ctx, fast_ctx):
        ctx._batch_buffer = torch.full((ctx._row_size, batch), 0.5)  # accumulate onto it
        for layer in range(4):
            ctx.compute_feature_attributions(layer, grads)
    assert fast.calls == 4
    assert float((stock_ctx._batch_buffer - fast_ctx._batch_buffer).abs().max()) <= 1e-5
    assert not torch.equal(stock_ctx._batch_buffer, torch.full_like(stock_ctx._batch_buffer, 0.5))


# -- safety --------------------------------------------------------------------------------------


def test_nothing_global_is_patched(tiny: Any) -> None:
    from circuit_tracer.attribution.context_nnsight import AttributionContext

    before = AttributionContext.compute_feature_attributions
    fast_attr.attribute(tiny, models.prompt(models.TINY, 8), max_feature_nodes=10, batch_size=8)
    assert AttributionContext.compute_feature_attributions is before
    ctx = tiny.setup_attribution(torch.tensor(models.prompt(models.TINY, 8)))
    assert "compute_feature_attributions" not in vars(ctx)


def test_refuses_other_circuit_tracer(monkeypatch: pytest.MonkeyPatch) -> None:
    import circuit_tracer

    monkeypatch.setattr(fast_attr, "_checked", False)
    monkeypatch.setattr(circuit_tracer, "__version__", "0.6.0")
    with pytest.raises(fast_attr.UpstreamChanged, match=r"0\.5\.0"):
        fast_attr.check_upstream()


def test_refuses_changed_internals(monkeypatch: pytest.MonkeyPatch) -> None:
    from circuit_tracer.attribution.context_nnsight import AttributionContext

    def renamed(self: Any, layer_idx: int, gradients: torch.Tensor) -> None:
        raise AssertionError

    monkeypatch.setattr(fast_attr, "_checked", False)
    monkeypatch.setattr(AttributionContext, "compute_feature_attributions", renamed)
    with pytest.raises(fast_attr.UpstreamChanged, match="compute_feature_attributions"):
        fast_attr.check_upstream()


def test_refuses_installed_twice() -> None:
    ctx = _synthetic_ctx(2, False)
    fast_attr.FastContraction.install(ctx)
    with pytest.raises(RuntimeError, match="already"):
        fast_attr.FastContraction.install(ctx)


def test_default_batch_size() -> None:
    assert fast_attr.default_batch_size("cpu") == fast_attr.CPU_ROWS
    assert fast_attr.default_batch_size(torch.device("cpu"), n_layers=16, n_pos=24) == 64
    assert fast_attr.default_batch_size("cpu", n_nodes=10) == 16
    assert fast_attr.default_batch_size("cpu", n_nodes=5000) == fast_attr.CPU_ROWS
    gpu = fast_attr.default_batch_size("cuda")
    assert gpu == fast_attr.GPU_ROWS > fast_attr.CPU_ROWS
