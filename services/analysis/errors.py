"""Why an analysis step could not produce a result for a prompt (never a silent zero)."""

from __future__ import annotations


class AnalysisError(RuntimeError):
    """A prompt's graph or labels cannot be analysed; the message says why and what to do.

    ``prompt_id``/``variant`` are set when known so the caller can store a
    :class:`common.records.Failure` for that prompt and step.
    """

    def __init__(self, reason: str, *, prompt_id: str | None = None, variant: str | None = None):
        super().__init__(reason)
        self.reason = reason
        self.prompt_id = prompt_id
        self.variant = variant

    def __str__(self) -> str:
        where = "/".join(x for x in (self.prompt_id, self.variant) if x)
        return f"{where}: {self.reason}" if where else self.reason
