"""Shared test set-up: fixtures registered once (``pytest_plugins``), the toy organism (built
once per machine into .cache/organism), and the automatic ``slow`` marker.

Layout mirrors the code: ``tests/common``, ``tests/<service>`` and ``tests/system`` (real
processes end to end); fixtures live in ``tests/fixtures``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("EMC_TEST_CACHE", REPO / ".cache"))
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}

pytest_plugins = [
    "tests.fixtures.servers",
    "tests.fixtures.models",
    "tests.fixtures.toy",
    "tests.fixtures.openai_server",
    "tests.fixtures.stores",
    "tests.fixtures.real_format",
]

#: fixtures that build the toy organism or start processes: a test using one is ``slow``
SLOW_FIXTURES = frozenset(
    {"organism_dir", "env_rt", "toy_rt", "celery_worker_factory", "redis_server_process"}
)


def require(condition: bool, reason: str) -> None:
    """Skip locally when a tool is missing; fail under CI, where nothing may be skipped."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: missing tools are failures, see .ci/run)")
    pytest.skip(reason)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark ``slow`` every test that (directly or through its fixtures) needs the organism or
    real worker processes, so ``make test-fast`` is honestly fast."""
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def organism_dir() -> Path:
    """The toy model organism (base, adapter, transcoders, lexicon, prompts, experiment.yaml)."""
    from common.organism import ensure_organism

    return ensure_organism(CACHE / "organism")


@pytest.fixture(autouse=True)
def fresh_settings() -> Iterator[None]:
    """Every test starts and ends with no cached settings or context: a test that changes
    EMC_* variables clears the caches again after changing them (``get_settings.cache_clear``)."""
    from common.context import get_context
    from common.settings import get_settings

    get_settings.cache_clear()
    get_context.cache_clear()
    yield
    get_settings.cache_clear()
    get_context.cache_clear()
