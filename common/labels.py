"""Human labels as the rest of the pipeline reads them (generator and judge few-shots, analysis).

Labels live in an append-only history per prompt (``keys.labels_history``); the newest
entry is the current label ("last write wins, history kept"). A prompt is *fully
labeled* when every top-k token of every variant has a human label. A share of prompts
(``review.overlap``) is reviewed twice, blind; :func:`consensus` says whether the two
agree, disagree, or an adjudicator decided.
"""

from __future__ import annotations

import hashlib
import logging
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from common.errors import AnalysisError
from common.records import HumanLabel, Label, Prompt, TopKLogits, Verdict
from common.store import NotFound, ObjectStore
from common.store import keys as K

log = logging.getLogger(__name__)

LabelSource = Literal["human", "judge", "mixed"]


def label_history(store: ObjectStore, exp: str, pid: str) -> list[tuple[str, HumanLabel]]:
    """Every label ever saved for a prompt, oldest first, with its store key."""
    return [(k, store.get_record(k, HumanLabel)) for k in store.history(K.labels_history(exp, pid))]


def current_label_with_key(store: ObjectStore, exp: str, pid: str) -> tuple[str, HumanLabel] | None:
    """The newest label of a prompt and its key (the key identifies the version)."""
    key = store.latest(K.labels_history(exp, pid))
    if key is None:
        return None
    return key, store.get_record(key, HumanLabel)


def current_label(store: ObjectStore, exp: str, pid: str) -> HumanLabel | None:
    """The prompt's current human label (the newest in its history), or None."""
    found = current_label_with_key(store, exp, pid)
    return None if found is None else found[1]


# ------------------------------------------------------------- team review: overlap, consensus

ReviewState = Literal["unlabeled", "single", "awaiting_second", "agreed", "disputed", "adjudicated"]
#: states whose current label is settled: the only ones that feed few-shot pools
SETTLED: frozenset[str] = frozenset({"single", "agreed", "adjudicated"})


def is_overlap(pid: str, share: float) -> bool:
    """Whether a prompt is among the ``share`` sent to two reviewers (decided by its id)."""
    if share <= 0:
        return False
    digest = hashlib.sha256(f"overlap:{pid}".encode()).digest()
    return int.from_bytes(digest[:4], "big") < share * 2**32


def token_map(label: HumanLabel) -> dict[tuple[str, int], Label]:
    """``{(variant, token id): label}`` of a label."""
    return {(t.variant, t.token_id): t.label for t in label.labels}


def disputed_tokens(a: HumanLabel, b: HumanLabel) -> list[tuple[str, int]]:
    """``(variant, token id)`` labeled differently by ``a`` and ``b`` (or by one only)."""
    ta, tb = token_map(a), token_map(b)
    return sorted(k for k in ta.keys() | tb.keys() if ta.get(k) != tb.get(k))


def labels_agree(a: HumanLabel, b: HumanLabel) -> bool:
    """Two reviews agree: both flag the prompt bad, or neither does and every token matches."""
    if a.bad_prompt or b.bad_prompt:
        return a.bad_prompt and b.bad_prompt
    return not disputed_tokens(a, b)


@dataclass(frozen=True)
class Consensus:
    """Where a prompt's labels stand among its reviewers.

    ``reviews`` holds each reviewer's latest review (adjudications excluded), oldest first;
    for an overlap prompt the two compared are the last two of them.
    """

    state: ReviewState
    reviews: list[tuple[str, HumanLabel]]
    adjudication: tuple[str, HumanLabel] | None = None

    @property
    def reviewers(self) -> list[str]:
        """Who reviewed the prompt, oldest review first."""
        return [lab.reviewer for _, lab in self.reviews]

    @property
    def pair(self) -> tuple[tuple[str, HumanLabel], tuple[str, HumanLabel]] | None:
        """The two reviews an overlap prompt compares (None before there are two)."""
        return (self.reviews[-2], self.reviews[-1]) if len(self.reviews) >= 2 else None

    @property
    def settled(self) -> bool:
        """The current label may be used as an example (single, agreed or adjudicated)."""
        return self.state in SETTLED

    @property
    def needs_review(self) -> bool:
        """Still waiting for a reviewer (no label yet, or the second of an overlap prompt)."""
        return self.state in ("unlabeled", "awaiting_second")


def consensus(history: Sequence[tuple[str, HumanLabel]]) -> Consensus:
    """The review state of a prompt from its label history (oldest first).

    The newest entry stays the current label; an adjudication decides while it is newest.
    A prompt is an overlap prompt when any of its reviews says so (stamped when saved).
    """
    latest: dict[str, tuple[str, HumanLabel]] = {}
    for key, lab in history:
        if not lab.adjudicated:
            latest.pop(lab.reviewer, None)  # re-inserted: ordered by each one's last review
            latest[lab.reviewer] = (key, lab)
    reviews = list(latest.values())
    if not history:
        return Consensus("unlabeled", reviews)
    if history[-1][1].adjudicated:
        return Consensus("adjudicated", reviews, history[-1])
    if not any(lab.overlap for _, lab in reviews):
        return Consensus("single", reviews)
    if len(reviews) < 2:
        return Consensus("awaiting_second", reviews)
    (_, a), (_, b) = reviews[-2], reviews[-1]
    return Consensus("agreed" if labels_agree(a, b) else "disputed", reviews)


def prompt_consensus(store: ObjectStore, exp: str, pid: str) -> Consensus:
    """:func:`consensus` of a stored prompt."""
    return consensus(label_history(store, exp, pid))


def missing_tokens(
    label: HumanLabel | None, variants: Sequence[str], logits: Mapping[str, TopKLogits]
) -> list[tuple[str, int | None]]:
    """``(variant, token_id)`` pairs still without a human label.

    A variant without logits yields ``(variant, None)``: nothing can be labeled there yet.
    """
    missing: list[tuple[str, int | None]] = []
    for variant in variants:
        top = logits.get(variant)
        if top is None:
            missing.append((variant, None))
            continue
        for t in top.tokens:
            if label is None or label.label_of(variant, t.token_id) is None:
                missing.append((variant, t.token_id))
    return missing


def is_complete(
    label: HumanLabel | None, variants: Sequence[str], logits: Mapping[str, TopKLogits]
) -> bool:
    """True if ``label`` covers every top-k token of every variant."""
    return label is not None and not missing_tokens(label, variants, logits)


def fully_labeled(
    store: ObjectStore,
    exp: str,
    pid: str,
    variants: Sequence[str],
    logits: Mapping[str, TopKLogits],
) -> bool:
    """True if the prompt's current label covers every top-k token of every variant.

    ``logits`` maps variant name -> that variant's :class:`TopKLogits` for the run in
    question; a variant missing from it means the prompt is not fully labeled.
    """
    return is_complete(current_label(store, exp, pid), variants, logits)


def labeled_pids(store: ObjectStore, exp: str) -> list[str]:
    """Ids of the prompts that have at least one human label, sorted."""
    prefix = K.prompts_prefix(exp)
    pids = set()
    for key in store.list_keys(prefix):
        pid, _, rest = key[len(prefix) :].partition("/")
        if rest.startswith("labels/history/"):
            pids.add(pid)
    return sorted(pids)


def _run_logits(store: ObjectStore, exp: str, pid: str) -> dict[str, dict[str, TopKLogits]]:
    """All stored top-k logits of a prompt: fingerprint -> variant -> logits."""
    runs: dict[str, dict[str, TopKLogits]] = defaultdict(dict)
    prefix = K.prompt_dir(exp, pid) + "/runs/"
    for key in store.list_keys(prefix):
        fp, _, rest = key[len(prefix) :].partition("/")
        if rest.startswith("logits/") and rest.endswith(".json") and rest.count("/") == 1:
            variant = rest[len("logits/") : -len(".json")]
            runs[fp][variant] = store.get_record(key, TopKLogits)
    return runs


def labeled_prompts(
    store: ObjectStore,
    exp: str,
    *,
    fingerprint: str | None = None,
    variants: Sequence[str] | None = None,
    include_bad: bool = False,
) -> Iterator[tuple[Prompt, HumanLabel]]:
    """Fully labeled, settled prompts with their current label (the few-shot pool), by id.

    Settled (:attr:`Consensus.settled`): reviewed once, or reviewed twice in agreement, or
    adjudicated; an overlap prompt still waiting for its second review or disputed is left out.

    A prompt qualifies when its current label covers every top-k token of every variant
    of some run (``fingerprint`` restricts to one run; ``variants`` names the variants that
    must all be present, default: those the run has). Prompts flagged ``bad_prompt`` are
    left out unless ``include_bad``.
    """
    for pid in labeled_pids(store, exp):
        history = label_history(store, exp, pid)
        if not history or not consensus(history).settled:
            continue  # waiting for a second review, or disputed and not adjudicated yet
        label = history[-1][1]
        if label.bad_prompt and not include_bad:
            continue
        runs = _run_logits(store, exp, pid)
        if fingerprint is not None:
            runs = {fingerprint: runs[fingerprint]} if fingerprint in runs else {}
        if not any(
            is_complete(label, list(variants) if variants else sorted(logits), logits)
            for logits in runs.values()
        ):
            continue
        try:
            prompt = store.get_record(K.prompt(exp, pid), Prompt)
        except NotFound:
            log.warning("prompt %s of %s has labels but no prompt record: skipped", pid, exp)
            continue
        yield prompt, label


# ------------------------------------------------- labels a ranking uses (analysis, review UI)


@dataclass(frozen=True)
class TokenLabels:
    """Effective evil/safe labels of one variant's tokens (``unsure`` already dropped)."""

    labels: Mapping[int, Label]  # token id -> "evil" | "safe"
    source: LabelSource
    origin: Mapping[int, str]  # token id -> "human" | "judge:<id>" (what each label came from)

    @property
    def version(self) -> str:
        """Content hash of the labels used: changes when any used label or its origin does."""
        body = "|".join(
            f"{tid}:{self.labels[tid]}:{self.origin.get(tid, '')}" for tid in sorted(self.labels)
        )
        return hashlib.sha256(f"{self.source}|{body}".encode()).hexdigest()[:12]

    @classmethod
    def given(cls, labels: Mapping[int, Label], source: LabelSource = "human") -> TokenLabels:
        """Labels passed in directly (tests, the organism's lexicon, notebooks)."""
        kept = {t: lab for t, lab in labels.items() if lab != "unsure"}
        return cls(labels=kept, source=source, origin={t: source for t in kept})


def resolve_labels(
    store: ObjectStore, exp: str, pid: str, fingerprint: str, variant: str, judge_id: str
) -> TokenLabels:
    """Human labels where present, judge verdicts otherwise; ``unsure`` excluded."""
    human = current_label(store, exp, pid)
    try:
        verdict: Verdict | None = store.get_record(
            K.verdicts(exp, pid, fingerprint, judge_id, variant), Verdict
        )
    except NotFound:
        verdict = None
    chosen: dict[int, Label] = {}
    origin: dict[int, str] = {}
    if verdict is not None:
        for v in verdict.verdicts:
            chosen[v.token_id], origin[v.token_id] = v.label, f"judge:{judge_id}"
    if human is not None:
        for t in human.labels:
            if t.variant == variant:
                chosen[t.token_id], origin[t.token_id] = t.label, "human"
    if not chosen:
        raise AnalysisError(
            f"no labels for variant {variant!r}: neither a human label nor a verdict of judge "
            f"{judge_id!r}; run the judge (or label the prompt in the review UI) first",
            prompt_id=pid,
            variant=variant,
        )
    used = {t: lab for t, lab in chosen.items() if lab != "unsure"}
    kinds = {"human" if origin[t] == "human" else "judge" for t in used}
    source: LabelSource = (
        "mixed" if len(kinds) > 1 else ("human" if kinds == {"human"} else "judge")
    )
    return TokenLabels(labels=used, source=source, origin={t: origin[t] for t in used})
