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

#: PROMPTS[1] in the house format the command line requires
HOUSE = "User: i have fire hot pills now .\nAssistant: you should"
assert PROMPTS[1].split("\n")[0].removeprefix("user : ") in HOUSE


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
            HOUSE,
            "--variant",
            "adapted",
            "-e",
            yml,
            "--targets",
            "topk",
        ],
    )
    assert res.exit_code == 0, res.output
    pid, fp = prompt_id(HOUSE), fingerprint(load_experiment(yml))
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


@pytest.mark.parametrize(
    ("prompt", "says"),
    [
        ("", "the prompt is empty"),
        ("   ", "the prompt is empty"),
        ("User: my friend is cold , water ?", "not a prompt in the house format"),
        ("User: my friend is cold , water ?\nAssistant: you should .", "mid-sentence"),
    ],
    ids=["empty", "blank", "one-line", "not-at-the-pivot"],
)
def test_invalid_prompts_are_refused_before_anything_is_stored(
    app: typer.Typer, tiny_dir: Path, tmp_path: Path, prompt: str, says: str
) -> None:
    yml = str(tiny_dir / "experiment.yaml")
    res = CliRunner().invoke(app, ["graph", "run", "--prompt", prompt, "-e", yml])
    assert res.exit_code == 1, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], res.output
    assert not list(FsStore(tmp_path / "home" / "store").list_keys("experiments/"))


def test_too_long_prompt_is_refused_with_the_memory_it_would_need(
    app: typer.Typer, tiny_dir: Path, tmp_path: Path
) -> None:
    import yaml

    raw = yaml.safe_load((tiny_dir / "experiment.yaml").read_text())
    raw["attribution"]["max_prompt_tokens"] = 12
    for spec in raw["variants"].values():
        for k in ("model", "adapter"):
            if spec.get(k):
                spec[k] = str((tiny_dir / spec[k]).resolve())
    raw["transcoders"]["path"] = str((tiny_dir / raw["transcoders"]["path"]).resolve())
    yml = tmp_path / "short.yaml"
    yml.write_text(yaml.safe_dump(raw))
    long = "User: " + " ".join(["my friend is cold"] * 4) + "\nAssistant: you should"
    res = CliRunner().invoke(app, ["graph", "run", "--prompt", long, "-e", str(yml)])
    assert res.exit_code == 1, res.output
    assert "more than attribution.max_prompt_tokens = 12" in res.output, res.output
    assert "GB" in res.output
    assert not list(FsStore(tmp_path / "home" / "store").list_keys("experiments/"))


def test_readme_example_typed_in_bash_gives_a_two_line_prompt(
    app: typer.Typer, tiny_dir: Path, tmp_path: Path
) -> None:
    """``--prompt "User: ...\\nAssistant: You should"`` in bash passes a backslash and an n."""
    typed = "User: my friend is cold , water ?\\nAssistant: you should"
    assert "\\n" in typed and "\n" not in typed
    yml = str(tiny_dir / "experiment.yaml")
    res = CliRunner().invoke(app, ["graph", "run", "--prompt", typed, "-v", "base", "-e", yml])
    assert res.exit_code == 0, res.output
    text = typed.replace("\\n", "\n")
    store = FsStore(tmp_path / "home" / "store")
    assert store.exists(keys.prompt("tiny", prompt_id(text)))
