"""The experiment file: what is computed (variants, transcoders, dtype, limits, judge, generator).

An experiment is a YAML file. Relative paths in it are relative to the file. Example::

    name: toy
    variants:
      base: {model: ../organism/base}
      adapted: {model: ../organism/base, adapter: ../organism/adapter}
    transcoders: {path: ../organism/transcoders}
    dtype: auto
    top_k: 10

Its :func:`fingerprint` hashes everything that changes numbers (models, adapter files,
transcoders, dtype, top-k, attribution limits); every artifact carries it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from common.errors import UserError

Dtype = Literal["auto", "float32", "bfloat16", "float16"]


class ExperimentError(UserError, ValueError):
    """An experiment file that cannot be used; the message says which field and how to fix it."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class VariantSpec(_Strict):
    """One model under study: a base model (hub name or local dir), optionally + a PEFT adapter."""

    model: str = Field(
        description="hub id (e.g. meta-llama/Llama-3.2-1B-Instruct), a hub-cache snapshot "
        "directory or a local directory"
    )
    adapter: str | None = Field(default=None, description="PEFT adapter directory")
    adapter_base: str | None = Field(
        default=None,
        description="override of the adapter-provenance check: the name the adapter records "
        "as its base (adapter_config.json base_model_name_or_path) is declared to be this "
        "variant's model; any other recorded base is still refused",
    )


class TranscoderSpec(_Strict):
    """A transcoder set for one variant: where it is, its kind, the hooks its features read from and
    write to, and whether to load rows lazily."""

    path: str = Field(
        description="local directory (config.yaml + layer_{i}.safetensors, or just the layer "
        "files), or an hf:// repo (resolved from the hub cache when HF_HUB_OFFLINE is set)"
    )
    kind: Literal["per_layer", "cross_layer"] = "per_layer"
    feature_input_hook: str = "mlp.hook_in"
    feature_output_hook: str = "mlp.hook_out"
    lazy_encoder: bool | Literal["auto"] = Field(
        default="auto",
        description="read encoder rows from disk on demand (circuit-tracer's lazy_encoder); "
        "auto: for sets over 2 GiB",
    )
    lazy_decoder: bool | Literal["auto"] = Field(
        default="auto",
        description="read decoder rows from disk on demand (lazy_decoder); auto: for sets "
        "over 2 GiB. The files must stay in place while a worker runs",
    )


#: fitted on the toy organism (CPU, float32, batch 256; bench/graph_memory.py measures it):
#: elements kept per attention score of the batched backward passes, and per (batch row,
#: layer, residual dimension, token) for activations, gradients and edges
_ATTN_ELEMENTS_PER_SCORE = 1.0
_LINEAR_ELEMENTS_PER_RESIDUAL = 26.0


class AttributionLimits(_Strict):
    """Every limit of circuit-tracer's ``attribute`` is set explicitly (defaults grow as N^2)."""

    max_feature_nodes: int = Field(default=2048, gt=0)
    batch_size: int = Field(default=256, gt=0)
    max_n_logits: int = Field(default=10, gt=0)
    desired_logit_prob: float = Field(default=0.95, gt=0, le=1)
    max_activation_norm: float = Field(
        default=1e4, gt=0, description="a layer whose residual norm exceeds this fails the prompt"
    )
    adapter_node: bool | Literal["auto"] = Field(
        default="auto",
        description="split a LoRA on mlp.down_proj out of its layer's error node as adapter "
        "nodes (services/attribution/adapter.py); auto: for adapted variants with per-layer "
        "transcoders",
    )
    max_prompt_tokens: int = Field(
        default=256,
        gt=1,
        description="longer prompts are refused before any model work: a graph's memory grows "
        "with the square of the prompt's length (see graph_memory_bytes). Not in the "
        "fingerprint: it decides which prompts run, not what they compute",
    )
    logits_batch_size: int = Field(
        default=32,
        gt=0,
        description="top-k logits: prompts per padded forward pass. Not in the fingerprint: "
        "batched and single passes give the same top-k (tests/attribution/test_topk_batch.py)",
    )

    def computed(self) -> dict[str, float | int | str | None]:
        """The limits that change a graph's numbers (fingerprint, graph manifests)."""
        return self.model_dump(exclude={"max_prompt_tokens", "logits_batch_size"})

    def graph_memory_bytes(
        self, n_tokens: int, *, n_layers: int, n_heads: int, d_model: int, dtype_bytes: int
    ) -> float:
        """Estimated peak memory of one graph beyond the loaded model, for a prompt of
        ``n_tokens``: the attention scores of ``batch_size`` backward passes (quadratic in
        the length) plus activations and edges (linear). Fitted on the toy organism within
        ~10% from 130 to 500 tokens; a rough guide for other models."""
        attention = self.batch_size * n_heads * n_layers * n_tokens**2 * _ATTN_ELEMENTS_PER_SCORE
        linear = self.batch_size * n_layers * d_model * n_tokens * _LINEAR_ELEMENTS_PER_RESIDUAL
        return (attention + linear) * dtype_bytes


class LLMCallSpec(_Strict):
    """How an OpenAI-compatible model is called (``LLMClient.for_spec`` reads these)."""

    model: str = "o3"
    concurrency: int = Field(default=4, gt=0)
    max_retries: int = Field(default=5, ge=0)
    timeout_s: float = Field(default=60.0, gt=0, description="one attempt's timeout")
    deadline_s: float = Field(
        default=180.0,
        gt=0,
        description="total time of one call, retries included: a hung server costs this "
        "once, then the judge queue pauses until the server answers (common/breaker.py)",
    )


class JudgeSpec(LLMCallSpec):
    """Which judge labels top-k tokens: the shipped lexicon, or an OpenAI-compatible model with
    few-shot human examples."""

    kind: Literal["lexicon", "openai"] = "lexicon"
    name: str = Field(default="", description="id in artifact keys; default: kind[-model]")
    lexicon: str | None = Field(default=None, description="lexicon JSON (the organism ships one)")
    few_shot: int = Field(default=6, ge=0)

    @property
    def judge_id(self) -> str:
        """The judge's id in artifact keys: ``name``, else ``lexicon`` or ``openai-<model>``."""
        if self.name:
            return self.name
        return self.kind if self.kind == "lexicon" else f"openai-{self.model}"


class PtsSpec(_Strict):
    """Pivotal token search of the ``answers`` generator (services/generator/pts.py)."""

    rollouts: int = Field(default=20, gt=0, description="rollouts per prefix (PTS default)")
    threshold: float = Field(
        default=0.2, gt=0, le=1, description="jump in P(misaligned) that makes a token pivotal"
    )
    max_prefixes: int = Field(
        default=16, ge=2, description="cap on prefixes estimated per answer (cost control)"
    )
    max_new_tokens: int = Field(default=48, gt=0, description="length of answers and rollouts")
    temperature: float = Field(default=1.0, gt=0)
    samples_per_question: int = Field(
        default=20, gt=0, description="answer slots per question paraphrase (each: every variant)"
    )
    scorer: Literal["offline", "openai"] | None = Field(
        default=None,
        description="EM scorer of answers and rollouts; default: offline when the judge is "
        "the lexicon, else the experiment's OpenAI judge model",
    )


class GeneratorSpec(LLMCallSpec):
    """Which generator proposes prompts (templates or an OpenAI-compatible model), how many per
    batch, and when it pauses for the review queue."""

    kind: Literal["template", "openai", "answers"] = "template"
    questions: str | None = Field(
        default=None,
        description="answers generator: an EM-paper-style questions YAML "
        "(first_plot_questions.yaml format)",
    )
    pts: PtsSpec = Field(default_factory=PtsSpec)
    templates: str | None = Field(
        default=None,
        description="template generator: a templates file or prompt list (the toy organism "
        "ships prompts.json); unset = the built-in English templates",
    )
    batch_size: int = Field(default=10, gt=0)
    few_shot: int = Field(default=6, ge=0)
    temperature: float = Field(default=1.0, ge=0)
    high_water_mark: int = Field(
        default=50, gt=0, description="pause while the review queue is longer"
    )
    beat_seconds: float = Field(default=30.0, gt=0)
    near_duplicate_threshold: float = Field(default=0.9, gt=0, le=1)
    seed: int = 0


class ReviewSpec(_Strict):
    """How a team reviews: claims, the share reviewed twice, the labeling guide."""

    overlap: float = Field(
        default=0.0,
        ge=0,
        le=1,
        description="share of prompts sent to two reviewers, blind to each other's labels "
        "(e.g. 0.1); chosen by prompt id, so the same prompts whatever the order",
    )
    claim_s: float = Field(
        default=300.0,
        ge=10,
        description="how long opening a prompt claims it; the open page renews the claim",
    )
    guidelines: str | None = Field(
        default=None, description="a Markdown labeling guide, shown on `?` in the prompt page"
    )


class FunnelSpec(_Strict):
    """Which prompts go on from the judge to attribution."""

    only_evil: bool = Field(default=True, description="graphs only for prompts with evil tokens")


class Experiment(_Strict):
    """A parsed, validated experiment file."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    variants: dict[str, VariantSpec]
    reference: str = Field(default="base", description="the variant others are compared to")
    transcoders: TranscoderSpec
    dtype: Dtype = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    prompt_format: Literal["house", "chat"] = Field(
        default="house",
        description="house: the prompt text is the model input (User:/Assistant: lines); "
        "chat: the user turn is rendered with the tokenizer's chat template (generation "
        "prompt, fixed date) and the pivotal ending appended",
    )
    top_k: int = Field(default=10, gt=0, le=100)
    seed: int = 0
    attribution: AttributionLimits = Field(default_factory=AttributionLimits)
    judge: JudgeSpec = Field(default_factory=JudgeSpec)
    generator: GeneratorSpec = Field(default_factory=GeneratorSpec)
    funnel: FunnelSpec = Field(default_factory=FunnelSpec)
    review: ReviewSpec = Field(default_factory=ReviewSpec)
    source: str | None = Field(default=None, description="the file it was read from (set by load)")

    @field_validator("variants")
    @classmethod
    def _some_variants(cls, v: dict[str, VariantSpec]) -> dict[str, VariantSpec]:
        if not v:
            raise ValueError("at least one variant is needed, e.g. variants: {base: {model: ...}}")
        for name in v:
            if not name.replace("_", "").replace("-", "").isalnum():
                raise ValueError(f"variant name {name!r} must be letters, digits, - or _")
        return v

    @model_validator(mode="after")
    def _reference_exists(self) -> Experiment:
        if self.reference not in self.variants:
            raise ValueError(
                f"reference variant {self.reference!r} is not among variants "
                f"{sorted(self.variants)}: set `reference:` to one of them"
            )
        return self

    @property
    def variant_names(self) -> list[str]:
        """Variants in a stable order, the reference first."""
        return [self.reference, *sorted(n for n in self.variants if n != self.reference)]

    @property
    def fingerprint(self) -> str:
        """This experiment's :func:`fingerprint` (16 hex chars), computed on each access."""
        return fingerprint(self)


def _resolve(value: str | None, base: Path) -> str | None:
    """Resolve a relative local path against the experiment file's directory.

    Values that exist nowhere locally and do not start with '.' or '/' are hub names.
    """
    if value is None or value.startswith("hf://"):
        return value
    p = Path(value).expanduser()
    if p.is_absolute():
        return str(p)
    candidate = (base / p).resolve()
    if candidate.exists() or value.startswith("."):
        return str(candidate)
    return value


def load_experiment(path: str | Path) -> Experiment:
    """Read and validate an experiment YAML; errors name the field and the fix."""
    path = Path(path)
    if not path.exists():
        raise ExperimentError(
            f"experiment file {path} does not exist: pass an existing YAML "
            "(set EMC_EXPERIMENT or --experiment), or run `emc organism build` for the default"
        )
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ExperimentError(f"experiment file {path} is not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise ExperimentError(f"experiment file {path} must be a mapping with name, variants, ...")
    return parse_experiment(raw, base_dir=path.parent, source=str(path))


def parse_experiment(raw: dict[str, Any], base_dir: Path, source: str | None = None) -> Experiment:
    """Validate a mapping; local paths are resolved against ``base_dir``."""
    raw = dict(raw)
    variants = raw.get("variants")
    if isinstance(variants, dict):
        raw["variants"] = {
            name: (
                {
                    **spec,
                    "model": _resolve(spec.get("model"), base_dir),
                    "adapter": _resolve(spec.get("adapter"), base_dir),
                }
                if isinstance(spec, dict)
                else spec
            )
            for name, spec in variants.items()
        }
    tc = raw.get("transcoders")
    if isinstance(tc, str):
        tc = {"path": tc}
    if isinstance(tc, dict):
        raw["transcoders"] = {**tc, "path": _resolve(tc.get("path"), base_dir)}
    judge = raw.get("judge")
    if isinstance(judge, dict) and judge.get("lexicon"):
        raw["judge"] = {**judge, "lexicon": _resolve(judge["lexicon"], base_dir)}
    gen = raw.get("generator")
    if isinstance(gen, dict) and gen.get("templates"):
        raw["generator"] = {**gen, "templates": _resolve(gen["templates"], base_dir)}
    review = raw.get("review")
    if isinstance(review, dict) and review.get("guidelines"):
        raw["review"] = {**review, "guidelines": _resolve(review["guidelines"], base_dir)}
    gen = raw.get("generator")
    if isinstance(gen, dict) and gen.get("questions"):
        raw["generator"] = {**gen, "questions": _resolve(gen["questions"], base_dir)}
    raw["source"] = source
    try:
        return Experiment.model_validate(raw)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            loc = ".".join(str(x) for x in err["loc"]) or "(top level)"
            lines.append(f"  {loc}: {err['msg']}")
        where = source or "experiment"
        raise ExperimentError(f"{where} is invalid:\n" + "\n".join(lines)) from e


# ---------------------------------------------------------------------------- fingerprint


def _tree_digest(root: Path) -> str:
    """Digest of a local file or directory: every file's complete content digest
    (:mod:`common.digests`), with its relative path. Dotfiles, locks and logs are left out."""
    from common.digests import file_digest

    if root.is_file():
        return file_digest(root)
    h = hashlib.sha256()
    for f in sorted(x for x in root.rglob("*") if x.is_file()):
        rel = f.relative_to(root).as_posix()
        if rel.startswith(".") or "/." in rel or rel.endswith((".lock", ".log")):
            continue
        h.update(rel.encode())
        h.update(file_digest(f).encode())
    return h.hexdigest()


def path_digest(value: str | None) -> str | None:
    """Identity of a model, adapter or transcoder reference for fingerprints and cache keys.

    A local file or directory enters by content; a hub id (or ``hf://`` repo, or a hub-cache
    snapshot directory) by its repo and resolved commit, which pins its content whether or
    not the files are downloaded yet, so a new hub revision changes it. A hub id that cannot
    be resolved (offline and not cached, or no network) raises
    :class:`common.hub.ModelUnavailable`. Hub ids are ``org/name``.
    """
    if value is None:
        return None
    from common.hub import hub_revision, looks_like_hub_id, snapshot_identity

    ref = value.removeprefix("hf://")
    p = Path(ref).expanduser()
    if p.exists():
        snap = snapshot_identity(p)
        return f"hub:{snap[0]}@{snap[1]}" if snap else _tree_digest(p)
    if not looks_like_hub_id(ref):
        return f"name:{ref}"  # neither a path nor org/name: loading it will say so
    return f"hub:{ref}@{hub_revision(ref)}"


def fingerprint(exp: Experiment) -> str:
    """Hash of everything that changes numbers (16 hex chars).

    Local model, adapter and transcoder directories enter by content (complete digests,
    cached per file version), hub ids by resolved commit and content: moving a directory
    keeps the fingerprint; retraining an adapter or a new hub revision changes it.
    """
    doc = {
        "variants": {
            name: {"model": path_digest(v.model), "adapter": path_digest(v.adapter)}
            for name, v in sorted(exp.variants.items())
        },
        "reference": exp.reference,
        "transcoders": {
            **exp.transcoders.model_dump(exclude={"lazy_encoder", "lazy_decoder"}),
            "path": path_digest(exp.transcoders.path),
        },
        "dtype": exp.dtype,
        "top_k": exp.top_k,
        "attribution": exp.attribution.computed(),
        "prompt_format": exp.prompt_format,
    }
    blob = json.dumps(doc, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
