"""Fixtures for the steering and EM-eval tests on the toy organism (import them by name)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import typer

from common.experiment import Experiment, load_experiment
from common.settings import get_settings

SHARED_QUESTIONS = (
    Path(__file__).resolve().parents[3]
    / "shared"
    / "data"
    / "em-eval"
    / "first_plot_questions.yaml"
)


@pytest.fixture
def paper_questions(tmp_path: Path) -> Path:
    """A copy of the EM paper's questions (the project never reads the shared path at run time)."""
    if not SHARED_QUESTIONS.is_file():
        pytest.fail(f"{SHARED_QUESTIONS} is missing: the EM tests need the paper's questions file")
    return Path(shutil.copy(SHARED_QUESTIONS, tmp_path / "questions.yaml"))


def medical_heldout(organism_dir: Path, k: int) -> list[str]:
    """The first k held-out prompts of the adapter's domain (where base and adapted differ)."""
    raw = json.loads((organism_dir / "prompts.json").read_text())
    return [
        p["text"] for p in raw["prompts"] if p["domain"] == "medical" and p["split"] == "heldout"
    ][:k]


@pytest.fixture
def toy_home(organism_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """EMC_HOME in tmp (its store is home/store), the organism as the experiment."""
    home = tmp_path / "home"
    monkeypatch.setenv("EMC_HOME", str(home))
    monkeypatch.setenv("EMC_EXPERIMENT", str(organism_dir / "experiment.yaml"))
    for var in ("EMC_STORE__ROOT", "EMC_STORE__KIND", "EMC_OPENAI_BASE_URL", "EMC_OPENAI_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    get_settings.cache_clear()
    yield home
    get_settings.cache_clear()


@pytest.fixture
def eval_app(toy_home: Path) -> typer.Typer:
    """A typer app with ``steer`` and ``eval`` registered (as common/cli.py will do)."""
    from services.attribution.cli_eval import register

    app = typer.Typer()
    register(app)
    return app


@pytest.fixture(scope="session")
def toy_exp(organism_dir: Path) -> Experiment:
    return load_experiment(organism_dir / "experiment.yaml")


@pytest.fixture(scope="session")
def toy_rt(toy_exp: Experiment, tmp_path_factory: pytest.TempPathFactory) -> object:
    """The process's runtime of the organism (models load once per process)."""
    from services.attribution.runtime import get_runtime

    return get_runtime(toy_exp, cache_dir=tmp_path_factory.mktemp("toy-model-cache"))
