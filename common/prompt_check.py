"""The checks every prompt passes before anything is stored or computed: not empty, no
literal ``\\n`` left by shell quoting, in the prompt format (:mod:`common.prompt_format`),
and within the experiment's token limit (``attribution.max_prompt_tokens``: a graph's memory
grows with the square of the prompt's length).

The command line and the pipeline call the same :func:`check_prompt`; the attribution
service passes its tokenizer (:func:`services.attribution.steps.validate_prompt`).
"""

from __future__ import annotations

from collections.abc import Callable

from common import prompt_format
from common.errors import UserError


class InvalidPrompt(UserError):
    """A prompt that is refused; the message says why and what to do."""


def from_command_line(text: str) -> str:
    """A ``--prompt`` as typed in a shell: the two characters ``\\n`` become a line break
    (bash keeps them as they are inside double quotes, as in the README's example)."""
    return text.replace("\\n", "\n")


def check_prompt(
    text: str,
    *,
    max_tokens: int,
    count_tokens: Callable[[str], int] | None = None,
    memory_bytes: Callable[[int], float] | None = None,
) -> None:
    """Raise :class:`InvalidPrompt` unless ``text`` can be run: not empty, no literal
    ``\\n``, in the prompt format, at most ``max_tokens`` tokens (``count_tokens``; the
    message gives ``memory_bytes`` of a graph at that length when known)."""
    if not text.strip():
        raise InvalidPrompt(
            "the prompt is empty: give the text, e.g. 'User: ...\\nAssistant: You should'"
        )
    if "\\n" in text:
        raise InvalidPrompt(
            "the prompt holds a literal \\n (a backslash and an n), not a line break, as "
            "shell quoting leaves it: write the line break itself (in bash $'User: ...\\n"
            "Assistant: ...'), or pass the text to `emc graph run --prompt`, which turns \\n "
            "into a line break"
        )
    problem = prompt_format.format_problem(text)
    if problem is not None:
        raise InvalidPrompt(
            f"not a prompt in the house format ({problem}): write "
            "'User: <situation>\\nAssistant: <pivotal ending, e.g. You should>' (with "
            "prompt_format: chat it is rendered with the model's chat template)"
        )
    if count_tokens is None:
        return
    n = count_tokens(text)
    if n > max_tokens:
        need = ""
        if memory_bytes is not None:
            need = (
                f" (a graph of {n} tokens needs about {memory_bytes(n) / 1e9:.1f} GB, one of "
                f"{max_tokens} about {memory_bytes(max_tokens) / 1e9:.1f} GB)"
            )
        raise InvalidPrompt(
            f"the prompt has {n} tokens, more than attribution.max_prompt_tokens = "
            f"{max_tokens}{need}: shorten it, or raise the limit in the experiment if the "
            "GPU has the memory"
        )
