"""Agreement: judge vs humans (confusion matrix, Cohen's kappa, the disagreements), humans
vs humans on overlap prompts (kappa per pair of reviewers), and per-reviewer figures."""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from common.labels import (
    Consensus,
    consensus,
    current_label,
    label_history,
    labeled_pids,
    labels_agree,
    token_map,
)
from common.records import LABELS, HumanLabel, Label, Verdict
from common.store import NotFound, ObjectStore
from common.store import keys as K


def confusion_matrix(
    pairs: Iterable[tuple[Label, Label]], labels: Sequence[Label] = LABELS
) -> list[list[int]]:
    """Counts of ``(judge, human)`` pairs: rows are the judge's label, columns the human's."""
    index = {lab: i for i, lab in enumerate(labels)}
    matrix = [[0] * len(labels) for _ in labels]
    for judge, human in pairs:
        matrix[index[judge]][index[human]] += 1
    return matrix


def cohen_kappa(matrix: Sequence[Sequence[int]]) -> float | None:
    """Cohen's kappa of a square confusion matrix: (p_o - p_e) / (1 - p_e).

    Returns None when it is undefined: no pairs, or both raters always used one same
    label (p_e = 1).
    """
    n = sum(sum(row) for row in matrix)
    if n == 0:
        return None
    k = len(matrix)
    p_o = sum(matrix[i][i] for i in range(k)) / n
    rows = [sum(matrix[i]) / n for i in range(k)]
    cols = [sum(matrix[i][j] for i in range(k)) / n for j in range(k)]
    p_e = sum(r * c for r, c in zip(rows, cols, strict=True))
    if p_e >= 1.0:
        return None
    return (p_o - p_e) / (1.0 - p_e)


@dataclass(frozen=True)
class Disagreement:
    """A token the judge and the current human label disagree on, with the judge's reason and who
    labeled it when."""

    pid: str
    variant: str
    token_id: int
    token: str
    judge: Label
    reason: str
    human: Label
    reviewer: str
    labeled_at: datetime


@dataclass
class AgreementReport:
    """Judge-vs-human agreement: the confusion matrix over ``labels`` (rows: judge, columns: human),
    Cohen's kappa (None when undefined) and the disagreements."""

    labels: Sequence[Label]
    matrix: list[list[int]]
    kappa: float | None
    n_pairs: int
    n_prompts: int
    disagreements: list[Disagreement] = field(default_factory=list)


def agreement_report(
    store: ObjectStore, exp: str, fingerprint: str, judge: str, variants: Sequence[str]
) -> AgreementReport:
    """Compare the judge's verdicts with the current human labels of every labeled prompt.

    Only tokens that both labeled count; prompts flagged bad are left out.
    """
    pairs: list[tuple[Label, Label]] = []
    disagreements: list[Disagreement] = []
    prompts = 0
    for pid in labeled_pids(store, exp):
        label = current_label(store, exp, pid)
        if label is None or label.bad_prompt:
            continue
        counted = False
        for variant in variants:
            try:
                verdict = store.get_record(
                    K.verdicts(exp, pid, fingerprint, judge, variant), Verdict
                )
            except NotFound:
                continue
            for tv in verdict.verdicts:
                human = label.label_of(variant, tv.token_id)
                if human is None:
                    continue
                counted = True
                pairs.append((tv.label, human))
                if human != tv.label:
                    disagreements.append(
                        Disagreement(
                            pid,
                            variant,
                            tv.token_id,
                            tv.token,
                            tv.label,
                            tv.reason,
                            human,
                            label.reviewer,
                            label.created_at,
                        )
                    )
        prompts += counted
    matrix = confusion_matrix(pairs)
    disagreements.sort(key=lambda d: d.labeled_at, reverse=True)
    return AgreementReport(LABELS, matrix, cohen_kappa(matrix), len(pairs), prompts, disagreements)


# ------------------------------------------------------------------ humans vs humans (overlap)


@dataclass(frozen=True)
class PairAgreement:
    """Agreement of two reviewers over the overlap prompts both reviewed.

    The matrix's rows are reviewer ``a``'s labels, its columns ``b``'s (``a`` < ``b``).
    """

    a: str
    b: str
    n_prompts: int
    n_tokens: int
    matrix: list[list[int]]
    kappa: float | None
    n_disputed: int


def pair_agreement(states: Iterable[Consensus]) -> list[PairAgreement]:
    """Cohen's kappa per pair of reviewers, over the tokens both labeled on overlap prompts.

    Each overlap prompt counts once, for the two reviews it compares (:attr:`Consensus.pair`),
    whether it is agreed, disputed or adjudicated since. A prompt either flagged bad adds no
    token pairs (its tokens were not labeled as such) but counts as a prompt.
    """
    tokens: dict[tuple[str, str], list[tuple[Label, Label]]] = defaultdict(list)
    prompts: dict[tuple[str, str], int] = defaultdict(int)
    disputed: dict[tuple[str, str], int] = defaultdict(int)
    for state in states:
        pair = state.pair
        if pair is None or not any(lab.overlap for _, lab in state.reviews):
            continue
        (_, x), (_, y) = sorted(pair, key=lambda kl: kl[1].reviewer)
        names = (x.reviewer, y.reviewer)
        prompts[names] += 1
        disputed[names] += not labels_agree(x, y)
        if x.bad_prompt or y.bad_prompt:
            continue
        tx, ty = token_map(x), token_map(y)
        tokens[names] += [(tx[k], ty[k]) for k in sorted(tx.keys() & ty.keys())]
    out = []
    for names in sorted(prompts):
        matrix = confusion_matrix(tokens[names])
        out.append(
            PairAgreement(
                names[0],
                names[1],
                prompts[names],
                len(tokens[names]),
                matrix,
                cohen_kappa(matrix),
                disputed[names],
            )
        )
    return out


@dataclass(frozen=True)
class ReviewerStats:
    """How much one reviewer labeled and how fast (time from opening a prompt to saving)."""

    name: str
    reviews: int
    prompts: int
    tokens: int
    adjudications: int
    median_s: float | None
    tokens_per_min: float | None


def reviewer_stats(histories: Iterable[Sequence[tuple[str, HumanLabel]]]) -> list[ReviewerStats]:
    """Per reviewer: labels saved, prompts, tokens, adjudications, median seconds per label
    and tokens per minute (over labels that recorded their time), by name."""
    reviews: dict[str, int] = defaultdict(int)
    adjud: dict[str, int] = defaultdict(int)
    tokens: dict[str, int] = defaultdict(int)
    pids: dict[str, set[str]] = defaultdict(set)
    times: dict[str, list[float]] = defaultdict(list)
    timed_tokens: dict[str, int] = defaultdict(int)
    for history in histories:
        for _, lab in history:
            who = lab.reviewer
            if lab.adjudicated:
                adjud[who] += 1
            else:
                reviews[who] += 1
            pids[who].add(lab.prompt_id)
            tokens[who] += len(lab.labels)
            if lab.elapsed_s is not None:
                times[who].append(lab.elapsed_s)
                timed_tokens[who] += len(lab.labels)
    out = []
    for who in sorted(pids):
        spent = sum(times[who])
        out.append(
            ReviewerStats(
                who,
                reviews[who],
                len(pids[who]),
                tokens[who],
                adjud[who],
                statistics.median(times[who]) if times[who] else None,
                60.0 * timed_tokens[who] / spent if spent > 0 else None,
            )
        )
    return out


@dataclass
class TeamReport:
    """Human-vs-human agreement: kappa per reviewer pair, per-reviewer stats, prompts per state."""

    pairs: list[PairAgreement]
    reviewers: list[ReviewerStats]
    states: dict[str, int]  # consensus state -> prompts


def team_report(store: ObjectStore, exp: str) -> TeamReport:
    """Humans vs humans and per-reviewer figures over every labeled prompt's history."""
    histories = [label_history(store, exp, pid) for pid in labeled_pids(store, exp)]
    states = [consensus(h) for h in histories]
    counts: dict[str, int] = defaultdict(int)
    for s in states:
        counts[s.state] += 1
    return TeamReport(pair_agreement(states), reviewer_stats(histories), dict(counts))
