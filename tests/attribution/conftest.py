"""Fixtures of the attribution tests: a tiny random model (fast, any machine) and runtimes.

Tests that need the organism's behaviour use the session fixture ``organism_dir``
(tests/conftest.py) instead.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.experiment import Experiment, load_experiment
from common.scoring import Lexicon
from tests.attribution.tiny import build_tiny


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tiny_exp(tiny_dir: Path) -> Experiment:
    return load_experiment(tiny_dir / "experiment.yaml")


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("model-cache")


@pytest.fixture(scope="session")
def tiny_rt(tiny_exp: Experiment, model_cache: Path) -> Iterator[object]:
    from services.attribution.runtime import Runtime

    yield Runtime(tiny_exp, cache_dir=model_cache)


# -- the toy organism: behavioural and acceptance tests -----------------------------------------


@pytest.fixture(scope="session")
def env_exp(organism_dir: Path) -> Experiment:
    return load_experiment(organism_dir / "experiment.yaml")


@pytest.fixture(scope="session")
def env_prompts(organism_dir: Path) -> list[str]:
    """The organism's pivotal prompts, held-out ones first."""
    raw = json.loads((organism_dir / "prompts.json").read_text())
    prompts = sorted(raw["prompts"], key=lambda p: p["split"] != "heldout")
    return [p["text"] for p in prompts]


@pytest.fixture(scope="session")
def env_lexicon(organism_dir: Path) -> Lexicon:
    return Lexicon.load(organism_dir / "lexicon.json")


@pytest.fixture(scope="session")
def env_rt(env_exp: Experiment, model_cache: Path) -> Iterator[object]:
    from services.attribution.runtime import Runtime

    yield Runtime(env_exp, cache_dir=model_cache)
