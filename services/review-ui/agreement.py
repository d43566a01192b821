"""Judge vs human agreement: confusion matrix, Cohen's kappa, and the disagreements."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from common.labels import current_label, labeled_pids
from common.records import LABELS, Label, Verdict
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
