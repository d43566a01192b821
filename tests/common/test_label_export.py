"""Label export with provenance: rows per token label, JSON lines and CSV, and the
`emc labels export` command on a real store."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from common.cli.labels import register
from common.experiment import Experiment
from common.label_export import FIELDS, export_rows, write_export
from common.records import HumanLabel
from common.settings import get_settings
from common.store import FsStore
from common.store import keys as K
from tests.common.test_team_labels import review
from tests.fixtures.data import DIVERGENT, MILD, TEXT_DIVERGENT, TEXT_MILD, seed_prompt


def _seed(store: FsStore, experiment: Experiment) -> dict[str, list[tuple[str, HumanLabel]]]:
    """A disputed-then-adjudicated prompt and a prompt flagged bad without token labels."""
    name = experiment.name
    d = seed_prompt(store, experiment, TEXT_DIVERGENT, DIVERGENT)
    m = seed_prompt(store, experiment, TEXT_MILD, MILD)
    a = review(d.pid, DIVERGENT, "alice").model_copy(update={"guideline_version": "abc123abc123"})
    b = review(d.pid, DIVERGENT, "bob", change={" just": "safe"}).model_copy(
        update={"elapsed_s": 12.5}
    )
    ka = store.append(K.labels_history(name, d.pid), a)
    kb = store.append(K.labels_history(name, d.pid), b)
    c = review(d.pid, DIVERGENT, "carol", role="adjudication", resolves=[ka, kb])
    kc = store.append(K.labels_history(name, d.pid), c)
    bad = HumanLabel(prompt_id=m.pid, reviewer="bob", labels=[], bad_prompt=True, note="typo")
    kbad = store.append(K.labels_history(name, m.pid), bad)
    return {d.pid: [(ka, a), (kb, b), (kc, c)], m.pid: [(kbad, bad)]}


def test_rows_carry_the_provenance_of_every_label(store: FsStore, experiment: Experiment) -> None:
    seeded = _seed(store, experiment)
    rows = list(export_rows(store, experiment.name))
    expected = sum(max(1, len(lab.labels)) for h in seeded.values() for _, lab in h)
    assert len(rows) == expected and all(tuple(r) == FIELDS for r in rows)
    for pid, history in seeded.items():
        for key, lab in history:
            mine = [r for r in rows if r["label_key"] == key]
            assert {r["prompt_id"] for r in mine} == {pid}
            assert {(r["reviewer"], r["labeled_at"]) for r in mine} == {
                (lab.reviewer, lab.created_at.isoformat())
            }
            assert {r["adjudicated"] for r in mine} == {lab.adjudicated}
            assert {r["guideline_version"] for r in mine} == {lab.guideline_version}
            assert {r["current"] for r in mine} == {key == history[-1][0]}
            assert {(r["variant"], r["token_id"], r["label"]) for r in mine} == (
                {(t.variant, t.token_id, t.label) for t in lab.labels} or {(None, None, None)}
            )
    d_pid = next(iter(seeded))
    assert {r["review_state"] for r in rows if r["prompt_id"] == d_pid} == {"adjudicated"}
    current = list(export_rows(store, experiment.name, current_only=True))
    assert {r["reviewer"] for r in current} == {"carol", "bob"} and all(
        r["current"] for r in current
    )
    assert len(current) == len(seeded[d_pid][-1][1].labels) + 1


def test_jsonl_and_csv_hold_the_same_rows(store: FsStore, experiment: Experiment) -> None:
    _seed(store, experiment)
    rows = list(export_rows(store, experiment.name))
    out = io.StringIO()
    assert write_export(rows, "jsonl", out) == len(rows)
    assert [json.loads(line) for line in out.getvalue().splitlines()] == rows
    out = io.StringIO()
    assert write_export(rows, "csv", out) == len(rows)
    back = list(csv.DictReader(io.StringIO(out.getvalue())))
    assert back == [{k: "" if v is None else str(v) for k, v in r.items()} for r in rows]
    with pytest.raises(ValueError, match="jsonl or csv"):
        write_export(rows, "xml", io.StringIO())  # type: ignore[arg-type]


def test_the_export_command(
    store: FsStore, experiment: Experiment, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seeded = _seed(store, experiment)
    monkeypatch.setenv("EMC_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("EMC_STORE__ROOT", str(store.root))
    monkeypatch.setenv("EMC_EXPERIMENT", str(experiment.source))
    app = typer.Typer()
    register(app)
    get_settings.cache_clear()
    try:
        target = tmp_path / "labels.csv"
        done = CliRunner().invoke(app, ["labels", "export", "--format", "csv", "-o", str(target)])
        assert done.exit_code == 0, done.output
        back = list(csv.DictReader(target.open()))
        assert len(back) == sum(max(1, len(lab.labels)) for h in seeded.values() for _, lab in h)
        assert {r["adjudicated"] for r in back if r["reviewer"] == "carol"} == {"True"}
        assert f"{len(back)} label row(s)" in done.output
        jl = CliRunner().invoke(app, ["labels", "export", "--current-only"])
        assert jl.exit_code == 0, jl.output
        lines = [json.loads(x) for x in jl.stdout.splitlines() if x.startswith("{")]
        assert {x["reviewer"] for x in lines} == {"carol", "bob"}
        wrong = CliRunner().invoke(app, ["labels", "export", "--format", "xml"])
        assert wrong.exit_code != 0
    finally:
        get_settings.cache_clear()
