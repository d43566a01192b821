"""Adjudication of overlap prompts whose two reviewers disagree: what the view shows (both
reviews side by side with notes and the judge's reasons) and how a decision is checked.

The decision is saved like any label (``role="adjudication"``, naming the two reviews it
resolves), so it becomes the current label and the history keeps all three.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from common.labels import Consensus, disputed_tokens, labeled_pids, prompt_consensus
from common.records import HumanLabel, Label
from common.store import ObjectStore
from services.review_ui.review import InvalidLabel, PromptView, TokenRow, parse_submission


@dataclass(frozen=True)
class Dispute:
    """An overlap prompt whose two reviews disagree, waiting for an adjudicator."""

    pid: str
    a: tuple[str, HumanLabel]
    b: tuple[str, HumanLabel]
    tokens: list[tuple[str, int]]  # (variant, token id) labeled differently

    @property
    def bad_differs(self) -> bool:
        """Whether the two reviewers disagree on calling the prompt bad."""
        return self.a[1].bad_prompt != self.b[1].bad_prompt

    @property
    def labeled_at(self) -> datetime:
        """When the later of the two reviews was saved."""
        return max(self.a[1].created_at, self.b[1].created_at)


def dispute_of(pid: str, agreed: Consensus) -> Dispute | None:
    """The dispute of a prompt in state ``disputed``, else None."""
    if agreed.state != "disputed" or agreed.pair is None:
        return None
    a, b = agreed.pair
    return Dispute(pid, a, b, disputed_tokens(a[1], b[1]))


def disputes(store: ObjectStore, exp: str) -> Iterator[Dispute]:
    """Every disputed prompt of the experiment, by prompt id (read from the store)."""
    for pid in labeled_pids(store, exp):
        found = dispute_of(pid, prompt_consensus(store, exp, pid))
        if found is not None:
            yield found


@dataclass
class AdjudicationRow:
    """One top-k token (with the judge's verdict) and both reviewers' labels of it."""

    row: TokenRow
    a: Label | None
    b: Label | None

    @property
    def disputed(self) -> bool:
        """Whether the two reviewers labeled this token differently."""
        return self.a != self.b

    def to_json(self) -> dict[str, Any]:
        """The row as the adjudication page's script reads it."""
        return {
            "i": self.row.index,
            "variant": self.row.variant,
            "token_id": self.row.token_id,
            "a": self.a,
            "b": self.b,
            "decided": None if self.disputed else self.a,
        }


def adjudication_rows(view: PromptView, dispute: Dispute) -> list[AdjudicationRow]:
    """The prompt's tokens in page order, each with label A, label B and the judge's."""
    a, b = dispute.a[1], dispute.b[1]
    return [
        AdjudicationRow(r, a.label_of(r.variant, r.token_id), b.label_of(r.variant, r.token_id))
        for r in view.rows
    ]


def parse_decision(view: PromptView, payload: Any, adjudicator: str) -> HumanLabel:
    """Check an adjudicator's decision; raises InvalidLabel.

    The decision must cover every token (or flag the prompt bad), like any label, and name
    the two reviews it resolves as the page showed them (``resolves``): if either changed
    meanwhile the adjudicator is asked to reload.
    """
    dispute = dispute_of(view.prompt.id, view.consensus)
    if dispute is None:
        raise InvalidLabel(
            f"prompt {view.prompt.id} is not disputed (it is {view.consensus.state}): "
            "nothing to adjudicate"
        )
    keys = [dispute.a[0], dispute.b[0]]
    seen = payload.get("resolves") if isinstance(payload, dict) else None
    if seen != keys:
        raise InvalidLabel("the two reviews changed since the page was opened: reload it")
    label = parse_submission(view, payload, reviewer=adjudicator)
    return label.model_copy(update={"role": "adjudication", "resolves": keys, "overlap": True})
