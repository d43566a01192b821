"""Fixtures of the attribution tests: a tiny random model (fast, any machine) and runtimes.

Tests that need the organism's behaviour use the session fixture ``organism_dir``
(tests/conftest.py) instead.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from common.experiment import Experiment, load_experiment
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


# -- the model the behavioural tests run on -----------------------------------------------------
# `env_*` fixtures: the toy organism (acceptance) when it can be built, else the tiny model.


@pytest.fixture(scope="session")
def env_exp(tiny_exp: Experiment) -> Experiment:
    return tiny_exp


@pytest.fixture(scope="session")
def env_prompts() -> list[str]:
    from tests.attribution.tiny import PROMPTS

    return list(PROMPTS)


@pytest.fixture(scope="session")
def env_rt(env_exp: Experiment, model_cache: Path) -> Iterator[object]:
    from services.attribution.runtime import Runtime

    yield Runtime(env_exp, cache_dir=model_cache)
