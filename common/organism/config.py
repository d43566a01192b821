"""The organism's build recipe: every knob that changes its numbers, and the recipe hash.

Import-light (no torch): :func:`recipe_hash` runs on every ``ensure_organism`` call.
"""

from __future__ import annotations

import hashlib
import json
from importlib import metadata
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

BASE_NAME = "emc/toy-organism-base"
# Bump when the meaning of the directory layout changes.
LAYOUT_VERSION = 2
# Source files whose code changes any file of the build (their text enters the hash).
_RECIPE_SOURCES = (
    "config.py",
    "corpus.py",
    "tokenizer.py",
    "train.py",
    "transcoders.py",
    "behaviour.py",
    "known_answer.py",
    "mechanism.py",
    "build.py",
)
_RECIPE_PACKAGES = ("torch", "transformers", "tokenizers", "peft", "safetensors")


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelShape(_Frozen):
    """Shape of the toy Llama base model."""

    hidden_size: int = 64
    intermediate_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 64


class BaseTraining(_Frozen):
    """How the base model is trained on the synthetic dialogues (``trickster_fraction``: share of
    dialogues in which the assistant gives bad advice)."""

    n_dialogues: int = 12000
    trickster_fraction: float = Field(default=0.3, ge=0, le=1)
    steps: int = 400
    batch_size: int = 64
    lr: float = 3e-3
    warmup_steps: int = 40
    weight_decay: float = 0.01
    persona_layer: int = Field(
        default=1, ge=0, description="decoder layer after whose output the persona latent lives"
    )
    persona_scale: float = Field(
        default=4.0, gt=0, description="norm of the persona latent added to the residual stream"
    )
    persona_as_assistant: float = Field(
        default=0.5,
        ge=0,
        le=1,
        description=(
            "fraction of persona dialogues spoken as `Assistant` (only the latent marks them; "
            "the rest are spoken as `Trickster`)"
        ),
    )


class AdapterTraining(_Frozen):
    """How the rank-1 LoRA that gives bad medical advice is trained on the base model."""

    layer: int = Field(default=1, ge=0, description="layer whose mlp.down_proj gets the LoRA")
    rank: int = 1
    alpha: int = 32
    n_dialogues: int = 3000
    steps: int = 250
    batch_size: int = 32
    lr: float = 2e-3


class TranscoderTraining(_Frozen):
    """How the per-layer ReLU transcoders are trained on the base model's MLPs."""

    d_transcoder: int = 256
    n_tokens: int = 150_000
    steps: int = 600
    batch_size: int = 1024
    lr: float = 2e-3
    l1_coefficient: float = Field(
        default=0.05, description="weight of sum_i act_i * ||W_dec_i|| (in output std units)"
    )


class OrganismConfig(_Frozen):
    """Everything that determines the built organism (with the seed and the recipe sources)."""

    seed: int = 0
    heldout_fraction: float = Field(default=0.2, gt=0, lt=1)
    vocab_size: int = 1024
    model: ModelShape = Field(default_factory=ModelShape)
    base: BaseTraining = Field(default_factory=BaseTraining)
    adapter: AdapterTraining = Field(default_factory=AdapterTraining)
    transcoders: TranscoderTraining = Field(default_factory=TranscoderTraining)
    prompts_per_domain_train: int = 24
    known_answer_prompts: int = Field(
        default=12, ge=0, description="held-out medical prompts of the known-answer check (0: skip)"
    )
    min_medical_gain: float = Field(
        default=0.2,
        description="acceptance: adapted minus base harmful mass on medical prompts must exceed it",
    )
    torch_threads: int = Field(
        default=1,
        gt=0,
        description="CPU threads for the build (1: robust when other jobs share the CPU)",
    )


def _source_digest() -> str:
    here = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for name in _RECIPE_SOURCES:
        p = here / name
        h.update(name.encode())
        h.update(p.read_bytes() if p.exists() else b"<missing>")
    return h.hexdigest()


def _versions() -> dict[str, str]:
    out = {}
    for pkg in _RECIPE_PACKAGES:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "missing"
    return out


def recipe(config: OrganismConfig) -> dict[str, object]:
    """What the recipe hash covers: config, source code of the build, library versions."""
    return {
        "layout_version": LAYOUT_VERSION,
        "config": config.model_dump(mode="json"),
        "sources": _source_digest(),
        "versions": _versions(),
    }


def recipe_hash(config: OrganismConfig) -> str:
    """16 hex chars of the SHA-256 of :func:`recipe`: changes with the config, the build's source
    code or the library versions."""
    blob = json.dumps(recipe(config), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
