from __future__ import annotations

import pytest
from pydantic import ValidationError

from common.settings import Settings


def test_env_prefix_and_nested(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMC_STORE__KIND", "s3")
    monkeypatch.setenv("EMC_STORE__ENDPOINT", "127.0.0.1:9000")
    monkeypatch.setenv("EMC_STORE__SECRET_KEY", "hunter2")
    monkeypatch.setenv("EMC_BROKER_URL", "redis://127.0.0.1:1/0")
    s = Settings()
    assert s.store.kind == "s3" and s.store.endpoint == "127.0.0.1:9000"
    assert s.broker_url == "redis://127.0.0.1:1/0"
    assert "hunter2" not in repr(s)  # secrets never printed


def test_s3_without_endpoint_says_what_to_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMC_STORE__KIND", "s3")
    with pytest.raises(ValidationError, match="EMC_STORE__ENDPOINT"):
        Settings()
