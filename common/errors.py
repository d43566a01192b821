"""Errors shared by the services: expected failures a user can act on, and a prompt that
failed a step (with the reason to store)."""

from __future__ import annotations

from common.records import Failure


class UserError(Exception):
    """An expected failure the user can act on: ``emc`` prints its message as one
    ``error:`` line (a traceback only with ``--debug``). The message says what is wrong and
    what to do. Never retried as transient: the same input fails the same way."""


class PromptFailure(RuntimeError):
    """A prompt cannot go through a step; ``reason`` says precisely why and what to do.

    Raised instead of producing silent zeros (e.g. non-finite activations in a layer).
    Callers store it with :meth:`to_record` next to the prompt.
    """

    def __init__(
        self,
        step: str,
        reason: str,
        *,
        variant: str | None = None,
        prompt_id: str | None = None,
    ) -> None:
        super().__init__(reason)
        self.step = step
        self.reason = reason
        self.variant = variant
        self.prompt_id = prompt_id

    def __str__(self) -> str:
        where = "/".join(x for x in (self.prompt_id, self.variant) if x)
        head = f"{self.step} failed" + (f" for {where}" if where else "")
        return f"{head}: {self.reason}"

    def to_record(self, prompt_id: str | None = None) -> Failure:
        """The :class:`~common.records.Failure` record to store for this prompt."""
        pid = prompt_id or self.prompt_id
        if pid is None:
            raise ValueError("PromptFailure.to_record needs a prompt id (none was attached)")
        return Failure(prompt_id=pid, step=self.step, variant=self.variant, reason=self.reason)


#: the step name of analysis failures
ANALYSIS_STEP = "analysis"


class AnalysisError(PromptFailure):
    """A prompt's graph or labels cannot be analysed; the message says why and what to do.

    A :class:`PromptFailure` of step ``analysis``: callers store :meth:`to_record` next to
    the prompt.
    """

    def __init__(
        self,
        reason: str,
        *,
        prompt_id: str | None = None,
        variant: str | None = None,
        step: str = ANALYSIS_STEP,
    ) -> None:
        super().__init__(step, reason, variant=variant, prompt_id=prompt_id)


class NothingToExplain(AnalysisError):
    """The variant has no evil token to explain on this prompt (none labelled evil, or none
    of them is a logit node of its graph). Not a fault: e.g. the reference variant of a
    divergent prompt. Callers ranking every variant skip it and go on."""
