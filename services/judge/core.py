"""Judge contract: a verdict (evil / safe / unsure + reason) for every top-k token of every variant.

A judge decides per *token of a prompt*, not per variant: the next token's meaning given
the same text does not depend on which model proposed it. Judges therefore decide once
for the union of the variants' top-k tokens and then write one
:class:`common.records.Verdict` per variant; the same token can never be evil for one
variant and safe for another (which would fake a divergence).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

from common.errors import UserError
from common.llm import Outcome, bounded_map
from common.records import Label, Prompt, TokenProb, TokenVerdict, TopKLogits, Verdict

log = logging.getLogger(__name__)

#: (label, reason) the judge decided for one token.
Decision = tuple[Label, str]
#: What a judge receives per prompt: the prompt and ``{variant: top-k logits}``.
JudgeItem = tuple[Prompt, Mapping[str, TopKLogits]]

MAX_REASON_CHARS = 300


class JudgeError(UserError, RuntimeError):
    """A judge cannot be built or run; the message says what to fix."""


class Judge(Protocol):
    """Labels every top-k token of every variant of a prompt."""

    @property
    def name(self) -> str:
        """The judge id used in artifact keys (``experiment.judge.judge_id``)."""
        ...

    def judge(self, prompt: Prompt, logits: Mapping[str, TopKLogits]) -> dict[str, Verdict]:
        """``{variant: Verdict}`` for every variant in ``logits``."""
        ...

    def judge_many(self, items: Sequence[JudgeItem]) -> list[Outcome[dict[str, Verdict]]]:
        """Judge several prompts (concurrently where the judge allows), one outcome each."""
        ...


def candidate_tokens(prompt: Prompt, logits: Mapping[str, TopKLogits]) -> list[TokenProb]:
    """The union of the variants' top-k tokens (by token id), in first-seen order."""
    if not logits:
        raise JudgeError(f"prompt {prompt.id}: no logits to judge (compute top-k logits first)")
    seen: dict[int, TokenProb] = {}
    for variant in sorted(logits):
        top = logits[variant]
        if top.prompt_id != prompt.id:
            raise JudgeError(
                f"logits of variant {variant} belong to prompt {top.prompt_id}, not {prompt.id}"
            )
        for t in top.tokens:
            seen.setdefault(t.token_id, t)
    return list(seen.values())


def build_verdicts(
    judge: str,
    prompt: Prompt,
    logits: Mapping[str, TopKLogits],
    decisions: Mapping[int, Decision],
    *,
    unusable: str | None = None,
) -> dict[str, Verdict]:
    """One Verdict per variant from per-token-id decisions (a token without one is an error);
    ``unusable``: why the judge's whole answer could not be used."""
    out: dict[str, Verdict] = {}
    for variant, top in logits.items():
        verdicts = []
        for t in top.tokens:
            if t.token_id not in decisions:
                raise JudgeError(f"judge {judge} left token {t.token!r} ({t.token_id}) undecided")
            label, reason = decisions[t.token_id]
            verdicts.append(
                TokenVerdict(
                    token_id=t.token_id,
                    token=t.token,
                    label=label,
                    reason=reason[:MAX_REASON_CHARS],
                )
            )
        out[variant] = Verdict(
            prompt_id=prompt.id,
            variant=variant,
            judge=judge,
            fingerprint=top.fingerprint,
            verdicts=verdicts,
            unusable=unusable,
        )
    return out


def judge_each(
    fn: Callable[[Prompt, Mapping[str, TopKLogits]], dict[str, Verdict]],
    items: Sequence[JudgeItem],
    concurrency: int,
) -> list[Outcome[dict[str, Verdict]]]:
    """Run a per-prompt judge function over many prompts, ``concurrency`` at a time."""
    return bounded_map(lambda item: fn(item[0], item[1]), items, concurrency)
