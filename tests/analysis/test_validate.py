"""The known answer: on the toy organism, ablating the top-ranked evil features removes most
of the adapter's harmful probability mass; ablating as many random active features does not.

The bench (``bench/validate_ranking.py``) runs every held-out divergent prompt with the
issue's targets (>= 80% vs < 10%); this test runs a few prompts with looser bounds so it
stays fast and stable.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from common.experiment import load_experiment
from common.lexicon import Lexicon
from services.analysis.validate import (
    harmful_mass,
    heldout_prompts,
    lexicon_token_ids,
    validate_ranking,
    validate_untrained,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runtime(organism_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    from services.attribution.runtime import Runtime, clear_cache

    exp = load_experiment(organism_dir / "experiment.yaml")
    yield Runtime(exp, cache_dir=tmp_path_factory.mktemp("analysis-model-cache"))
    clear_cache()


def test_lexicon_ids_and_harmful_mass(organism_dir: Path, runtime: object) -> None:
    lex = Lexicon.load(organism_dir / "lexicon.json")
    tok = runtime.variant("adapted").tokenizer  # type: ignore[attr-defined]
    harmful, safe = lexicon_token_ids(tok, lex)
    assert harmful and safe and not set(harmful) & set(safe)
    logits = torch.full((len(tok),), -1e9)
    logits[harmful[0]] = 0.0
    assert harmful_mass(logits, harmful) == pytest.approx(1.0)
    assert heldout_prompts(organism_dir)


def test_top_features_carry_the_adapters_harm(organism_dir: Path, runtime: object) -> None:
    res = validate_ranking(runtime, organism_dir, top_n=10, draws=3, max_prompts=3)  # type: ignore[arg-type]
    assert len(res.divergent) == 3, res.skipped
    assert res.mean_drop_top >= 0.5, res.to_json()
    assert res.mean_drop_random <= 0.25, res.to_json()
    assert res.mean_drop_top > res.mean_drop_random + 0.3


def test_untrained_domains_aggregate_ranking_finds_the_persona(
    organism_dir: Path, runtime: object
) -> None:
    """Emergent misalignment in domains the adapter never saw: the aggregate ranking over
    their divergent prompts has the adapter node on top; its top features read the planted
    persona latent more than chance, and ablating them removes most of the harm while as
    many random features do not; switching the adapter node off removes the adapter's."""
    res = validate_untrained(
        runtime,  # type: ignore[arg-type]
        organism_dir,
        domains=("money", "safety"),
        top_n=10,
        draws=2,
        per_domain=2,
    )
    assert {p.domain for p in res.prompts} == {"money", "safety"}, res.skipped
    assert res.adapter_rank == 0, res.top
    # features after the adapter's layer (1) read the latent; upstream ones feed its input
    assert len(res.top) == 10 and sum(layer > 1 for layer, _, _ in res.top) >= 3, res.top
    assert max(res.top_persona_cos) > 2 * res.random_persona_cos, res.to_json()
    # the share removed depends on the build, which is deterministic per machine but not
    # across CPUs (these four prompts: 0.48 on an AVX-512 machine's organism, >= 0.6 on the
    # one this test was written on); random ablation stays ~0 on both
    assert res.drop_top >= 0.35, res.to_json()
    assert abs(res.drop_random) <= 0.2, res.to_json()
    assert res.drop_top > res.drop_random + 0.3, res.to_json()
    assert res.adapter_drop_all >= 0.9, res.to_json()
