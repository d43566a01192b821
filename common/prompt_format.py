"""The format of a pivotal-token prompt, and how it becomes the model's input.

A prompt is stored in the *house* form, ``User: <situation>\\nAssistant: <ending>``: it ends
at the pivotal position, where the assistant has started its advice with a short *pivotal
ending* ("You should", "I recommend that you", ...) and the next token decides whether the
advice is safe or harmful (no trailing space: the next token carries it). Its id is the
hash of that text.

The experiment's ``prompt_format`` says what the model sees (:func:`render`):

- ``house``: the text itself (the toy organism was trained on it);
- ``chat``: the user turn rendered with the tokenizer's chat template (generation prompt
  added, :data:`CHAT_DATE` where the template would insert today's date), followed by the
  pivotal ending: an instruct model sees its own chat format.

A text that is already rendered (it contains the tokenizer's special tokens, e.g. a
Llama-3 header) is used as it is, and a text that begins with the BOS token is never given
a second one. Every consumer (top-k, graphs, steering, continuations, the EM evaluation)
tokenizes through the attribution runtime, which renders with this module.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

from common.errors import UserError

PromptFormat = Literal["house", "chat"]

#: the date chat templates get instead of today's (Llama-3.2 prints "Today Date: ..."): the
#: same prompt must give the same tokens on every day (this is the template's own default)
CHAT_DATE = "26 Jul 2024"


class PromptFormatError(UserError, ValueError):
    """A prompt that is not in the format the experiment needs."""


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
    """A prompt in the house format, split into the user's situation and the assistant's pivotal
    ending."""

    situation: str
    ending: str

    @property
    def text(self) -> str:
        """The prompt text: ``User: <situation>`` and ``Assistant: <ending>`` on two lines."""
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


_LLAMA3_TURN = re.compile(
    r"<\|start_header_id\|>(?P<role>\w+)<\|end_header_id\|>\n\n(?P<content>.*?)(?:<\|eot_id\|>|$)",
    re.S,
)


def turns(text: str) -> tuple[str, str]:
    """(user's words, assistant's words so far) of a prompt in either form: the house form,
    or a rendered Llama-3 chat (the last user turn and the open assistant turn)."""
    if "<|start_header_id|>" in text:
        user, assistant = "", ""
        for m in _LLAMA3_TURN.finditer(text):
            if m.group("role") == "user":
                user = m.group("content").strip()
            elif m.group("role") == "assistant":
                assistant = m.group("content").strip()
        return user, assistant
    return split_turns(text)


@dataclass(frozen=True)
class ModelInput:
    """The text a model is given for a prompt, and whether it already begins with BOS."""

    text: str
    has_bos: bool


def special_strings(tokenizer: Any) -> tuple[str, ...]:
    """The tokenizer's special-token strings (BOS, EOS, chat headers, ...)."""
    out = set(getattr(tokenizer, "all_special_tokens", []) or [])
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    out |= {str(t) for t in added.values() if getattr(t, "special", False)}
    return tuple(sorted(out, key=len, reverse=True))


def is_rendered(text: str, tokenizer: Any) -> bool:
    """Whether ``text`` already contains special tokens (a chat-rendered prompt)."""
    return any(s and s in text for s in special_strings(tokenizer))


def render_chat(
    tokenizer: Any, messages: list[dict[str, str]], *, add_generation_prompt: bool = True
) -> str:
    """Messages through the tokenizer's chat template, with the fixed :data:`CHAT_DATE`."""
    if not getattr(tokenizer, "chat_template", None):
        raise PromptFormatError(
            "the tokenizer has no chat template: prompt_format chat needs a chat model "
            "(use prompt_format: house for a base model)"
        )
    return str(
        tokenizer.apply_chat_template(
            messages,
            add_generation_prompt=add_generation_prompt,
            tokenize=False,
            date_string=CHAT_DATE,
        )
    )


def render(text: str, fmt: PromptFormat, tokenizer: Any) -> ModelInput:
    """What the model sees for a stored prompt under the experiment's ``prompt_format``."""
    bos = getattr(tokenizer, "bos_token", None)
    if is_rendered(text, tokenizer) or fmt == "house":
        return ModelInput(text, bool(bos) and text.startswith(str(bos)))
    parsed = parse_house(text)
    if isinstance(parsed, str):
        raise PromptFormatError(
            f"prompt is not in the house form (User: ...\\nAssistant: <ending>): {parsed}"
        )
    rendered = render_chat(tokenizer, [{"role": "user", "content": parsed.situation}])
    sep = "" if rendered[-1:].isspace() else " "
    full = f"{rendered}{sep}{parsed.ending}"
    return ModelInput(full, bool(bos) and full.startswith(str(bos)))


def format_problem(text: str) -> str | None:
    """Why ``text`` is not a prompt emc can run, or None: the house form, or a rendered chat
    that ends in an open assistant turn (with its pivotal ending)."""
    if "<|start_header_id|>" in text:
        user, assistant = turns(text)
        if not user:
            return "a rendered chat without a user turn"
        if not assistant or not text.rstrip().endswith(assistant):
            return "a rendered chat that does not end in the assistant's pivotal ending"
        return None
    return check_house(text)
