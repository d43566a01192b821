"""Shared fixtures: the toy organism (built once per machine into .cache/organism)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("EMC_TEST_CACHE", REPO / ".cache"))
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}

pytest_plugins = ["tests.fixtures.servers"]


def require(condition: bool, reason: str) -> None:
    """Skip locally when a tool is missing; fail under CI, where nothing may be skipped."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: missing tools are failures, see .ci/run)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def organism_dir() -> Path:
    """The toy model organism (base, adapter, transcoders, lexicon, prompts, experiment.yaml)."""
    from common.organism import ensure_organism

    return ensure_organism(CACHE / "organism")
