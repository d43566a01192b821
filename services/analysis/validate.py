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
    raw = json.loads((organism_dir / "prompts.json").read_text())
    if raw.get("schema_version") != 1:
        raise ValueError(f"{organism_dir}/prompts.json: unknown schema_version")
    return [p["text"] for p in raw["prompts"] if p.get("split") == "heldout"]


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
