"""``emc analyze report`` and ``emc analyze prompt`` on a store of synthetic graphs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from common.context import get_context
from common.experiment import load_experiment
from common.settings import get_settings
from common.store import FsStore
from tests.analysis.test_report import BASE_ONLY, OTHER, SAFE, put_prompt


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[FsStore, str]]:
    exp_file = tmp_path / "experiment.yaml"
    exp_file.write_text(
        yaml.safe_dump(
            {
                "name": "syn",
                "variants": {"base": {"model": "m"}, "adapted": {"model": "m", "adapter": "a"}},
                "transcoders": {"path": "t"},
            }
        )
    )
    monkeypatch.setenv("EMC_EXPERIMENT", str(exp_file))
    monkeypatch.setenv("EMC_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("EMC_STORE__ROOT", str(tmp_path / "store"))
    get_settings.cache_clear()
    get_context.cache_clear()
    fp = load_experiment(exp_file).fingerprint
    yield FsStore(tmp_path / "store"), fp


def test_analyze_prompt_and_report(env: tuple[FsStore, str], tmp_path: Path) -> None:
    from common.cli.main import app

    store, fp = env
    put_prompt(store, "p1", 1, [SAFE, OTHER, BASE_ONLY], fp=fp)
    runner = CliRunner()
    res = runner.invoke(app, ["analyze", "prompt", "p1", "--top", "3"], env={"COLUMNS": "160"})
    assert res.exit_code == 0, res.output
    assert "p1 / adapted" in res.output and "score = d(P_evil - P_safe)" in res.output
    assert "p1 / base: not ranked" in res.output and "labelled evil" in res.output
    res = runner.invoke(app, ["analyze", "prompt", "nope"])
    assert res.exit_code == 1 and "no labels" in res.output

    out = tmp_path / "out"
    res = runner.invoke(app, ["analyze", "report", "--out", str(out)], env={"COLUMNS": "160"})
    assert res.exit_code == 0, res.output
    assert "1 prompts with graphs, 1 divergent" in res.output
    assert (out / "summary.md").exists() and (out / "top_features_adapted.png").exists()
