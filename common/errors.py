"""Errors shared by the services: a prompt that failed a step, with the reason to store."""

from __future__ import annotations

from common.records import Failure


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
