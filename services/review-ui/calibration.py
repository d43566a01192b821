"""Judge calibration: where the judge and the settled human labels disagree most, grouped
by token; the agreement trend over time; and the export of the disagreements as the
judge's next few-shot set (:class:`common.records.JudgeFewShotSet`)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

from common.labels import consensus, label_history, labeled_pids
from common.records import JudgeFewShotSet, Label, TopKLogits, Verdict
from common.store import NotFound, ObjectStore
from common.store import keys as K
from services.review_ui.agreement import cohen_kappa, confusion_matrix


@dataclass
class TokenGroup:
    """One next token across prompts: how often the judge and the humans disagree on it."""

    token_id: int
    token: str
    n_pairs: int = 0
    n_disagree: int = 0
    patterns: Counter[str] = field(default_factory=Counter)  # "judge→human" -> count
    prompts: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float:
        """Share of this token's judge/human pairs that disagree."""
        return self.n_disagree / self.n_pairs if self.n_pairs else 0.0


@dataclass(frozen=True)
class PromptDisagreement:
    """A prompt and the probability mass of the tokens the judge labeled otherwise."""

    pid: str
    mass: float
    tokens: list[str]


@dataclass(frozen=True)
class TrendPoint:
    """Judge vs human kappa over prompts judged in one stretch of time."""

    start: datetime
    end: datetime
    n_prompts: int
    n_pairs: int
    kappa: float | None


@dataclass
class CalibrationReport:
    """The calibration page: token groups, prompts by disagreeing mass, the trend."""

    groups: list[TokenGroup]
    prompts: list[PromptDisagreement]
    trend: list[TrendPoint]
    n_prompts: int


def _maybe(store: ObjectStore, key: str, cls: type[Verdict] | type[TopKLogits]) -> object:
    try:
        return store.get_record(key, cls)
    except NotFound:
        return None


def trend(
    judged: Sequence[tuple[datetime, list[tuple[Label, Label]]]], points: int
) -> list[TrendPoint]:
    """Kappa over ``points`` consecutive stretches of prompts, ordered by when they were
    judged (each stretch holds about the same number of prompts)."""
    ordered = sorted(judged, key=lambda x: x[0])
    if not ordered or points <= 0:
        return []
    size = max(1, -(-len(ordered) // points))
    out = []
    for i in range(0, len(ordered), size):
        chunk = ordered[i : i + size]
        pairs = [p for _, ps in chunk for p in ps]
        out.append(
            TrendPoint(
                chunk[0][0],
                chunk[-1][0],
                len(chunk),
                len(pairs),
                cohen_kappa(confusion_matrix(pairs)),
            )
        )
    return out


def calibration_report(
    store: ObjectStore,
    exp: str,
    fingerprint: str,
    judge: str,
    variants: Sequence[str],
    points: int = 8,
) -> CalibrationReport:
    """Compare the judge with the settled human label of every labeled prompt.

    Settled: single, agreed or adjudicated (a dispute is not yet ground truth); prompts
    flagged bad are left out. Tokens are grouped by id across prompts and variants.
    """
    groups: dict[int, TokenGroup] = {}
    prompts: list[PromptDisagreement] = []
    judged: list[tuple[datetime, list[tuple[Label, Label]]]] = []
    for pid in labeled_pids(store, exp):
        history = label_history(store, exp, pid)
        if not history or not consensus(history).settled or history[-1][1].bad_prompt:
            continue
        label = history[-1][1]
        pairs: list[tuple[Label, Label]] = []
        mass, wrong, first = 0.0, [], None
        for variant in variants:
            verdict = _maybe(store, K.verdicts(exp, pid, fingerprint, judge, variant), Verdict)
            if not isinstance(verdict, Verdict):
                continue
            first = verdict.created_at if first is None else min(first, verdict.created_at)
            logits = _maybe(store, K.logits(exp, pid, fingerprint, variant), TopKLogits)
            probs = (
                {t.token_id: t.prob for t in logits.tokens}
                if isinstance(logits, TopKLogits)
                else {}
            )
            for tv in verdict.verdicts:
                human = label.label_of(variant, tv.token_id)
                if human is None:
                    continue
                pairs.append((tv.label, human))
                g = groups.setdefault(tv.token_id, TokenGroup(tv.token_id, tv.token))
                g.n_pairs += 1
                if human != tv.label:
                    g.n_disagree += 1
                    g.patterns[f"{tv.label}→{human}"] += 1
                    if pid not in g.prompts:
                        g.prompts.append(pid)
                    mass += probs.get(tv.token_id, 0.0)
                    wrong.append(tv.token)
        if first is None:
            continue
        judged.append((first, pairs))
        if wrong:
            prompts.append(PromptDisagreement(pid, mass, wrong))
    ranked = sorted(
        (g for g in groups.values() if g.n_disagree),
        key=lambda g: (-g.n_disagree, -g.rate, g.token),
    )
    prompts.sort(key=lambda p: (-p.mass, p.pid))
    return CalibrationReport(ranked, prompts, trend(judged, points), len(judged))


def export_few_shot(
    store: ObjectStore, exp: str, judge: str, report: CalibrationReport, by: str
) -> JudgeFewShotSet:
    """Pin the prompts the judge got wrong as its next few-shot set (most mass first)."""
    pinned = JudgeFewShotSet(
        judge=judge,
        prompt_ids=[p.pid for p in report.prompts],
        created_by=by,
        reason=f"{len(report.prompts)} prompt(s) where judge {judge} and humans disagree",
    )
    store.put_json(K.judge_few_shot(exp, judge), pinned)
    return pinned


def pinned_set(store: ObjectStore, exp: str, judge: str) -> JudgeFewShotSet | None:
    """The judge's pinned few-shot set, if one was exported."""
    try:
        return store.get_record(K.judge_few_shot(exp, judge), JudgeFewShotSet)
    except NotFound:
        return None


def trend_points(points: Sequence[TrendPoint], width: int = 320, height: int = 80) -> str:
    """SVG polyline points of kappa (-1..1 mapped to the height) per trend point."""
    defined = [(i, p.kappa) for i, p in enumerate(points) if p.kappa is not None]
    if not defined:
        return ""
    step = width / max(1, len(points) - 1)
    return " ".join(f"{i * step:.1f},{(1 - (k + 1) / 2) * height:.1f}" for i, k in defined)
