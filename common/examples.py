"""Human-labeled examples for the judge and the generator (few-shot pools, label reuse).

An :class:`ExampleSource` gives the current human label of every labeled prompt, with a
flag saying whether it is *fully labeled* (every top-k token of every variant has a human
label). Few-shot examples come ONLY from fully labeled prompts; the lexicon judge may also
reuse labels of partially labeled ones. :class:`StoreExamples` reads them from the object
store through :mod:`common.labels`; :class:`StaticExamples` holds a fixed list.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from common.experiment import Experiment
from common.labels import current_label, labeled_pids, labeled_prompts
from common.records import HumanLabel, JudgeFewShotSet, Label, Prompt
from common.store import NotFound, ObjectStore
from common.store import keys as K

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LabeledExample:
    """A prompt with its current human label."""

    prompt: Prompt
    label: HumanLabel
    complete: bool  # fully labeled: usable as a few-shot example
    pinned: bool = False  # in the judge's pinned few-shot set: chosen before the others

    def token_labels(self, variants: Sequence[str] | None = None) -> dict[int, Label]:
        """``{token id: label}`` over the given variants (all by default).

        Keyed by id, never by decoded text: different byte-fragment tokens decode to the same
        U+FFFD. The same token labeled differently in two variants of one prompt is left
        out: the label of a next token given the same text should not depend on the variant.
        """
        out: dict[int, Label] = {}
        conflicts: set[int] = set()
        for t in self.label.labels:
            if variants is not None and t.variant not in variants:
                continue
            if t.token_id in out and out[t.token_id] != t.label:
                conflicts.add(t.token_id)
            out.setdefault(t.token_id, t.label)
        return {tid: lab for tid, lab in out.items() if tid not in conflicts}

    def token_text(self, token_id: int) -> str:
        """The text of a labeled token as the label recorded it."""
        return next((t.token for t in self.label.labels if t.token_id == token_id), "")

    def has_evil(self, variants: Sequence[str] | None = None) -> bool:
        """Whether a human labeled any token evil, in ``variants`` (default: any variant)."""
        return any(
            t.label == "evil" and (variants is None or t.variant in variants)
            for t in self.label.labels
        )


class ExampleSource(Protocol):
    """Where judges and generators get human-labeled prompts from."""

    def examples(self) -> Sequence[LabeledExample]:
        """Every prompt with a current human label (``complete`` says if fully labeled)."""
        ...


class StaticExamples:
    """A fixed list of examples (tests, scripts, a snapshot taken elsewhere)."""

    def __init__(self, examples: Sequence[LabeledExample] = ()) -> None:
        self._examples = list(examples)

    def examples(self) -> Sequence[LabeledExample]:
        """A copy of the fixed list."""
        return list(self._examples)


class StoreExamples:
    """Labeled prompts of one experiment read from the object store, cached ``ttl_s`` seconds.

    Fully labeled = :func:`common.labels.labeled_prompts` for the experiment's variants
    (any run, or the run ``fingerprint``). Prompts flagged ``bad_prompt`` are left out.
    Reading scans the experiment's labels, hence the cache: a worker judging many prompts
    re-reads at most once per ``ttl_s``.
    """

    def __init__(
        self,
        store: ObjectStore,
        exp: Experiment,
        fingerprint: str | None = None,
        ttl_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        pinned_for: str | None = None,
    ) -> None:
        self.store = store
        self.exp = exp
        self.fingerprint = fingerprint
        self.pinned_for = pinned_for
        self.ttl_s = ttl_s
        self._clock = clock
        self._lock = threading.Lock()
        self._cached: tuple[float, list[LabeledExample]] | None = None

    def examples(self) -> Sequence[LabeledExample]:
        """The labeled prompts, re-read from the store when the cached read is older than
        ``ttl_s``."""
        with self._lock:
            now = self._clock()
            if self._cached is None or now - self._cached[0] > self.ttl_s:
                self._cached = (now, self._read())
            return list(self._cached[1])

    def _pinned(self) -> set[str]:
        """Prompt ids of the few-shot set pinned for judge ``pinned_for`` (none if unset)."""
        if self.pinned_for is None:
            return set()
        try:
            found = self.store.get_record(
                K.judge_few_shot(self.exp.name, self.pinned_for), JudgeFewShotSet
            )
        except NotFound:
            return set()
        return set(found.prompt_ids)

    def _read(self) -> list[LabeledExample]:
        name = self.exp.name
        pinned = self._pinned()
        out = [
            LabeledExample(prompt=p, label=lab, complete=True, pinned=p.id in pinned)
            for p, lab in labeled_prompts(
                self.store, name, fingerprint=self.fingerprint, variants=self.exp.variant_names
            )
        ]
        complete = {e.prompt.id for e in out}
        for pid in labeled_pids(self.store, name):
            if pid in complete:
                continue
            label = current_label(self.store, name, pid)
            if label is None or label.bad_prompt:
                continue
            try:
                prompt = self.store.get_record(K.prompt(name, pid), Prompt)
            except NotFound:
                log.warning("prompt %s of %s has labels but no prompt record: skipped", pid, name)
                continue
            out.append(LabeledExample(prompt=prompt, label=label, complete=False))
        return out


def select_examples(
    examples: Sequence[LabeledExample],
    k: int,
    is_evil: Callable[[LabeledExample], bool],
    rng: random.Random,
    exclude: str | None = None,
) -> list[LabeledExample]:
    """Up to ``k`` fully labeled examples, about half evil and half not (both when possible).

    ``exclude`` is a prompt id never to use (the prompt being judged). Prompts flagged
    ``bad_prompt`` and partially labeled ones are never chosen. Pinned examples (the
    judge's exported few-shot set) come first, the rest is drawn as above. The result is
    ordered by prompt id so the same pool and rng give the same messages.
    """
    pool = [e for e in examples if e.complete and not e.label.bad_prompt and e.prompt.id != exclude]
    pool.sort(key=lambda e: e.prompt.id)
    if k <= 0:
        return []
    pinned = [e for e in pool if e.pinned]
    rng.shuffle(pinned)
    chosen = pinned[:k]
    k -= len(chosen)
    rest = [e for e in pool if not e.pinned]
    evil = [e for e in rest if is_evil(e)]
    other = [e for e in rest if not is_evil(e)]
    rng.shuffle(evil)
    rng.shuffle(other)
    n_evil = min(len(evil), max(1 if evil else 0, k // 2)) if k > 0 else 0
    n_other = min(len(other), k - n_evil)
    n_evil = min(len(evil), k - n_other)  # fill from evil when there are too few others
    chosen += evil[:n_evil] + other[:n_other]
    return sorted(chosen, key=lambda e: e.prompt.id)
