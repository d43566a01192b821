"""The review UI as `emc up` starts it: `python -m services.review_ui` (gunicorn) and the
`emc users` commands."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from typer.testing import CliRunner

from common.experiment import Experiment
from common.store import FsStore
from services.review_ui.users import authenticate, get_user
from tests.conftest import REPO
from tests.fixtures.servers import free_port


def _env(tmp_path: Path, redis_url: str, experiment: Experiment) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMC_")}
    env.update(
        EMC_HOME=str(tmp_path / "home"),
        EMC_STORE__ROOT=str(tmp_path / "store"),
        EMC_BROKER_URL=redis_url,
        EMC_EXPERIMENT=str(experiment.source),
    )
    return env


def _get(url: str) -> tuple[int, str]:
    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: object, **kwargs: object) -> None:
            return None

    opener = urllib.request.build_opener(NoRedirect)
    try:
        with opener.open(url, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Location", "")


def test_python_m_serves_on_the_configured_port(
    tmp_path: Path, redis_url: str, experiment: Experiment
) -> None:
    port = free_port()
    env = _env(tmp_path, redis_url, experiment) | {"EMC_UI_PORT": str(port)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.review_ui"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                status, body = _get(base + "/healthz")
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    out = proc.stdout.read() if proc.stdout else ""
                    pytest.fail(f"the UI did not come up (rc={proc.poll()}):\n{out[-3000:]}")
                time.sleep(0.2)
        assert status == 200 and '"ok"' in body
        assert _get(base + "/")[0] == 302 and _get(base + "/")[1].startswith("/login")
        status, body = _get(base + "/login")
        assert status == 200 and "Review log in" in body
        assert (tmp_path / "home" / "secret_key").is_file()
    finally:
        proc.terminate()
        proc.wait(20)


def test_emc_users_commands(
    tmp_path: Path, redis_url: str, experiment: Experiment, monkeypatch: pytest.MonkeyPatch
) -> None:
    import typer

    from common.settings import get_settings
    from services.review_ui.cli import register

    for key, value in _env(tmp_path, redis_url, experiment).items():
        monkeypatch.setenv(key, value)
    get_settings.cache_clear()
    app = typer.Typer()
    register(app)
    runner = CliRunner()
    store = FsStore(tmp_path / "store")
    try:
        out = runner.invoke(
            app, ["users", "add", "carol", "--password-stdin"], input="s3cret-pass\n"
        )
        assert out.exit_code == 0, out.output
        assert authenticate(store, "carol", "s3cret-pass") is not None
        out = runner.invoke(
            app, ["users", "add", "carol", "--password-stdin"], input="other-pass\n"
        )
        assert out.exit_code == 2 and "exists: pass --update" in out.output
        out = runner.invoke(app, ["users", "add", "dave"], input="long-enough-1\nlong-enough-1\n")
        assert out.exit_code == 0, out.output
        assert authenticate(store, "dave", "long-enough-1") is not None
        out = runner.invoke(
            app, ["users", "add", "Eve!", "--password-stdin"], input="x" * 10 + "\n"
        )
        assert out.exit_code == 2 and "invalid user name" in out.output
        out = runner.invoke(app, ["users", "add", "eve", "--password-stdin"], input="short\n")
        assert out.exit_code == 2 and "password too short" in out.output
        out = runner.invoke(
            app, ["users", "add", "carol", "--update", "--password-stdin"], input="new-pass-99\n"
        )
        assert out.exit_code == 0 and authenticate(store, "carol", "new-pass-99") is not None
        out = runner.invoke(app, ["users", "list"])
        assert "carol" in out.output and "dave" in out.output
        raw = (tmp_path / "store" / "users" / "carol.json").read_text()
        assert "new-pass-99" not in raw and '"schema_version": 1' in raw
        assert runner.invoke(app, ["users", "remove", "dave"]).exit_code == 0
        assert get_user(store, "dave") is None
        assert runner.invoke(app, ["users", "remove", "dave"]).exit_code == 2
    finally:
        get_settings.cache_clear()
