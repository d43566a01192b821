"""Per-layer ReLU transcoders trained on the base model's MLPs, in circuit-tracer's format.

circuit-tracer's Llama hooks (nnsight backend, ``utils/tl_nnsight_mapping.py``) read
``mlp.hook_in`` = output of ``post_attention_layernorm`` (the MLP's input) and
``mlp.hook_out`` = output of ``mlp``; the transcoders are trained on exactly those, captured
with forward hooks on ``model.layers[i].mlp``. Files: ``layer_{i}.safetensors`` with
``W_enc [d_tc, d_model]``, ``W_dec [d_tc, d_model]``, ``b_enc [d_tc]``, ``b_dec [d_model]``
(ReLU: no threshold key), as ``circuit_tracer...load_relu_transcoder`` reads them.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import BaseModel
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from common.organism.config import TranscoderTraining
from common.organism.train import Encoded, _batches, _decoder_layers, mlp_of, persona_set

FEATURE_INPUT_HOOK = "mlp.hook_in"
FEATURE_OUTPUT_HOOK = "mlp.hook_out"


@dataclass
class MlpActivations:
    """Per layer: MLP inputs and outputs of real tokens (BOS and padding dropped)."""

    inputs: list[torch.Tensor]  # n_layers x [n_tokens, d_model]
    outputs: list[torch.Tensor]
    is_pivot: torch.Tensor  # [n_tokens] bool: the token is a row's pivot


@torch.no_grad()
def collect_mlp_activations(
    model: nn.Module,
    data: Encoded,
    max_tokens: int,
    batch_size: int = 256,
    persona: tuple[int, torch.Tensor] | None = None,
) -> MlpActivations:
    """Run ``model`` over ``data`` and keep MLP in/out of up to ``max_tokens`` real tokens;
    ``persona`` (layer, vector) sets the persona latent in the rows flagged in ``data``, as
    in base training (the transcoders see the base model's whole corpus)."""
    layers = _decoder_layers(model)
    ins: list[list[torch.Tensor]] = [[] for _ in layers]
    outs: list[list[torch.Tensor]] = [[] for _ in layers]
    pivots: list[torch.Tensor] = []
    keep: torch.Tensor | None = None

    def hook_for(i: int) -> Callable[..., None]:
        def hook(_m: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            assert keep is not None
            ins[i].append(inp[0][keep].detach().clone())
            outs[i].append(out[keep].detach().clone())

        return hook

    handles = [mlp_of(layer).register_forward_hook(hook_for(i)) for i, layer in enumerate(layers)]
    got = 0
    try:
        for start in range(0, len(data), batch_size):
            batch = data.rows(torch.arange(start, min(start + batch_size, len(data))))
            keep = batch.attention_mask.bool()
            keep[:, 0] = False  # circuit-tracer zeroes the BOS position
            pos = torch.arange(keep.shape[1])[None, :]
            pivots.append((pos == batch.pivot[:, None])[keep])
            with (
                persona_set(model, persona[0], persona[1], batch.persona)
                if persona is not None
                else nullcontext()
            ):
                model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
            got += int(keep.sum())
            if got >= max_tokens:
                break
    finally:
        for h in handles:
            h.remove()
    return MlpActivations(
        inputs=[torch.cat(x)[:max_tokens] for x in ins],
        outputs=[torch.cat(x)[:max_tokens] for x in outs],
        is_pivot=torch.cat(pivots)[:max_tokens],
    )


class TranscoderStats(BaseModel):
    """Quality of one layer's transcoder on held-out tokens."""

    layer: int
    variance_explained: float
    variance_explained_pivot: float
    mean_l0: float
    mean_l0_pivot: float
    dead_fraction: float


class ReluTranscoder(nn.Module):
    """The training-time module; :meth:`state` gives circuit-tracer's tensors."""

    def __init__(self, d_model: int, d_tc: int, y_mean: torch.Tensor) -> None:
        super().__init__()
        w = torch.randn(d_tc, d_model)
        w = 0.1 * w / w.norm(dim=1, keepdim=True)
        self.W_enc = nn.Parameter(w.clone())
        self.W_dec = nn.Parameter(w.clone())
        self.b_enc = nn.Parameter(torch.zeros(d_tc))
        self.b_dec = nn.Parameter(y_mean.clone())

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Feature activations: ReLU of the encoder applied to MLP inputs ``x``."""
        return torch.relu(x @ self.W_enc.T + self.b_enc)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The estimated MLP output and the feature activations for inputs ``x``."""
        f = self.encode(x)
        return f @ self.W_dec + self.b_dec, f

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """The estimated MLP output only."""
        return self(x)[0]

    def state(self) -> dict[str, torch.Tensor]:
        """Detached, contiguous ``W_enc``, ``W_dec``, ``b_enc``, ``b_dec``: the tensors of one
        circuit-tracer per-layer transcoder file."""
        return {
            "W_enc": self.W_enc.detach().contiguous(),
            "W_dec": self.W_dec.detach().contiguous(),
            "b_enc": self.b_enc.detach().contiguous(),
            "b_dec": self.b_dec.detach().contiguous(),
        }


def train_transcoder(
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: TranscoderTraining,
    seed: int,
    desc: str = "transcoder",
    progress: bool = True,
) -> ReluTranscoder:
    """Fit ``y ~ W_dec relu(W_enc x + b_enc) + b_dec`` with an L1 penalty on act x ||W_dec||."""
    y_mean = y.mean(0)
    var = float(((y - y_mean) ** 2).sum(-1).mean())
    if not var > 0:
        raise ValueError(f"{desc}: MLP outputs have no variance; the base model is broken")
    std = var**0.5
    tc = ReluTranscoder(x.shape[1], cfg.d_transcoder, y_mean)
    opt = torch.optim.Adam(tc.parameters(), lr=cfg.lr)
    warm = max(1, cfg.steps // 10)
    bar = tqdm(total=cfg.steps, desc=desc, disable=not progress, leave=False)
    for step, idx in enumerate(_batches(x.shape[0], cfg.batch_size, cfg.steps, seed)):
        y_hat, f = tc(x[idx])
        mse = ((y_hat - y[idx]) ** 2).sum(-1).mean() / var
        l1 = (f * tc.W_dec.norm(dim=1)).sum(-1).mean() / std
        lam = cfg.l1_coefficient * min(1.0, (step + 1) / warm)
        for g in opt.param_groups:
            g["lr"] = cfg.lr * min(1.0, 2.0 * (1 - step / cfg.steps) + 0.05)
        loss = mse + lam * l1
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.update(1)
        bar.set_postfix(fvu=f"{float(mse.detach()):.3f}")
    bar.close()
    return tc


@torch.no_grad()
def evaluate_transcoder(
    tc: ReluTranscoder, x: torch.Tensor, y: torch.Tensor, is_pivot: torch.Tensor, layer: int
) -> TranscoderStats:
    """Quality of ``tc`` on held-out MLP inputs ``x`` and outputs ``y``: variance explained and mean
    L0, on all tokens and on the pivot tokens (``is_pivot``), and the share of features never
    active."""
    y_hat, f = tc(x)

    def fve(mask: torch.Tensor) -> float:
        yy = y[mask]
        resid = ((y_hat[mask] - yy) ** 2).sum()
        total = ((yy - yy.mean(0)) ** 2).sum()
        return float(1 - resid / total)

    everything = torch.ones_like(is_pivot)
    active = f > 0
    return TranscoderStats(
        layer=layer,
        variance_explained=fve(everything),
        variance_explained_pivot=fve(is_pivot),
        mean_l0=float(active.sum(-1).float().mean()),
        mean_l0_pivot=float(active[is_pivot].sum(-1).float().mean()),
        dead_fraction=float((~active.any(0)).float().mean()),
    )


def save_transcoder(tc: ReluTranscoder, path: Path) -> None:
    """Write the transcoder's :meth:`~ReluTranscoder.state` to a safetensors file."""
    save_file(tc.state(), str(path))


def train_transcoders(
    train: MlpActivations,
    test: MlpActivations,
    cfg: TranscoderTraining,
    out_dir: Path,
    seed: int,
    progress: bool = True,
) -> tuple[list[TranscoderStats], list[ReluTranscoder]]:
    """Train, evaluate and save one transcoder per layer into ``out_dir/layer_{i}.safetensors``.

    Returns the stats and the (frozen) transcoders.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    stats = []
    tcs = []
    for layer, (x, y) in enumerate(zip(train.inputs, train.outputs, strict=True)):
        tc = train_transcoder(x, y, cfg, seed + 100 + layer, f"transcoder {layer}", progress)
        stats.append(
            evaluate_transcoder(tc, test.inputs[layer], test.outputs[layer], test.is_pivot, layer)
        )
        save_transcoder(tc, out_dir / f"layer_{layer}.safetensors")
        tcs.append(tc.requires_grad_(False))
    return stats, tcs
