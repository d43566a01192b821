"""Why an analysis step could not produce a result for a prompt (never a silent zero)."""

from __future__ import annotations

from common.errors import PromptFailure

STEP = "analysis"


class AnalysisError(PromptFailure):
    """A prompt's graph or labels cannot be analysed; the message says why and what to do.

    A :class:`~common.errors.PromptFailure` of step ``analysis``: callers store
    :meth:`to_record` next to the prompt.
    """

    def __init__(
        self,
        reason: str,
        *,
        prompt_id: str | None = None,
        variant: str | None = None,
        step: str = STEP,
    ) -> None:
        super().__init__(step, reason, variant=variant, prompt_id=prompt_id)


class NothingToExplain(AnalysisError):
    """The variant has no evil token to explain on this prompt (none labelled evil, or none
    of them is a logit node of its graph). Not a fault: e.g. the reference variant of a
    divergent prompt. Callers ranking every variant skip it and go on."""
