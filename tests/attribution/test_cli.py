"""``emc graph run`` writes top-k logits and graphs to the store; ``export-viewer`` reads them."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from common.experiment import fingerprint, load_experiment
from common.records import GraphManifest, TopKLogits, prompt_id
from common.settings import get_settings
from common.store import FsStore, keys
from services.attribution.cli import register
from tests.fixtures.tiny import PROMPTS


@pytest.fixture
def app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[typer.Typer]:
    monkeypatch.setenv("EMC_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("EMC_EXPERIMENT", raising=False)
    monkeypatch.delenv("EMC_STORE__ROOT", raising=False)
    monkeypatch.delenv("EMC_STORE__KIND", raising=False)
    get_settings.cache_clear()
    a = typer.Typer()
    register(a)
    yield a


def test_graph_run_and_export(app: typer.Typer, tiny_dir: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    yml = str(tiny_dir / "experiment.yaml")
    res = runner.invoke(
        app,
        [
            "graph",
            "run",
            "--prompt",
            PROMPTS[1],
            "--variant",
            "adapted",
            "-e",
            yml,
            "--targets",
            "topk",
        ],
    )
    assert res.exit_code == 0, res.output
    pid, fp = prompt_id(PROMPTS[1]), fingerprint(load_experiment(yml))
    store = FsStore(tmp_path / "home" / "store")
    assert store.exists(keys.prompt("tiny", pid))
    topk = store.get_record(keys.logits("tiny", pid, fp, "adapted"), TopKLogits)
    m = store.get_record(keys.graph_manifest("tiny", pid, fp, "adapted"), GraphManifest)
    assert m.logit_token_ids == [t.token_id for t in topk.tokens]
    assert not store.exists(keys.logits("tiny", pid, fp, "base"))
    assert pid in res.output and "top-k" in res.output

    out = tmp_path / "viewer"
    res = runner.invoke(
        app, ["graph", "export-viewer", pid, "adapted", "--out", str(out), "-e", yml]
    )
    assert res.exit_code == 0, res.output
    assert json.loads((out / f"{pid}-adapted.json").read_text())["nodes"]

    res = runner.invoke(app, ["graph", "export-viewer", pid, "base", "--out", str(out), "-e", yml])
    assert res.exit_code == 1 and "no graph" in res.output
    res = runner.invoke(app, ["graph", "run", "--prompt", "x", "--variant", "nope", "-e", yml])
    assert res.exit_code == 1 and "unknown variant" in res.output
