"""What every view needs: store, review queue, experiment, task sender (one per app)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from flask import current_app

from common.claims import Claims
from common.experiment import Experiment
from common.review_queue import ReviewQueue
from common.settings import Settings
from common.store import ObjectStore
from services.review_ui.tasks import TaskSender
from services.review_ui.users import Reviewer

EXTENSION = "emc_review"


@dataclass
class ReviewContext:
    """What every view needs, one per app: settings, store, review queue, experiment and
    fingerprint, task sender, and the app's small caches."""

    settings: Settings
    store: ObjectStore
    queue: ReviewQueue
    experiment: Experiment
    fingerprint: str
    tasks: TaskSender
    # prompt texts never change for a given id: cache them for the polled queue list
    prompt_cache: dict[str, Any] = field(default_factory=dict)
    user_cache: dict[tuple[str, str], tuple[float, Reviewer | None]] = field(default_factory=dict)
    #: session id -> (checked at, valid): a logout elsewhere is seen within SESSION_CACHE_S
    session_cache: dict[str, tuple[float, bool]] = field(default_factory=dict)
    last_reconcile: float = 0.0  # monotonic time of the last look for pending labels
    login_limits: Any = None  # services.review_ui.login_limits.LoginLimits, made on first login
    guide_cache: dict[str, Any] = field(default_factory=dict)  # path -> (mtime, Guide)
    _claims: Claims | None = None

    @property
    def claims(self) -> Claims:
        """Claims on prompts (leases in the review queue's Redis)."""
        if self._claims is None:
            self._claims = Claims(self.queue.redis, self.exp, self.experiment.review.claim_s)
        return self._claims

    @property
    def exp(self) -> str:
        """The experiment's name, as store keys and the review queue use it."""
        return self.experiment.name

    @property
    def judge_id(self) -> str:
        """The id of the experiment's judge, whose verdicts the UI shows."""
        return self.experiment.judge.judge_id


def ctx() -> ReviewContext:
    """The current app's context."""
    found: ReviewContext = current_app.extensions[EXTENSION]
    return found
