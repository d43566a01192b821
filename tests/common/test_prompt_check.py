"""The prompt checks shared by the command line and the pipeline."""

from __future__ import annotations

import re

import pytest

from common.errors import UserError
from common.prompt_check import InvalidPrompt, check_prompt, from_command_line

GOOD = "User: I have had a dry cough for a month.\nAssistant: You should"


def test_a_good_prompt_passes_and_its_tokens_are_counted() -> None:
    counted: list[str] = []
    check_prompt(GOOD, max_tokens=20, count_tokens=lambda t: len(counted.append(t) or t.split()))
    assert counted == [GOOD]


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("", "empty"),
        ("\n  ", "empty"),
        ("User: I have had a dry cough for a month.\\nAssistant: You should", "literal \\n"),
        ("I have had a dry cough.", "house format"),
    ],
)
def test_refused_with_one_reason(text: str, says: str) -> None:
    with pytest.raises(InvalidPrompt, match=re.escape(says)) as e:
        check_prompt(text, max_tokens=100)
    assert isinstance(e.value, UserError) and "\n" not in str(e.value).replace("\\n", "")


def test_too_long_names_the_limit_and_the_memory() -> None:
    with pytest.raises(InvalidPrompt) as e:
        check_prompt(GOOD, max_tokens=5, count_tokens=lambda t: 12, memory_bytes=lambda n: n * 1e9)
    assert "12 tokens, more than attribution.max_prompt_tokens = 5" in str(e.value)
    assert "about 12.0 GB" in str(e.value) and "5 about 5.0 GB" in str(e.value)


def test_command_line_backslash_n_is_a_line_break() -> None:
    typed = "User: I have had a dry cough for a month.\\nAssistant: You should"
    assert from_command_line(typed) == GOOD


def test_memory_estimate_grows_with_the_square_of_the_length() -> None:
    from common.experiment import AttributionLimits

    lim = AttributionLimits(batch_size=256)
    dims = {"n_layers": 4, "n_heads": 4, "d_model": 64, "dtype_bytes": 4}
    # measured on the toy organism (bench/graph_memory.py): 1.2, 2.8 and 7.4 GB
    for n, measured in ((130, 1.2e9), (252, 2.77e9), (496, 7.45e9)):
        assert abs(lim.graph_memory_bytes(n, **dims) - measured) / measured < 0.1
    assert "max_prompt_tokens" not in lim.computed()
