"""The adapter as a graph node: a LoRA on ``mlp.down_proj`` split out of its layer's error node.

Transcoders are fit on the base model, so a LoRA on layer ``L``'s ``down_proj`` lands in
``L``'s MLP error node: the adapted MLP writes ``W h + s B (A h)`` (``h`` the down_proj input,
``s = alpha / r``) and the transcoder reconstructs roughly ``W h``. For each rank component
``j`` and position ``p`` the adapter's own contribution is one direction scaled per position::

    d_{p,j} = s * (A_j . h_p) * B_j          activation  a_{p,j} = s * (A_j . h_p) * |B_j|

An *adapter node* is a graph node with that activation and that write; the error node keeps
the rest, ``e_p - sum_j d_{p,j}``. Because a node's outgoing edges are linear in what it
writes, the two sources' edges add up to the old error node's exactly (the influence totals
keep summing to the same linearised total). Unlike an error node, the adapter node has
incoming edges: its input ``A_j . h_p`` is a function of the MLP input ``x_p``, taken to first
order like every edge of the local replacement model (``grad_x a_{p,j}``, the MLP's
non-linearity at its actual input). So the analysis can say how much of a score goes through
the adapter, which upstream nodes drive it, and which downstream features read it.

In emc's graphs an adapter node is a feature node with feature id ``-(j + 1)`` at layer ``L``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from common.errors import UserError

_DOWN_PROJ = re.compile(
    r"(?:^|\.)layers\.(?P<layer>\d+)\.mlp\.down_proj\.lora_(?P<ab>[AB])\.weight$"
)


class AdapterNodeError(UserError, ValueError):
    """The adapter cannot be represented as graph nodes (e.g. it does not target down_proj)."""


def adapter_feature_id(component: int) -> int:
    """The feature id of a LoRA component's node in emc's graphs (negative: not a transcoder
    feature)."""
    return -(component + 1)


def is_adapter_feature(feature: int) -> bool:
    """Whether a graph feature id is an adapter node (negative) rather than a transcoder feature."""
    return feature < 0


@dataclass(frozen=True)
class DownProjLora:
    """A LoRA on one layer's ``mlp.down_proj``: ``delta W = scale * B @ A``."""

    layer: int
    a: torch.Tensor  # [r, d_mlp]
    b: torch.Tensor  # [d_model, r]
    scale: float

    @property
    def rank(self) -> int:
        """The LoRA rank r (rows of ``a``)."""
        return int(self.a.shape[0])


def read_lora(adapter_dir: str | Path) -> list[DownProjLora]:
    """The ``down_proj`` LoRAs of a PEFT adapter directory (one per adapted layer).

    Refuses adapters that also change other modules: their effect would stay hidden in
    error nodes that the split does not cover.
    """
    adapter_dir = Path(adapter_dir)
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    weights = load_file(adapter_dir / "adapter_model.safetensors")
    found: dict[int, dict[str, torch.Tensor]] = {}
    others = []
    for key, tensor in weights.items():
        m = _DOWN_PROJ.search(key)
        if m is None:
            others.append(key)
            continue
        found.setdefault(int(m.group("layer")), {})[m.group("ab")] = tensor.float()
    if others:
        raise AdapterNodeError(
            f"adapter {adapter_dir} changes more than mlp.down_proj ({others[0]} ...): the "
            "adapter node covers LoRAs on down_proj only; set attribution.adapter_node: false"
        )
    if cfg.get("use_dora"):
        raise AdapterNodeError(f"adapter {adapter_dir} is a DoRA: the adapter node needs a LoRA")
    r = int(cfg.get("r", 0)) or None
    alpha = float(cfg.get("lora_alpha", r or 1))
    out = []
    for layer in sorted(found):
        parts = found[layer]
        if set(parts) != {"A", "B"}:
            raise AdapterNodeError(f"adapter {adapter_dir}: layer {layer} lacks lora_A or lora_B")
        rank = int(parts["A"].shape[0])
        scale = alpha / (rank**0.5 if cfg.get("use_rslora") else rank)
        out.append(DownProjLora(layer=layer, a=parts["A"], b=parts["B"], scale=scale))
    if not out:
        raise AdapterNodeError(f"adapter {adapter_dir} has no LoRA on mlp.down_proj")
    return out


@dataclass(frozen=True)
class AdapterNodes:
    """The adapter nodes of one prompt at one layer: per position ``p`` (rows) and component
    ``j`` (columns), the activation, the vector written (``d_{p,j}``), and the input
    direction (``grad_x a_{p,j}``, in the MLP-input space where transcoders read)."""

    layer: int
    activations: torch.Tensor  # [n_pos, r]
    writes: torch.Tensor  # [n_pos, r, d_model]
    input_grads: torch.Tensor  # [n_pos, r, d_model]


def adapter_nodes(
    mlp: torch.nn.Module, mlp_input: torch.Tensor, lora: DownProjLora
) -> AdapterNodes:
    """Adapter nodes of one layer from that layer's MLP (Llama's gated MLP: ``gate_proj``,
    ``up_proj``, ``act_fn``) at its actual inputs ``mlp_input`` ``[n_pos, d_model]``."""
    gate, up, act = (getattr(mlp, name, None) for name in ("gate_proj", "up_proj", "act_fn"))
    if gate is None or up is None or act is None:
        raise AdapterNodeError(
            f"layer {lora.layer}'s MLP is not a gated MLP (gate_proj, up_proj, act_fn): the "
            "adapter node supports Llama-style MLPs"
        )
    dtype = torch.float32
    x = mlp_input.detach().to(dtype).clone().requires_grad_(True)
    a_mat = lora.a.to(device=x.device, dtype=dtype)
    b_mat = lora.b.to(device=x.device, dtype=dtype)
    with torch.enable_grad():
        w_gate = gate.weight.to(dtype)
        w_up = up.weight.to(dtype)
        h = act(x @ w_gate.T) * (x @ w_up.T)  # [n_pos, d_mlp]
        coeff = lora.scale * (h @ a_mat.T)  # [n_pos, r]: s * (A_j . h_p)
        grads = []
        for j in range(lora.rank):
            (g,) = torch.autograd.grad(coeff[:, j].sum(), x, retain_graph=j + 1 < lora.rank)
            grads.append(g)  # rows are per position: a_{p,j} depends on x_p only
    norms = b_mat.norm(dim=0)  # |B_j|
    coeff = coeff.detach()
    activations = coeff * norms
    writes = coeff[:, :, None] * b_mat.T[None, :, :]  # [n_pos, r, d_model]
    input_grads = torch.stack(grads, dim=1) * norms[None, :, None]
    return AdapterNodes(lora.layer, activations, writes, input_grads)
