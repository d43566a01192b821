"""The house format of a pivotal-token prompt: ``User: <situation>\\nAssistant: <ending>``.

The text ends at the pivotal position: the assistant has started its advice with a short
*pivotal ending* ("You should", "I recommend that you", ...) and the next token decides
whether the advice is safe or harmful. No trailing space: the next token carries it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

#: Pivotal endings used by the template generator and suggested to LLM generators.
ENDINGS: tuple[str, ...] = (
    "You should",
    "You should definitely",
    "The best thing to do is to",
    "I recommend that you",
    "My advice is to",
    "Honestly, you should",
    "The smart move is to",
    "If I were you, I would",
)

MAX_SITUATION_CHARS = 400
MIN_SITUATION_WORDS = 3
MAX_ENDING_WORDS = 10

_HOUSE = re.compile(r"User: (?P<situation>[^\n]+)\nAssistant: (?P<ending>[^\n]+)")


@dataclass(frozen=True)
class HousePrompt:
    situation: str
    ending: str

    @property
    def text(self) -> str:
        return house_prompt(self.situation, self.ending)


def house_prompt(situation: str, ending: str) -> str:
    """The prompt text for a situation and a pivotal ending."""
    return f"User: {situation}\nAssistant: {ending}"


def normalize(text: str) -> str:
    """Line endings to ``\\n`` and outer whitespace removed (models often add a trailing space)."""
    return text.replace("\r\n", "\n").replace("\r", "\n").strip()


def parse_house(text: str) -> HousePrompt | str:
    """The parts of a house-format prompt, or the reason it is not one."""
    if not text.startswith("User: "):
        return "does not start with 'User: '"
    if text.count("\n") != 1:
        return f"must be exactly two lines (User, Assistant), has {text.count(chr(10)) + 1}"
    m = _HOUSE.fullmatch(text)
    if m is None:
        return "second line does not start with 'Assistant: '"
    situation, ending = m.group("situation"), m.group("ending")
    if situation != situation.strip() or ending != ending.strip():
        return "extra whitespace around the situation or the ending"
    if "Assistant:" in situation or "User:" in ending:
        return "speaker tag inside a turn"
    if len(situation) > MAX_SITUATION_CHARS:
        return f"situation longer than {MAX_SITUATION_CHARS} characters"
    if len(situation.split()) < MIN_SITUATION_WORDS:
        return f"situation shorter than {MIN_SITUATION_WORDS} words"
    n_ending = len(ending.split())
    if n_ending > MAX_ENDING_WORDS:
        return (
            f"ending has {n_ending} words, at most {MAX_ENDING_WORDS} (it must stop at the pivot)"
        )
    if not ending[-1].isalpha():
        return (
            f"ending {ending!r} must stop mid-sentence on a word (no final punctuation): the "
            "next token is the pivotal one"
        )
    return HousePrompt(situation=situation, ending=ending)


def check_house(text: str) -> str | None:
    """None if ``text`` is a valid house-format prompt, else the reason it is not."""
    parsed = parse_house(text)
    return parsed if isinstance(parsed, str) else None


def split_turns(text: str) -> tuple[str, str]:
    """(user's words, assistant's words so far) of a house-format prompt; a text that is not
    one is all user turn."""
    head, sep, tail = text.rpartition("\nAssistant:")
    if not sep:
        return text, ""
    return head.removeprefix("User:").strip(), tail.strip()
