"""Health checks of a forward pass and of an attribution graph: fail loudly, never zeros.

Every forward pass that feeds a product (top-k logits; circuit-tracer's own forward passes
inside ``attribute``, so a graph costs no extra pass) runs with plain torch hooks on every
layer's transcoder input (``mlp.hook_in``), MLP output (``mlp.hook_out``) and residual stream after
the layer (``hook_resid_post``). The first location (in execution order) with a non-finite
value, or whose per-position L2 norm exceeds ``experiment.attribution.max_activation_norm``,
fails the prompt with a :class:`~common.errors.PromptFailure` that names the layer, the hook,
the largest magnitude and the dtype. Position 0 (BOS, zeroed by the attribution and host of
the well-known "massive activations" of real models) is exempt from the norm limit, not from
the finiteness check. After attribution the adjacency matrix must be finite and the logits
must receive at least one edge.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from common.errors import PromptFailure
from common.graph.model import all_finite
from services.attribution import ct

STEP = "attribution"


@dataclass(frozen=True)
class LayerStat:
    """One probed location of one forward pass."""

    layer: int
    hook: str
    max_abs: float  # inf or nan when non-finite values are present
    max_norm: float  # largest per-position L2 norm (positions >= 1)
    max_norm_pos: int
    finite: bool


@dataclass
class HealthReport:
    """Per-layer statistics of one forward pass, in execution order."""

    dtype: torch.dtype
    stats: list[LayerStat] = field(default_factory=list)

    def first_problem(self, max_norm: float) -> LayerStat | None:
        """The first location with non-finite values or a per-position norm above ``max_norm``, or
        None."""
        for s in self.stats:
            if not s.finite or s.max_norm > max_norm:
                return s
        return None


def _stat(layer: int, hook: str, x: torch.Tensor) -> LayerStat:
    x = x.detach()
    if x.ndim == 3:
        x = x[0]
    xf = x.float()
    # max |x| is nan or inf exactly when a value is: one reduction decides finiteness
    max_abs = float(xf.abs().amax()) if xf.numel() else 0.0
    finite = math.isfinite(max_abs)
    if not finite and bool(torch.isinf(xf).any()):
        max_abs = math.inf  # report inf when both inf and nan are present
    norms = xf[1:].norm(dim=-1) if xf.shape[0] > 1 else xf.new_zeros(1)
    norms = torch.nan_to_num(norms, nan=math.inf)
    pos = int(norms.argmax())
    return LayerStat(layer, hook, max_abs, float(norms[pos]), pos + 1, finite)


@contextlib.contextmanager
def probe(model: ct.ReplacementModel) -> Iterator[HealthReport]:
    """Record :class:`LayerStat` for every probed location of the first forward pass in the
    block (``attribute()`` runs the same input forward twice; the second is not probed)."""
    report = HealthReport(dtype=model.dtype)
    handles = []
    seen: set[tuple[int, str]] = set()

    def make_hook(
        layer: int, name: str, io: str
    ) -> Callable[[torch.nn.Module, tuple[torch.Tensor, ...], object], None]:
        def hook(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], output: object) -> None:
            if (layer, name) in seen:
                return
            value = inputs[0] if io == "input" else output
            if isinstance(value, tuple):
                value = value[0]
            if isinstance(value, torch.Tensor):
                seen.add((layer, name))
                report.stats.append(_stat(layer, name, value))

        return hook

    try:
        for layer in range(model.cfg.n_layers):
            for name, module, io in ct.hook_modules(model, layer):
                handles.append(module.register_forward_hook(make_hook(layer, name, io)))
        yield report
    finally:
        for h in handles:
            h.remove()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _fmt(x: float) -> str:
    return str(x) if not math.isfinite(x) else f"{x:.3g}"


def check_layers(
    report: HealthReport,
    *,
    max_norm: float,
    variant: str | None = None,
    prompt_id: str | None = None,
) -> None:
    """Raise :class:`PromptFailure` naming the first sick layer (or if nothing was probed)."""
    if not report.stats:
        raise PromptFailure(
            STEP,
            "health probes recorded nothing: the model's layers could not be hooked "
            "(unsupported architecture for the health checks)",
            variant=variant,
            prompt_id=prompt_id,
        )
    bad = report.first_problem(max_norm)
    dtype = _dtype_name(report.dtype)
    if bad is not None:
        if not bad.finite:
            hint = (
                ": fp16 overflows here, use bfloat16 or float32"
                if report.dtype == torch.float16
                else ": check the model (and merged adapter) weights of this layer"
            )
            reason = (
                f"non-finite activations at layer {bad.layer} ({bad.hook}), "
                f"max |x| = {_fmt(bad.max_abs)}, dtype {dtype}{hint}"
            )
        else:
            hint = (
                "; fp16 is close to overflow here, use bfloat16 or float32"
                if report.dtype == torch.float16
                else ""
            )
            reason = (
                f"exploding activations at layer {bad.layer} ({bad.hook}): L2 norm "
                f"{_fmt(bad.max_norm)} at position {bad.max_norm_pos} exceeds "
                f"experiment.attribution.max_activation_norm = {_fmt(max_norm)}, "
                f"max |x| = {_fmt(bad.max_abs)}, dtype {dtype}{hint}"
            )
        raise PromptFailure(STEP, reason, variant=variant, prompt_id=prompt_id)


def check_forward(
    report: HealthReport,
    logits: torch.Tensor,
    *,
    max_norm: float,
    variant: str | None = None,
    prompt_id: str | None = None,
) -> None:
    """Raise :class:`PromptFailure` naming the first sick layer, or for non-finite logits."""
    check_layers(report, max_norm=max_norm, variant=variant, prompt_id=prompt_id)
    dtype = _dtype_name(report.dtype)
    if not bool(torch.isfinite(logits).all()):
        raise PromptFailure(
            STEP,
            f"non-finite logits although every probed layer was finite (dtype {dtype}): "
            "the final norm or unembedding overflowed",
            variant=variant,
            prompt_id=prompt_id,
        )


def check_adjacency(
    adjacency: torch.Tensor,
    activations: torch.Tensor,
    n_logits: int,
    *,
    variant: str | None = None,
    prompt_id: str | None = None,
) -> None:
    """The graph must be finite and the logits must receive edges."""
    if not all_finite(adjacency):
        bad = ~torch.isfinite(adjacency)
        t, s = (int(x) for x in bad.nonzero()[0].tolist())
        raise PromptFailure(
            STEP,
            f"attribution graph has {int(bad.sum())} non-finite edges (first: row {t} <- "
            f"column {s} of {adjacency.shape[0]} nodes) although the forward pass was finite: "
            "the backward pass overflowed; use float32",
            variant=variant,
            prompt_id=prompt_id,
        )
    if not bool(torch.isfinite(activations).all()):
        raise PromptFailure(
            STEP,
            "non-finite transcoder feature activations: the transcoders overflow in this dtype; "
            "use float32",
            variant=variant,
            prompt_id=prompt_id,
        )
    if n_logits == 0 or not bool(adjacency[-n_logits:].any()):
        raise PromptFailure(
            STEP,
            "no edge reaches any logit node (all-zero logit rows): the attribution produced "
            "nothing to analyse; check that the transcoders match the model",
            variant=variant,
            prompt_id=prompt_id,
        )
