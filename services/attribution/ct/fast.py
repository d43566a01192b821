"""Faster attribution graphs on circuit-tracer 0.5.0 (nnsight backend), same numbers.

Where the time goes upstream
----------------------------
Every backward pass of circuit-tracer's ``AttributionContext.compute_batch`` calls
``compute_feature_attributions(layer, grads)`` once per layer. That method selects the
active features that write to ``layer`` and contracts the gradient at each feature's
position with the feature's (activation-scaled) decoder row::

    einsum(grads[:, nnz_positions[mask]], decoder_vecs[mask], "b n d, n d -> n b")

``grads[:, nnz_positions[mask]]`` materialises a ``[batch, n_active_in_layer, d_model]``
copy (gigabytes at 256 rows x thousands of features x d 512) and the einsum then walks it
once more; ``decoder_vecs[mask]`` is copied on every call as well. Memory traffic, not
arithmetic, sets the speed.

What this module changes
------------------------
Active features are sorted by (layer, position). Grouped by position, the same numbers are
one small GEMM per (layer, position)::

    buffer[rows of (layer, p)] += decoder_vecs[(layer, p)] @ grads[:, p, :].T
    #        [n_lp, batch]          [n_lp, d_model]         [d_model, batch]

which reads each gradient row and each decoder row once and writes straight into
circuit-tracer's own row buffer (no gather, no temporary). The grouping ("plan") is built
once per prompt, not once per backward pass. :class:`FastContraction` replaces exactly that
one method, on one context object; everything else (forward pass, gradient injection,
error/token rows, the backward passes themselves) is upstream's code.

:func:`attribute` is our own driver around those upstream pieces. Besides using the fast
context it separates two things upstream ties to ``batch_size``:

* the **ranking schedule** (``batch_size * update_interval`` features are attributed between
  two influence re-rankings): this decides *which* features enter the graph, so it keeps the
  caller's ``batch_size`` and the graph equals stock circuit-tracer's graph for that value;
* the **rows per backward pass** (``rows_per_pass``): an execution detail that is chosen per
  device (:func:`default_batch_size`). Upstream runs its one forward pass over
  ``batch_size`` copies of the prompt and every backward pass, including the logit phase's
  single pass for ~10 logits, over all of those rows; on a CPU that is mostly waste.

Safety: :func:`check_upstream` refuses to run unless circuit-tracer is the pinned 0.5.0 and
the internals used here exist with the expected signatures; the driver also checks after
the first backward pass that the fast contraction actually ran. Nothing global is patched:
the replacement is an instance attribute of the one context object our driver creates, so
stock ``circuit_tracer.attribute`` in the same process is untouched.
"""

from __future__ import annotations

import inspect
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch

if TYPE_CHECKING:
    from circuit_tracer.graph import Graph

#: The circuit-tracer release whose internals this module was written against.
PINNED_VERSION = "0.5.0"

Contraction = Literal["matmul", "gather"]


class UpstreamChanged(RuntimeError):
    """circuit-tracer is not the release (or lacks the internals) this module relies on."""


# -- upstream contract --------------------------------------------------------------------------

#: (object path, callable, parameter names it must take) that this module relies on.
_REQUIRED: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    (
        "circuit_tracer.attribution.context_nnsight",
        "AttributionContext.compute_feature_attributions",
        ("self", "layer", "grads"),
    ),
    (
        "circuit_tracer.attribution.context_nnsight",
        "AttributionContext.compute_batch",
        ("self", "layers", "positions", "inject_values", "retain_graph"),
    ),
    (
        "circuit_tracer.replacement_model.replacement_model_nnsight",
        "NNSightReplacementModel.setup_attribution",
        ("self", "inputs"),
    ),
    (
        "circuit_tracer.replacement_model.replacement_model_nnsight",
        "NNSightReplacementModel.run_forward_pass",
        ("self", "input_ids", "batch_size", "ctx"),
    ),
    (
        "circuit_tracer.replacement_model.replacement_model_nnsight",
        "NNSightReplacementModel.ensure_tokenized",
        ("self", "prompt"),
    ),
    (
        "circuit_tracer.graph",
        "compute_partial_influences",
        ("edge_matrix", "logit_p", "row_to_node_index"),
    ),
    (
        "circuit_tracer.attribution.targets",
        "AttributionTargets.__init__",
        ("self", "attribution_targets", "logits", "unembed_proj", "tokenizer"),
    ),
)

#: Instance attributes of an upstream AttributionContext that the fast path reads or writes.
_CTX_ATTRS = (
    "activation_matrix",
    "decoder_vecs",
    "decoder_locations",
    "encoder_to_decoder_map",
    "encoder_vecs",
    "logits",
    "_batch_buffer",
    "_row_size",
    "_resid_activations",
)

_checked = False


def check_upstream() -> None:
    """Raise :class:`UpstreamChanged` unless circuit-tracer is the pinned release and every
    internal this module uses is present with the expected parameters (checked once)."""
    global _checked
    if _checked:
        return
    import importlib

    import circuit_tracer

    version = getattr(circuit_tracer, "__version__", None)
    if version != PINNED_VERSION:
        raise UpstreamChanged(
            f"fast_attr was written against circuit-tracer {PINNED_VERSION}, found {version}: "
            "re-check AttributionContext.compute_feature_attributions and the attribution "
            "loop (circuit_tracer/attribution/attribute.py) before re-pinning"
        )
    for module_name, qualname, params in _REQUIRED:
        obj: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                raise UpstreamChanged(f"{module_name}.{qualname} is gone")
        found = tuple(inspect.signature(obj).parameters)
        if found[: len(params)] != params:
            raise UpstreamChanged(
                f"{module_name}.{qualname} takes {found}, expected it to start with {params}"
            )
    from circuit_tracer.attribution.context_nnsight import AttributionContext

    source = inspect.getsource(AttributionContext.compute_batch)
    if "self.compute_feature_attributions(" not in source:
        raise UpstreamChanged(
            "AttributionContext.compute_batch no longer calls compute_feature_attributions"
        )
    _checked = True


# -- the hot step -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _LayerPlan:
    """Active features whose decoders write to one layer, grouped by position.

    ``decoders[start:end]`` are the (activation-scaled) decoder rows of the features at
    position ``pos`` for each ``(pos, start, end)`` in ``segments``. Their buffer rows are
    ``row_start + start ... row_start + end - 1`` when ``row_start`` is set (per-layer
    transcoders: one contiguous block), else ``rows[start:end]``.
    """

    decoders: torch.Tensor  # [n, d_model]
    segments: tuple[tuple[int, int, int], ...]
    row_start: int | None
    rows: torch.Tensor  # [n] buffer row of each decoder row


def _as_range(index: torch.Tensor) -> int | None:
    """``index[0]`` if ``index`` is ``index[0], index[0] + 1, ...``; else None."""
    if index.numel() == 0:
        return None
    first = int(index[0])
    expected = torch.arange(first, first + index.numel(), device=index.device)
    return first if bool(torch.equal(index, expected.to(index.dtype))) else None


def plan_layers(
    decoder_locations: torch.Tensor,
    decoder_vecs: torch.Tensor,
    encoder_to_decoder_map: torch.Tensor,
    n_layers: int,
) -> list[_LayerPlan | None]:
    """Group the decoder rows by (layer, position), once per prompt.

    ``decoder_locations`` is ``[2, n_decoders]`` (layer written to, position);
    ``encoder_to_decoder_map[i]`` is the buffer row decoder ``i`` contributes to. Per-layer
    transcoders already store each layer's decoders as one position-sorted block, so their
    plan is a view; other layouts (cross-layer transcoders) get one reordered copy.
    """
    layers, positions = decoder_locations
    plans: list[_LayerPlan | None] = []
    for layer in range(n_layers):
        index = torch.nonzero(layers == layer).flatten()
        if index.numel() == 0:
            plans.append(None)
            continue
        pos = positions[index]
        order = torch.argsort(pos, stable=True)
        index, pos = index[order], pos[order]
        first = _as_range(index)
        decoders = (
            decoder_vecs[first : first + index.numel()]
            if first is not None
            else decoder_vecs[index].contiguous()
        )
        rows = encoder_to_decoder_map[index]
        if torch.unique(rows).numel() != rows.numel():
            # upstream's ``buffer[rows] += ...`` would keep one of the duplicates, index_add
            # all of them; no transcoder layout produces this, so refuse rather than differ
            raise UpstreamChanged(f"layer {layer}: several decoders write to the same row")
        uniq, counts = torch.unique_consecutive(pos, return_counts=True)
        ends = torch.cumsum(counts, 0).tolist()
        starts = [0, *ends[:-1]]
        segments = tuple(
            (int(p), s, e) for p, s, e in zip(uniq.tolist(), starts, ends, strict=True)
        )
        plans.append(_LayerPlan(decoders, segments, _as_range(rows), rows))
    return plans


def contract(plan: _LayerPlan, grads: torch.Tensor, buffer: torch.Tensor) -> None:
    """``buffer[row of f] += grads[:, pos(f)] . decoder(f)`` for every feature f of a layer.

    ``grads`` is ``[batch, n_pos, d_model]``, ``buffer`` is ``[row_size, batch]``. Same
    arithmetic as upstream's gather + einsum (grads cast to the decoder dtype, products in
    that dtype, accumulated into the buffer), one GEMM per position.
    """
    g = grads.to(plan.decoders.dtype)
    same_dtype = buffer.dtype == plan.decoders.dtype
    if plan.row_start is not None:
        for pos, start, end in plan.segments:
            out = buffer[plan.row_start + start : plan.row_start + end]
            if same_dtype:
                out.addmm_(plan.decoders[start:end], g[:, pos, :].T)
            else:
                out += plan.decoders[start:end] @ g[:, pos, :].T
        return
    scores = torch.empty(
        plan.decoders.shape[0], g.shape[0], dtype=plan.decoders.dtype, device=g.device
    )
    for pos, start, end in plan.segments:
        torch.mm(plan.decoders[start:end], g[:, pos, :].T, out=scores[start:end])
    buffer.index_add_(0, plan.rows, scores.to(buffer.dtype))


class FastContraction:
    """Gather-free replacement for one context's ``compute_feature_attributions``.

    :meth:`install` sets it as an *instance* attribute of one upstream
    ``AttributionContext`` (the one our driver created), shadowing the class method for that
    object only; nothing global changes. It holds the context weakly, so the forward graph
    the context caches is freed as soon as the driver drops the context.
    """

    def __init__(self, ctx: Any) -> None:
        missing = [a for a in _CTX_ATTRS if not hasattr(ctx, a)]
        if missing:
            raise UpstreamChanged(f"AttributionContext lacks {missing}")
        n_layers = int(ctx.activation_matrix.shape[0])
        self.plans = plan_layers(
            ctx.decoder_locations,
            ctx.decoder_vecs,
            ctx.encoder_to_decoder_map,
            n_layers,
        )
        self._ctx = weakref.ref(ctx)
        #: how many (layer, backward pass) contractions ran: proves the swap took effect
        self.calls = 0

    @classmethod
    def install(cls, ctx: Any) -> FastContraction:
        """Swap the fast contraction into ``ctx`` (before its forward pass)."""
        check_upstream()
        from circuit_tracer.attribution.context_nnsight import AttributionContext

        if type(ctx) is not AttributionContext:
            raise UpstreamChanged(f"expected an AttributionContext, got {type(ctx)!r}")
        if "compute_feature_attributions" in vars(ctx):
            raise RuntimeError("this context's feature contraction is already replaced")
        if ctx._resid_activations:
            raise ValueError("install before run_forward_pass caches activations")
        fast = cls(ctx)
        vars(ctx)["compute_feature_attributions"] = fast  # this object only
        return fast

    def __call__(self, layer: int, grads: torch.Tensor) -> None:
        """Same effect on ``ctx._batch_buffer`` as upstream's method, without the gather."""
        ctx = self._ctx()
        if ctx is None:
            raise RuntimeError("the attribution context is gone")
        self.calls += 1
        plan = self.plans[layer]
        if plan is not None:
            contract(plan, grads, ctx._batch_buffer)


# -- rows per backward pass ----------------------------------------------------------------------

#: Rows per backward pass on a CPU. Measured (bench_attr.py sweep, UPSTREAM.md): on 2 cores,
#: 16 layers x 8192 features, 24 tokens, 4096 feature nodes, attribute() took 39.6 / 24.6 /
#: 24.1 / 32.6 / 47.7 s at 16 / 32 / 64 / 128 / 256 rows (1024 nodes: 11.3 / - / 8.7 /
#: 12.7 / 16.1 s): flat at 32-64, worse at 16 (per-pass overhead) and at 256 (the forward
#: pass over 256 copies alone costs 10-15 s, and peak RSS grows by ~10 MB per row).
CPU_ROWS = 64
#: Rows per backward pass on an accelerator, before the memory cap: a pass costs about the
#: same for 64 or 512 rows until the device is busy, and the one-off costs that grow with
#: the rows (forward over ``rows`` copies, the logit pass) are small there.
GPU_ROWS = 512
#: Floats kept per row, per (layer, position, d_model), by the forward graph of a
#: Llama-style block under circuit-tracer's freezes (eager attention), measured on CPU as the
#: growth of peak RSS with the rows (bench_attr.py sweep: ~10-13 MB per row at 16 layers,
#: 24 positions, d 512, vocab 32k), with the logits counted separately. Not measured on a
#: GPU; a conservative estimate there (bf16 halves it via ``element_size``).
FLOATS_PER_ROW_LAYER_POS_D = 16


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def default_batch_size(
    device: torch.device | str,
    *,
    n_nodes: int | None = None,
    n_layers: int | None = None,
    n_pos: int | None = None,
    d_model: int | None = None,
    vocab_size: int | None = None,
    row_size: int | None = None,
    element_size: int = 4,
    memory_fraction: float = 0.5,
) -> int:
    """Rows per backward pass for ``device`` (the execution width, not the ranking schedule;
    see the module doc).

    With the gather gone the work per attributed node no longer depends on the width, so
    the width only trades the fixed cost of a pass (nnsight's backward tracing: thread
    hand-offs per hooked tensor, a Python loop over layers and positions) against the costs
    that grow with it: the one forward pass over ``rows`` copies of the prompt, the logit
    pass (``rows`` rows for ~10 logits), the partly empty last pass of the run, and the
    memory of the forward graph.

    * CPU: ``CPU_ROWS``. The fixed cost of a pass is ~0.1-0.2 s; the forward pass costs
      ~30-60 ms per row at the issue's size, growing faster than linearly past ~128 rows.
    * CUDA: ``GPU_ROWS``, halved until the forward graph
      (``FLOATS_PER_ROW_LAYER_POS_D * n_layers * n_pos * d_model`` plus the logits
      ``n_pos * vocab_size`` per row) and the row buffer (``row_size`` per row) fit in
      ``memory_fraction`` of the free device memory, when the shapes are given.

    Either way never more than the power of two covering ``n_nodes`` (the rows the run
    needs at most in one pass: the larger of the feature count and the logit count), so a
    small graph does not pay for a wide forward pass.
    """
    dev = torch.device(device)
    rows = GPU_ROWS if dev.type == "cuda" else CPU_ROWS
    if dev.type == "cuda" and torch.cuda.is_available():
        shapes = (n_layers, n_pos, d_model, vocab_size, row_size)
        if all(s is not None for s in shapes):
            assert n_layers and n_pos and d_model and vocab_size and row_size  # for mypy
            free, _ = torch.cuda.mem_get_info(dev)
            floats = (
                FLOATS_PER_ROW_LAYER_POS_D * n_layers * n_pos * d_model
                + n_pos * vocab_size
                + row_size
            )
            fit = int(memory_fraction * free) // (floats * element_size)
            while rows > 16 and rows > fit:
                rows //= 2
    if n_nodes is not None and n_nodes > 0:
        rows = min(rows, _pow2_at_least(n_nodes))
    return rows


# -- the driver ----------------------------------------------------------------------------------


def attribute(
    model: Any,
    input_ids: Sequence[int] | torch.Tensor,
    *,
    max_feature_nodes: int | None,
    batch_size: int,
    max_n_logits: int = 10,
    desired_logit_prob: float = 0.95,
    target_token_ids: Sequence[int] | torch.Tensor | None = None,
    custom_targets: Sequence[tuple[str, float, torch.Tensor]] | None = None,
    rows_per_pass: int | None = None,
    update_interval: int = 4,
    fast: bool = True,
    contraction: Contraction = "matmul",
    timings: dict[str, float] | None = None,
    prepare: Callable[[Any], torch.Tensor | None] | None = None,
) -> Graph:
    """An attribution graph equal to ``circuit_tracer.attribute(...)`` with the same
    ``batch_size``, ``max_feature_nodes`` and targets, computed faster.

    Args:
        model: circuit-tracer's nnsight ``ReplacementModel``.
        input_ids: the prompt's token ids (used as given: a BOS-like first token is
            prepended only if missing, by circuit-tracer's own rule).
        max_feature_nodes: how many features get a row (None or 0: all active features).
        batch_size: upstream's ``batch_size`` as far as it decides the graph: features are
            re-ranked by influence after every ``batch_size * update_interval`` of them.
        max_n_logits / desired_logit_prob: salient-target selection (no target_token_ids).
        target_token_ids: attribute exactly these next tokens (upstream's tensor targets).
        custom_targets: attribute these directions in d_model instead, as
            ``(label, weight, vector)`` (upstream's ``CustomTarget``; e.g. P_evil - P_safe).
        rows_per_pass: rows of each backward pass (and copies in the forward pass); None:
            :func:`default_batch_size` for the model's device.
        update_interval: upstream's ``update_interval``.
        fast: False runs stock ``circuit_tracer.attribute`` (with ``batch_size``) instead.
        contraction: "matmul" (the fast contraction) or "gather" (upstream's, to measure
            the driver's own effect).
        prepare: called with upstream's ``AttributionContext`` right after
            ``setup_attribution``, before anything reads it; it may edit the context in place
            (e.g. emc's adapter nodes: extra active "features", adjusted error vectors), as a
            wrapper around ``model.setup_attribution`` would for stock ``attribute``. The
            fast contraction is planned from the edited context. It may return indices of
            active features that must be in the graph (attributed first, before any
            influence ranking; they count against ``max_feature_nodes``, which grows to hold
            them all). Ignored with
            ``fast=False`` (wrap ``setup_attribution`` there).
        timings: if given, filled with seconds per phase (setup, forward, logits, features,
            ranking, package) and counts (rows, passes, n_active).

    Returns:
        circuit-tracer's ``Graph``.
    """
    check_upstream()
    targets_spec: Any = None
    if custom_targets is not None:
        from circuit_tracer.attribution.targets import CustomTarget

        if target_token_ids is not None:
            raise ValueError("give target_token_ids or custom_targets, not both")
        targets_spec = [CustomTarget(label, float(w), vec) for label, w, vec in custom_targets]
    elif target_token_ids is not None:
        targets_spec = torch.as_tensor(
            target_token_ids
            if isinstance(target_token_ids, torch.Tensor)
            else list(target_token_ids),
            dtype=torch.long,
        )
    prompt = (
        input_ids.to(torch.long)
        if isinstance(input_ids, torch.Tensor)
        else torch.tensor(list(input_ids), dtype=torch.long)
    )
    if not fast:
        from circuit_tracer import attribute as stock_attribute

        return stock_attribute(
            prompt,
            model,
            attribution_targets=targets_spec,
            max_n_logits=max_n_logits,
            desired_logit_prob=desired_logit_prob,
            batch_size=batch_size,
            max_feature_nodes=max_feature_nodes,
            update_interval=update_interval,
            verbose=False,
        )
    return _Run(
        model,
        prompt,
        targets_spec,
        max_feature_nodes=max_feature_nodes,
        batch_size=batch_size,
        max_n_logits=max_n_logits,
        desired_logit_prob=desired_logit_prob,
        rows_per_pass=rows_per_pass,
        update_interval=update_interval,
        contraction=contraction,
        timings=timings,
        prepare=prepare,
    ).graph()


class _Run:
    """One attribution: precompute, forward, logit rows, ranked feature rows, packaging.

    Node columns follow circuit-tracer's layout: active features, error nodes
    (layer-major), token nodes, logit nodes. Rows are stored in attribution order (logits
    first) with ``node_of_row`` recording which node each row belongs to.
    """

    def __init__(
        self,
        model: Any,
        prompt: torch.Tensor,
        targets_spec: Any,
        *,
        max_feature_nodes: int | None,
        batch_size: int,
        max_n_logits: int,
        desired_logit_prob: float,
        rows_per_pass: int | None,
        update_interval: int,
        contraction: Contraction,
        timings: dict[str, float] | None = None,
        prepare: Callable[[Any], torch.Tensor | None] | None = None,
    ) -> None:
        if batch_size < 1 or update_interval < 1:
            raise ValueError("batch_size and update_interval must be positive")
        self.model = model
        self.tokens: torch.Tensor = model.ensure_tokenized(prompt)
        self.targets_spec = targets_spec
        #: logit nodes the run will have at most (known before the forward pass)
        self.n_targets_hint = max_n_logits if targets_spec is None else len(targets_spec)
        self.max_n_logits = max_n_logits
        self.desired_logit_prob = desired_logit_prob
        self.round_size = batch_size * update_interval
        self.requested = max_feature_nodes
        self.rows_per_pass = rows_per_pass
        self.contraction = contraction
        self.prepare = prepare
        self.timings = timings if timings is not None else {}
        self._clock = time.perf_counter()

    def _lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.timings[phase] = self.timings.get(phase, 0.0) + now - self._clock
        self._clock = now

    def graph(self) -> Graph:
        from circuit_tracer.attribution.targets import AttributionTargets
        from circuit_tracer.graph import Graph

        model = self.model
        ctx = model.setup_attribution(self.tokens)
        forced = self.prepare(ctx) if self.prepare is not None else None
        fast = FastContraction.install(ctx) if self.contraction == "matmul" else None
        self._lap("setup")
        acts = ctx.activation_matrix
        n_layers, n_pos, _ = acts.shape
        n_feat = int(acts._nnz())
        self.logit_offset = n_feat + (n_layers + 1) * n_pos
        n_select = min(self.requested or n_feat, n_feat)
        if forced is not None and forced.numel():
            n_select = min(max(n_select, int(forced.numel())), n_feat)
        rows = self.rows_per_pass or default_batch_size(
            self.tokens.device,
            n_nodes=max(n_select, self.n_targets_hint),
            n_layers=n_layers,
            n_pos=n_pos,
            d_model=int(ctx.token_vectors.shape[-1]),
            vocab_size=int(ctx.logits.shape[-1]),
            row_size=self.logit_offset,
            element_size=int(ctx.token_vectors.element_size()),
        )
        model.run_forward_pass(self.tokens, rows, ctx)
        self.timings.update(rows=rows, n_active=n_feat, passes=0)
        self._lap("forward")

        targets = AttributionTargets(
            attribution_targets=self.targets_spec,
            logits=ctx.logits[0, -1],
            unembed_proj=model.unembed_proj,
            tokenizer=model.tokenizer,
            max_n_logits=self.max_n_logits,
            desired_logit_prob=self.desired_logit_prob,
        )
        n_logits = len(targets)
        if n_logits == 0:
            raise ValueError("no attribution targets")
        n_total = self.logit_offset + n_logits
        edges = torch.zeros(n_select + n_logits, n_total)
        node_of_row = torch.zeros(n_select + n_logits, dtype=torch.int32)

        # logit rows: inject each target's unembedding direction at the last position
        vecs = targets.logit_vectors
        for lo in range(0, n_logits, rows):
            chunk = vecs[lo : lo + rows]
            k = chunk.shape[0]
            out = ctx.compute_batch(
                layers=torch.full((k,), n_layers),
                positions=torch.full((k,), n_pos - 1),
                inject_values=chunk,
            )
            edges[lo : lo + k, : self.logit_offset] = out.cpu()
            node_of_row[lo : lo + k] = self.logit_offset + torch.arange(lo, lo + k)
            self.timings["passes"] += 1
        if fast is not None and fast.calls == 0 and n_layers > 0:
            raise UpstreamChanged("the fast contraction never ran during a backward pass")
        self._lap("logits")

        # feature rows, most influential first, re-ranked after every round
        feat_layers, feat_pos, _ = acts.indices()
        visited = torch.zeros(n_feat, dtype=torch.bool)
        filled = n_logits
        done = 0
        while done < n_select:
            if n_select == n_feat:
                pending = torch.arange(n_feat)
            elif forced is not None and not bool(visited[forced].all()):
                pending = forced[~visited[forced]].cpu()
            else:
                from circuit_tracer.graph import compute_partial_influences

                influence = compute_partial_influences(
                    edges[:filled], targets.logit_probabilities, node_of_row[:filled]
                )
                ranked = torch.argsort(influence[:n_feat], descending=True).cpu()
                pending = ranked[~visited[ranked]][: min(self.round_size, n_select - done)]
                self._lap("ranking")
            for chunk_ids in pending.split(rows):
                k = chunk_ids.numel()
                done += k
                out = ctx.compute_batch(
                    layers=feat_layers[chunk_ids],
                    positions=feat_pos[chunk_ids],
                    inject_values=ctx.encoder_vecs[chunk_ids],
                    retain_graph=done < n_select,
                )
                edges[filled : filled + k, : self.logit_offset] = out.cpu()
                node_of_row[filled : filled + k] = chunk_ids.to(torch.int32)
                visited[chunk_ids] = True
                filled += k
                self.timings["passes"] += 1
            self._lap("features")

        selected = torch.nonzero(visited).flatten()
        if n_select < n_feat:  # keep the selected features' columns (frees the wide matrix)
            keep = torch.cat([selected, torch.arange(n_feat, n_total)])
            edges = edges.index_select(1, keep)
        adjacency = self._square(edges, node_of_row, n_select, n_logits)
        del edges
        graph = Graph(
            input_string=model.tokenizer.decode(self.tokens),
            input_tokens=self.tokens,
            logit_targets=targets.logit_targets,
            logit_probabilities=targets.logit_probabilities,
            vocab_size=targets.vocab_size,
            active_features=acts.indices().T,
            activation_values=acts.values(),
            selected_features=selected,
            adjacency_matrix=adjacency,
            cfg=model.model_config,
            scan=model.scan,
        )
        self._lap("package")
        return graph

    @staticmethod
    def _square(
        edges: torch.Tensor, node_of_row: torch.Tensor, n_select: int, n_logits: int
    ) -> torch.Tensor:
        """The square adjacency from rows in attribution order whose columns are already
        [selected features, errors, tokens, logits]: rows sorted into the same node order
        (row = target node, column = source node, circuit-tracer's Graph layout); error and
        token rows stay zero."""
        order = torch.argsort(node_of_row)
        n_nodes = edges.shape[1]
        adjacency = torch.zeros(n_nodes, n_nodes)
        adjacency[:n_select] = edges.index_select(0, order[:n_select])
        adjacency[n_nodes - n_logits :] = edges.index_select(0, order[n_select:])
        return adjacency
