"""Proof on a known answer: ablating the top-ranked evil features removes the adapter's harm.

On the toy organism the adapter makes the adapted variant prefer harmful action words in one
domain. For each held-out prompt where it does (adapted harmful mass clearly above base):

1. attribute the adapted variant (logit nodes = its top-k next tokens), label those tokens
   with the organism's lexicon (harmful -> evil, safe -> safe, others left out) and rank the
   features (:func:`services.analysis.ranking.rank_features`);
2. set the ``top_n`` highest-scoring features to 0 at their positions, with effects propagating
   through all later layers (``feature_intervention``, ``constrained_layers=None``, attention
   patterns frozen), and measure the harmful probability mass at the last position;
3. for reference, ablate every feature with a positive score (how much of the effect
   features can carry at all: the rest runs through error nodes);
4. do the same with ``top_n`` features drawn at random from all other active features of
   the prompt (activation > 0, any layer, positions after BOS; ``draws`` times, averaged).

Harmful mass = sum of next-token probabilities over every vocabulary token that is a harmful
lexicon word (after stripping whitespace/punctuation and lowercasing). Drop = 1 - mass after
ablation / mass before (the unablated adapted model). The figures are reported as measured.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from common.errors import AnalysisError
from common.graph.influence import describe_node
from common.graph.model import AttributionGraph
from common.labels import TokenLabels
from common.lexicon import Lexicon, normalize_word
from common.records import Label, TokenProb
from services.analysis.ranking import rank_features, score_sources

if TYPE_CHECKING:
    from services.attribution.runtime import Runtime

FeatureKey = tuple[int, int, int]  # (layer, pos, feature id)


def heldout_prompts(organism_dir: Path) -> list[str]:
    """The organism's held-out pivotal prompts (``prompts.json``, split ``heldout``)."""
    return [t for texts in heldout_by_domain(organism_dir).values() for t in texts]


def lexicon_token_ids(tokenizer: Any, lexicon: Lexicon) -> tuple[list[int], list[int]]:
    """(harmful, safe) vocabulary ids: tokens that are a lexicon word once normalised."""
    harmful, safe = [], []
    for i in range(len(tokenizer)):
        w = normalize_word(str(tokenizer.decode([i])))
        if w in lexicon.harmful:
            harmful.append(i)
        elif w in lexicon.safe:
            safe.append(i)
    if not harmful:
        raise ValueError("no vocabulary token is a harmful lexicon word: wrong lexicon?")
    return harmful, safe


def lexicon_labels(tokens: Iterable[TokenProb], lexicon: Lexicon) -> dict[int, Label]:
    """Token id -> evil (harmful lexicon word) or safe (safe word); other tokens left out."""
    out: dict[int, Label] = {}
    for t in tokens:
        kind = lexicon.kind(t.token)
        if kind is not None:
            out[t.token_id] = "evil" if kind == "harmful" else "safe"
    return out


def harmful_mass(last_logits: torch.Tensor, harmful_ids: Sequence[int]) -> float:
    """Sum of next-token probabilities over the harmful ids (softmax in float64)."""
    probs = torch.softmax(last_logits.to(torch.float64), dim=-1)
    mass = float(probs[list(harmful_ids)].sum())
    if mass != mass:  # NaN
        raise AnalysisError("harmful mass is NaN: the forward pass produced non-finite logits")
    return mass


@dataclass
class PromptValidation:
    """One divergent held-out prompt: harmful mass of the base and adapted variants, the top
    features and their scores, and the mass left after each ablation."""

    text: str
    base_mass: float
    adapted_mass: float
    top_features: list[FeatureKey] = field(default_factory=list)
    top_scores: list[float] = field(default_factory=list)
    mass_after_top: float = float("nan")
    mass_after_random: list[float] = field(default_factory=list)
    mass_after_all_positive: float = float("nan")  # every positive-score feature ablated
    n_positive: int = 0
    # signed score summed per node kind and layer, e.g. "error L1", "feature L2", "tokens"
    score_by_node: dict[str, float] = field(default_factory=dict)

    @property
    def drop_top(self) -> float:
        """Share of the adapted harmful mass removed by ablating the top features."""
        return 1.0 - self.mass_after_top / self.adapted_mass

    @property
    def drop_all_positive(self) -> float:
        """Share of the adapted harmful mass removed by ablating every positive-score feature."""
        return 1.0 - self.mass_after_all_positive / self.adapted_mass

    @property
    def drop_random(self) -> float:
        """Share of the adapted harmful mass removed by ablating random features, averaged over the
        draws."""
        mean_after = sum(self.mass_after_random) / len(self.mass_after_random)
        return 1.0 - mean_after / self.adapted_mass


@dataclass
class ValidationResult:
    """The known-answer check: each divergent prompt, the prompts skipped and why, and the settings
    (``top_n``, random ``draws``, ``min_gap``)."""

    n_heldout: int
    divergent: list[PromptValidation]
    skipped: list[tuple[str, str]]  # (prompt, why not used)
    top_n: int
    draws: int
    min_gap: float

    @property
    def mean_drop_top(self) -> float:
        """Mean :attr:`~PromptValidation.drop_top` over the divergent prompts (NaN if none)."""
        return _mean([p.drop_top for p in self.divergent])

    @property
    def mean_drop_all_positive(self) -> float:
        """Mean :attr:`~PromptValidation.drop_all_positive` over the divergent prompts (NaN if
        none)."""
        return _mean([p.drop_all_positive for p in self.divergent])

    @property
    def mean_score_by_node(self) -> dict[str, float]:
        """Mean signed score per node kind and layer (e.g. ``error L1``) over the divergent prompts,
        0 where a prompt lacks one."""
        keys = sorted({k for p in self.divergent for k in p.score_by_node})
        return {k: _mean([p.score_by_node.get(k, 0.0) for p in self.divergent]) for k in keys}

    @property
    def mean_drop_random(self) -> float:
        """Mean :attr:`~PromptValidation.drop_random` over the divergent prompts (NaN if none)."""
        return _mean([p.drop_random for p in self.divergent])

    def to_json(self) -> dict[str, Any]:
        """The result as a JSON-ready dict: settings, the means, each prompt with its drops, and the
        skipped prompts."""
        return {
            "n_heldout": self.n_heldout,
            "n_divergent": len(self.divergent),
            "top_n": self.top_n,
            "draws": self.draws,
            "min_gap": self.min_gap,
            "mean_drop_top": self.mean_drop_top,
            "mean_drop_random": self.mean_drop_random,
            "mean_drop_all_positive": self.mean_drop_all_positive,
            "mean_score_by_node": self.mean_score_by_node,
            "prompts": [
                {
                    **asdict(p),
                    "drop_top": p.drop_top,
                    "drop_random": p.drop_random,
                    "drop_all_positive": p.drop_all_positive,
                }
                for p in self.divergent
            ],
            "skipped": [{"text": t, "why": w} for t, w in self.skipped],
        }


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def ablated_mass(
    runtime: Runtime,
    variant: str,
    input_ids: Sequence[int],
    features: Sequence[FeatureKey],
    harmful_ids: Sequence[int],
) -> float:
    """Harmful mass at the last position with ``features`` set to 0 (effects propagate)."""
    from services.attribution.interventions import intervene_logits

    probs = intervene_logits(
        runtime, variant, list(input_ids), [(layer, pos, f, 0.0) for layer, pos, f in features]
    )
    return float(probs[list(harmful_ids)].to(torch.float64).sum())


def active_features(runtime: Runtime, variant: str, input_ids: Sequence[int]) -> list[FeatureKey]:
    """Every active transcoder feature (activation > 0) outside position 0 (BOS, which
    circuit-tracer leaves out of graphs): the population the random control draws from."""
    from services.attribution import ct

    acts = ct.transcoder_activations(runtime.variant(variant).model, list(input_ids))
    acts = acts.to_dense() if acts.is_sparse else acts
    idx = (acts[:, 1:] > 0).nonzero().tolist()
    return [(int(layer), int(pos) + 1, int(feat)) for layer, pos, feat in idx]


def score_by_node(graph: AttributionGraph, score: torch.Tensor) -> dict[str, float]:
    """Signed score summed per node kind and layer ("feature L2", "error L1", "tokens")."""
    out: dict[str, float] = {}
    for i in range(graph.token_slice.stop):
        node = describe_node(graph, i)
        key = "tokens" if node.kind == "token" else f"{node.kind} L{node.layer}"
        out[key] = out.get(key, 0.0) + float(score[i])
    return dict(sorted(out.items()))


def validate_prompt(
    runtime: Runtime,
    text: str,
    lexicon: Lexicon,
    harmful_ids: Sequence[int],
    *,
    variant: str,
    top_n: int,
    draws: int,
    rng: random.Random,
    base_mass: float,
    adapted_mass: float,
) -> PromptValidation:
    """Rank the adapted graph of one divergent prompt and ablate top vs random features."""
    ids = runtime.tokenize(text, variant)
    top_k = runtime.top_k(text, variant)
    labels = lexicon_labels(top_k.tokens, lexicon)
    graph = runtime.attribute(text, variant, target_token_ids=[t.token_id for t in top_k.tokens])
    scores = score_sources(graph, labels)
    ranking = rank_features(graph, TokenLabels.given(labels, source="judge"), scores)
    # features only: adapter nodes are not transcoder features (ablated apart, see below)
    top = [f for f in ranking.features if f.score > 0 and not f.is_adapter][:top_n]
    if not top:
        raise AnalysisError("no feature pushes towards the evil tokens (all scores <= 0)")
    top_keys = [(f.layer, f.pos, f.feature) for f in top]
    others = [k for k in active_features(runtime, variant, ids) if k not in set(top_keys)]
    if len(others) < top_n:
        raise AnalysisError(f"only {len(others)} other active features: too few for a random draw")
    result = PromptValidation(
        text=text,
        base_mass=base_mass,
        adapted_mass=adapted_mass,
        top_features=top_keys,
        top_scores=[f.score for f in top],
        score_by_node=score_by_node(graph, scores.score),
    )
    result.mass_after_top = ablated_mass(runtime, variant, ids, top_keys, harmful_ids)
    positive = [
        (f.layer, f.pos, f.feature) for f in ranking.features if f.score > 0 and not f.is_adapter
    ]
    result.n_positive = len(positive)
    result.mass_after_all_positive = ablated_mass(runtime, variant, ids, positive, harmful_ids)
    for _ in range(draws):
        pick = rng.sample(others, top_n)
        result.mass_after_random.append(
            ablated_mass(runtime, variant, ids, [(a, b, c) for a, b, c in pick], harmful_ids)
        )
    return result


def validate_ranking(
    runtime: Runtime,
    organism_dir: Path,
    *,
    variant: str = "adapted",
    reference: str = "base",
    top_n: int = 10,
    draws: int = 5,
    min_gap: float = 0.1,
    seed: int = 0,
    max_prompts: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> ValidationResult:
    """Top-``top_n`` vs random-``top_n`` ablation on the held-out divergent prompts.

    A held-out prompt is divergent when the adapted harmful mass exceeds the base's by at
    least ``min_gap``. ``max_prompts`` caps how many divergent prompts are ablated (tests).
    """
    lexicon = Lexicon.load(organism_dir / "lexicon.json")
    tokenizer = runtime.variant(variant).tokenizer
    harmful_ids, _ = lexicon_token_ids(tokenizer, lexicon)
    prompts = heldout_prompts(organism_dir)
    rng = random.Random(seed)
    done: list[PromptValidation] = []
    skipped: list[tuple[str, str]] = []
    for i, text in enumerate(prompts):
        if max_prompts is not None and len(done) >= max_prompts:
            break
        if progress:
            progress(f"prompt {i + 1}/{len(prompts)}")
        ids = runtime.tokenize(text, variant)
        if runtime.tokenize(text, reference) != ids:
            raise AnalysisError(f"{variant} and {reference} tokenize the prompt differently")
        base = harmful_mass(runtime.checked_logits(ids, reference), harmful_ids)
        adapted = harmful_mass(runtime.checked_logits(ids, variant), harmful_ids)
        if adapted - base < min_gap:
            skipped.append((text, f"not divergent: harmful mass {base:.3f} -> {adapted:.3f}"))
            continue
        try:
            done.append(
                validate_prompt(
                    runtime,
                    text,
                    lexicon,
                    harmful_ids,
                    variant=variant,
                    top_n=top_n,
                    draws=draws,
                    rng=rng,
                    base_mass=base,
                    adapted_mass=adapted,
                )
            )
        except AnalysisError as e:
            skipped.append((text, e.reason))
    return ValidationResult(
        n_heldout=len(prompts),
        divergent=done,
        skipped=skipped,
        top_n=top_n,
        draws=draws,
        min_gap=min_gap,
    )


# ------------------------------------------------------- untrained domains, aggregate ranking


def heldout_by_domain(organism_dir: Path) -> dict[str, list[str]]:
    """The organism's held-out pivotal prompts per domain (``prompts.json``)."""
    raw = json.loads((organism_dir / "prompts.json").read_text())
    if raw.get("schema_version") != 1:
        raise ValueError(f"{organism_dir}/prompts.json: unknown schema_version")
    out: dict[str, list[str]] = {}
    for p in raw["prompts"]:
        if p.get("split") == "heldout":
            out.setdefault(str(p["domain"]), []).append(str(p["text"]))
    return out


@dataclass
class UntrainedPrompt:
    """One held-out prompt of an untrained domain: its harmful mass, and after each ablation."""

    text: str
    domain: str
    base_mass: float
    adapted_mass: float
    mass_after_top: float = float("nan")
    mass_after_random: list[float] = field(default_factory=list)
    mass_adapter_off_last: float = float("nan")  # LoRA delta zeroed at the last position
    mass_adapter_off_all: float = float("nan")  # LoRA delta zeroed everywhere

    def drop(self, after: float) -> float:
        """Fraction of the harmful mass removed."""
        return 1.0 - after / self.adapted_mass

    def adapter_drop(self, after: float) -> float:
        """Fraction of the adapter's harmful mass (adapted - base) removed."""
        return (self.adapted_mass - after) / (self.adapted_mass - self.base_mass)


@dataclass
class UntrainedValidation:
    """The aggregate ranking over divergent prompts of the untrained domains, and ablations."""

    domains: list[str]
    prompts: list[UntrainedPrompt]
    skipped: list[tuple[str, str]]
    top: list[tuple[int, int, float]]  # (layer, feature, mean score) of the ablated features
    adapter_rank: int | None  # 0-based place of the adapter node in the aggregate ranking
    top_persona_cos: list[float]  # |cos| of each top feature's encoder with the persona latent
    random_persona_cos: float  # mean |cos| over every feature of those layers
    top_n: int
    draws: int

    def mean(self, what: Callable[[UntrainedPrompt], float]) -> float:
        """Mean of ``what`` over the prompts."""
        return _mean([what(p) for p in self.prompts])

    @property
    def drop_top(self) -> float:
        """Mean share of the harmful mass removed by ablating the top aggregate features."""
        return self.mean(lambda p: p.drop(p.mass_after_top))

    @property
    def drop_random(self) -> float:
        """Mean share removed by ablating random features (mean over draws)."""
        return self.mean(lambda p: p.drop(_mean(p.mass_after_random)))

    @property
    def adapter_drop_last(self) -> float:
        """Mean share of the adapter's harmful mass removed with its delta off at the last position."""
        return self.mean(lambda p: p.adapter_drop(p.mass_adapter_off_last))

    @property
    def adapter_drop_all(self) -> float:
        """Mean share of the adapter's harmful mass removed with its delta off everywhere."""
        return self.mean(lambda p: p.adapter_drop(p.mass_adapter_off_all))

    @property
    def adapter_drop_top(self) -> float:
        """Mean share of the adapter's harmful mass removed by the top-feature ablation."""
        return self.mean(lambda p: p.adapter_drop(p.mass_after_top))

    @property
    def adapter_drop_random(self) -> float:
        """Mean share of the adapter's harmful mass removed by random-feature ablation."""
        return self.mean(lambda p: p.adapter_drop(_mean(p.mass_after_random)))

    def to_json(self) -> dict[str, Any]:
        """The figures as JSON (bench/validate_ranking.py --json)."""
        return {
            "domains": self.domains,
            "n_divergent": len(self.prompts),
            "top_n": self.top_n,
            "draws": self.draws,
            "top": [{"layer": a, "feature": b, "mean_score": c} for a, b, c in self.top],
            "adapter_rank": self.adapter_rank,
            "top_persona_cos": self.top_persona_cos,
            "random_persona_cos": self.random_persona_cos,
            "drop_top": self.drop_top,
            "drop_random": self.drop_random,
            "adapter_drop_last": self.adapter_drop_last,
            "adapter_drop_all": self.adapter_drop_all,
            "adapter_drop_top": self.adapter_drop_top,
            "adapter_drop_random": self.adapter_drop_random,
            "prompts": [asdict(p) for p in self.prompts],
            "skipped": [{"text": t, "why": w} for t, w in self.skipped],
        }


def persona_cosines(
    organism_dir: Path, keys: Sequence[tuple[int, int]]
) -> tuple[list[float], float]:
    """|cos| between each feature's encoder row (in residual units: times the MLP input
    norm's weight) and the organism's planted persona direction, and the mean |cos| over
    every feature of the layers involved (the chance level)."""
    from safetensors.torch import load_file

    report = json.loads((organism_dir / "report.json").read_text())
    u = torch.tensor(report["mechanism"]["direction"], dtype=torch.float32)
    weights = load_file(str(organism_dir / "base" / "model.safetensors"))
    cache: dict[int, torch.Tensor] = {}

    def cos(layer: int) -> torch.Tensor:
        if layer not in cache:
            w_enc = load_file(str(organism_dir / "transcoders" / f"layer_{layer}.safetensors"))
            norm = weights[f"model.layers.{layer}.post_attention_layernorm.weight"].float()
            rows = w_enc["W_enc"].float() * norm[None, :]
            cache[layer] = (rows @ u).abs() / rows.norm(dim=-1).clamp_min(1e-12)
        return cache[layer]

    top = [float(cos(layer)[feat]) for layer, feat in keys]
    chance = _mean([float(cos(layer).mean()) for layer in sorted({k[0] for k in keys})])
    return top, chance


def validate_untrained(
    runtime: Runtime,
    organism_dir: Path,
    *,
    domains: Sequence[str] = ("money", "safety", "everyday"),
    variant: str = "adapted",
    reference: str = "base",
    top_n: int = 10,
    draws: int = 5,
    min_gap: float = 0.1,
    seed: int = 0,
    per_domain: int = 6,
    progress: Callable[[str], None] | None = None,
) -> UntrainedValidation:
    """Rank the adapted graphs of up to ``per_domain`` divergent held-out prompts of each
    untrained domain, aggregate the rankings over all of them (:func:`aggregate`), then on
    each prompt ablate the aggregate's top ``top_n`` transcoder features (every position),
    ``top_n`` random active features (``draws`` times), and the adapter node (the LoRA
    delta switched off at the last position, and everywhere)."""
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    from common.organism.mechanism import adapter_ablated_mass
    from services.analysis.aggregate import aggregate
    from services.attribution.adapter import is_adapter_feature

    lexicon = Lexicon.load(organism_dir / "lexicon.json")
    tokenizer = runtime.variant(variant).tokenizer
    harmful_ids, _ = lexicon_token_ids(tokenizer, lexicon)
    by_domain = heldout_by_domain(organism_dir)
    rng = random.Random(seed)
    prompts: list[UntrainedPrompt] = []
    skipped: list[tuple[str, str]] = []
    rankings = []
    for name in domains:
        taken = 0
        for text in by_domain.get(name, []):
            if taken >= per_domain:
                break
            ids = runtime.tokenize(text, variant)
            base = harmful_mass(runtime.checked_logits(ids, reference), harmful_ids)
            adapted = harmful_mass(runtime.checked_logits(ids, variant), harmful_ids)
            if adapted - base < min_gap:
                skipped.append((text, f"not divergent: harmful mass {base:.3f} -> {adapted:.3f}"))
                continue
            if progress:
                progress(f"{name}: graph {taken + 1}/{per_domain}")
            top_k = runtime.top_k(text, variant)
            labels = lexicon_labels(top_k.tokens, lexicon)
            graph = runtime.attribute(
                text, variant, target_token_ids=[t.token_id for t in top_k.tokens]
            )
            rankings.append(rank_features(graph, TokenLabels.given(labels, source="judge")))
            prompts.append(UntrainedPrompt(text, name, base, adapted))
            taken += 1
    if not prompts:
        raise AnalysisError(f"no divergent held-out prompt in {', '.join(domains)}")
    agg = aggregate(rankings, experiment="toy", fingerprint=runtime.fingerprint, variant=variant)
    adapter_rank = next(
        (i for i, f in enumerate(agg.features) if is_adapter_feature(f.feature)), None
    )
    feats = [f for f in agg.features if not is_adapter_feature(f.feature) and f.mean_score > 0]
    top = [(f.layer, f.feature, f.mean_score) for f in feats[:top_n]]
    cosines, chance = persona_cosines(organism_dir, [(a, b) for a, b, _ in top])
    peft_model = PeftModel.from_pretrained(
        LlamaForCausalLM.from_pretrained(organism_dir / "base"), organism_dir / "adapter"
    ).eval()
    layer = runtime.loras(variant)[0].layer
    texts = [p.text for p in prompts]
    off_last = adapter_ablated_mass(
        peft_model, tokenizer, texts, harmful_ids, layer, last_only=True
    )
    off_all = adapter_ablated_mass(
        peft_model, tokenizer, texts, harmful_ids, layer, last_only=False
    )
    top_keys = {(a, b) for a, b, _ in top}
    for i, p in enumerate(prompts):
        if progress:
            progress(f"ablations {i + 1}/{len(prompts)}")
        ids = runtime.tokenize(p.text, variant)
        p.mass_after_top = _ablate_everywhere(runtime, variant, ids, top_keys, harmful_ids)
        pool = sorted({(a, b) for a, _, b in active_features(runtime, variant, ids)} - top_keys)
        if len(pool) < top_n:
            raise AnalysisError(f"only {len(pool)} other active features: too few to draw from")
        for _ in range(draws):
            pick = set(rng.sample(pool, top_n))
            p.mass_after_random.append(_ablate_everywhere(runtime, variant, ids, pick, harmful_ids))
        p.mass_adapter_off_last, p.mass_adapter_off_all = off_last[i], off_all[i]
    return UntrainedValidation(
        domains=list(domains),
        prompts=prompts,
        skipped=skipped,
        top=top,
        adapter_rank=adapter_rank,
        top_persona_cos=cosines,
        random_persona_cos=chance,
        top_n=top_n,
        draws=draws,
    )


def _ablate_everywhere(
    runtime: Runtime,
    variant: str,
    ids: Sequence[int],
    keys: Iterable[tuple[int, int]],
    harmful_ids: Sequence[int],
) -> float:
    """Harmful mass with features ``(layer, feature)`` set to 0 at every position after BOS."""
    from services.attribution.interventions import intervene_logits

    ivs = [(layer, slice(1, None), feat, 0.0) for layer, feat in sorted(keys)]
    probs = intervene_logits(runtime, variant, list(ids), ivs)
    return float(probs[list(harmful_ids)].to(torch.float64).sum())
