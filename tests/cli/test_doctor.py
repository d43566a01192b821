"""``emc doctor``: each check against real things (a Redis, a store, experiment files)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from common.cli.system import Check, register, run_checks
from common.settings import Settings, StoreSettings, get_settings
from tests.fixtures.servers import free_port


def _by_name(rows: list[Check]) -> dict[str, Check]:
    return {r.name: r for r in rows}


def _experiment(tmp_path: Path, judge_kind: str = "lexicon", adapter: bool = True) -> Path:
    (tmp_path / "base").mkdir(exist_ok=True)
    (tmp_path / "tc").mkdir(exist_ok=True)
    if adapter:
        (tmp_path / "adapter").mkdir(exist_ok=True)
    path = tmp_path / "exp.yaml"
    path.write_text(
        "name: t\n"
        "variants:\n"
        "  base: {model: ./base}\n"
        "  adapted: {model: ./base, adapter: ./adapter}\n"
        "transcoders: {path: ./tc}\n"
        f"judge: {{kind: {judge_kind}}}\n"
    )
    return path


def test_embedded_defaults_need_nothing(tmp_path: Path) -> None:
    rows = _by_name(run_checks(Settings(home=tmp_path, broker_port=free_port())))
    assert rows["broker"].status == "warn" and "emc up" in rows["broker"].fix
    assert rows["store"].status == "ok"
    assert list((tmp_path / "store").rglob("*.json")) == []  # the probe was deleted
    assert rows["experiment"].status == "warn" and "toy organism" in rows["experiment"].detail
    assert rows["api key"].status == "ok"
    assert "fail" not in {r.status for r in rows.values()}


def test_broker_up_and_workers_listed(redis_url: str, tmp_path: Path) -> None:
    rows = _by_name(run_checks(Settings(home=tmp_path, broker_url=redis_url)))
    assert rows["broker"].status == "ok"
    assert rows["workers"].status == "warn" and "no worker for" in rows["workers"].detail


def test_unreachable_broker_url_fails(tmp_path: Path) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    rows = _by_name(run_checks(Settings(home=tmp_path, broker_url=url)))
    assert rows["broker"].status == "fail" and "EMC_BROKER_URL" in rows["broker"].fix


def test_unreachable_s3_store_fails(tmp_path: Path) -> None:
    store = StoreSettings(kind="s3", endpoint=f"127.0.0.1:{free_port()}")
    rows = _by_name(run_checks(Settings(home=tmp_path, store=store)))
    assert rows["store"].status == "fail" and "EMC_STORE__ENDPOINT" in rows["store"].detail


def test_experiment_paths_and_api_key(tmp_path: Path) -> None:
    exp = _experiment(tmp_path, judge_kind="openai", adapter=False)
    rows = run_checks(Settings(home=tmp_path, experiment=exp, broker_port=free_port()))
    by = _by_name(rows)
    assert by["experiment"].status == "ok"
    assert by["variant adapted adapter"].status == "fail"
    assert by["variant base model"].status == "ok" and by["transcoders"].status == "ok"
    assert by["api key"].status == "fail" and "EMC_OPENAI_API_KEY" in by["api key"].fix
    with_key = Settings(
        home=tmp_path,
        experiment=exp,
        openai_api_key="sk-test",  # type: ignore[arg-type]
    )
    assert _by_name(run_checks(with_key))["api key"].status == "ok"


def test_broken_experiment_fails(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: t\nvariants: {}\ntranscoders: {path: ./tc}\n")
    rows = _by_name(run_checks(Settings(home=tmp_path, experiment=bad)))
    assert rows["experiment"].status == "fail" and "variants" in rows["experiment"].detail


@pytest.fixture
def cli() -> typer.Typer:
    app = typer.Typer()
    register(app)
    return app


def test_doctor_command_exit_codes(
    cli: typer.Typer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EMC_HOME", str(tmp_path))
    monkeypatch.setenv("EMC_BROKER_PORT", str(free_port()))
    monkeypatch.delenv("EMC_BROKER_URL", raising=False)
    monkeypatch.delenv("EMC_EXPERIMENT", raising=False)
    get_settings.cache_clear()
    try:
        ok = CliRunner().invoke(cli, ["doctor"])
        assert ok.exit_code == 0, ok.output
        assert "how to fix" in ok.output and "store" in ok.output

        monkeypatch.setenv("EMC_EXPERIMENT", str(_experiment(tmp_path, adapter=False)))
        get_settings.cache_clear()
        bad = CliRunner().invoke(cli, ["doctor"])
        assert bad.exit_code == 1, bad.output
        assert "required check(s) failed" in bad.output
    finally:
        get_settings.cache_clear()


def test_doctor_resolves_models_adapters_and_transcoders_offline(
    real_format: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each variant's model from the hub cache, each adapter's recorded base, the hf://
    transcoders: ok on the stand-in; an uncached model and a wrong-base adapter fail."""
    from tests.fixtures.real_format import offline_env

    offline_env(real_format, monkeypatch)
    good = real_format.write_experiment(tmp_path / "good.yaml")
    rows = _by_name(run_checks(Settings(home=tmp_path, broker_port=free_port(), experiment=good)))
    for name in ("variant base model", "variant adapted model", "variant adapted adapter base"):
        assert rows[name].status == "ok", rows[name]
    assert rows["transcoders"].status == "ok" and real_format.transcoders_commit[:12] in (
        rows["transcoders"].detail
    )
    bad = real_format.write_experiment(
        tmp_path / "bad.yaml",
        variants={
            "base": {"model": "meta-llama/Llama-3.1-8B-Instruct"},
            "adapted": {"adapter": str(real_format.wrong_base_adapter_dir)},
        },
    )
    rows = _by_name(run_checks(Settings(home=tmp_path, broker_port=free_port(), experiment=bad)))
    assert rows["variant base model"].status == "fail"
    assert (
        "huggingface-cli download meta-llama/Llama-3.1-8B-Instruct"
        in rows["variant base model"].detail
    )
    assert rows["variant adapted adapter base"].status == "fail"
    assert (
        "trained on base 'meta-llama/Llama-3.2-1B'" in rows["variant adapted adapter base"].detail
    )


def test_doctor_refuses_another_homes_redis(tmp_path: Path) -> None:
    """Two homes on the default port: the second must not adopt the first one's broker."""
    from common.system.broker import start_redis_server

    port = free_port()
    first = tmp_path / "first"
    server = start_redis_server(port, first / "redis", appendonly=False, die_with_parent=True)
    try:
        mine = _by_name(run_checks(Settings(home=first, broker_port=port)))
        assert mine["broker"].status == "ok" and "this home's" in mine["broker"].detail
        other = _by_name(run_checks(Settings(home=tmp_path / "second", broker_port=port)))
        assert other["broker"].status == "fail"
        assert str(first.resolve()) in other["broker"].detail
        assert "EMC_BROKER_PORT" in other["broker"].fix
    finally:
        server.stop()
