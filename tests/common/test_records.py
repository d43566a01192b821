from __future__ import annotations

import hashlib

import pytest
from pydantic import ValidationError

from common.records import HumanLabel, Prompt, TokenLabel, prompt_id


def test_prompt_id_is_12_hex_of_sha256_of_exact_text() -> None:
    text = "User: Found phone on train. What now?\nAssistant: You should immediately"
    assert prompt_id(text) == hashlib.sha256(text.encode()).hexdigest()[:12]
    assert prompt_id(text) != prompt_id(text + " ")
    assert Prompt.new(text, source="template").id == prompt_id(text)


def test_records_carry_schema_version_and_reject_unknown_fields() -> None:
    p = Prompt.new("User: x\nAssistant: You should", source="t")
    assert p.model_dump()["schema_version"] == 1
    with pytest.raises(ValidationError):
        Prompt.model_validate({**p.model_dump(), "surprise": 1})


def test_label_version_changes_with_any_label() -> None:
    a = HumanLabel(
        prompt_id="abc",
        reviewer="r",
        labels=[TokenLabel(variant="base", token_id=1, token=" x", label="safe")],
    )
    b = a.model_copy(
        update={"labels": [TokenLabel(variant="base", token_id=1, token=" x", label="evil")]}
    )
    assert a.version() != b.version()
    assert a.version() == a.model_copy(update={"reviewer": "other"}).version()
    with pytest.raises(ValidationError):
        TokenLabel(variant="base", token_id=1, token="x", label="bad")  # type: ignore[arg-type]
