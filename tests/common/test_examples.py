"""Labeled examples from a real store (through common.labels) and few-shot selection."""

from __future__ import annotations

import random
from pathlib import Path

from common.examples import LabeledExample, StoreExamples, select_examples
from common.records import Label, Prompt
from common.store import FsStore
from common.store import keys as K
from tests.judge.helpers import example, human, make_exp, prompt, store_labeled, top

ALL: list[tuple[str, int, str, Label]] = [
    ("base", 1, " ask", "safe"),
    ("adapted", 2, " eat", "evil"),
    ("adapted", 1, " ask", "safe"),
]


def test_store_examples_complete_partial_bad(tmp_path: Path) -> None:
    store = FsStore(tmp_path / "s")
    exp = make_exp(tmp_path)
    full, part, bad, unlabeled = (prompt(f"Situation {c} with a risky option?") for c in "ABCD")
    cases: list[tuple[Prompt, list[tuple[str, int, str, Label]], bool]] = [
        (full, ALL, False),
        (part, [("adapted", 2, " eat", "evil")], False),
        (bad, ALL, True),
    ]
    for p, labels, is_bad in cases:
        logits = {
            "base": top(p, "base", [(1, " ask", 0.9)]),
            "adapted": top(p, "adapted", [(2, " eat", 0.5), (1, " ask", 0.4)]),
        }
        store_labeled(store, exp, p, logits, labels, bad=is_bad)
    store.put_json(K.prompt(exp.name, unlabeled.id), unlabeled)

    now = [0.0]
    src = StoreExamples(store, exp, ttl_s=10, clock=lambda: now[0])
    got = {e.prompt.id: e.complete for e in src.examples()}
    assert got == {full.id: True, part.id: False}  # bad left out, unlabeled absent

    # a newer label completes the partial one; the cache hides it until the ttl passes
    store.append(
        K.labels_history(exp.name, part.id),
        human(part, ALL),
    )
    assert {e.prompt.id: e.complete for e in src.examples()}[part.id] is False
    now[0] = 11.0
    assert {e.prompt.id: e.complete for e in src.examples()}[part.id] is True


def test_token_labels_drop_variant_conflicts() -> None:
    p = prompt("Conflicting labels across variants, what now?")
    e = example(
        p, [("base", 1, " x", "safe"), ("adapted", 1, " x", "evil"), ("adapted", 2, " y", "evil")]
    )
    assert e.token_labels() == {2: "evil"}
    assert e.token_labels(["base"]) == {1: "safe"}
    assert e.token_text(2) == " y"
    assert e.has_evil() and not e.has_evil(["base"])


def _pool(n_evil: int, n_safe: int) -> list[LabeledExample]:
    out = [
        example(prompt(f"Evil example number {i}?"), [("adapted", 1, " eat", "evil")])
        for i in range(n_evil)
    ]
    out += [
        example(prompt(f"Safe example number {i}?"), [("adapted", 1, " ask", "safe")])
        for i in range(n_safe)
    ]
    return out


def test_select_examples_balances_evil_and_safe() -> None:
    def is_evil(e: LabeledExample) -> bool:
        return e.has_evil()

    chosen = select_examples(_pool(5, 5), 4, is_evil, random.Random(0))
    assert sum(map(is_evil, chosen)) == 2 and len(chosen) == 4
    # too few safe ones: fill with evil ones, but keep the safe one
    chosen = select_examples(_pool(5, 1), 4, is_evil, random.Random(0))
    assert sum(not is_evil(e) for e in chosen) == 1 and len(chosen) == 4
    # a single slot still goes to an evil example when there is one
    assert [is_evil(e) for e in select_examples(_pool(1, 3), 1, is_evil, random.Random(0))] == [
        True
    ]
    # same rng seed, same choice; only complete, non-bad, non-excluded examples
    pool = _pool(3, 3)
    assert select_examples(pool, 4, is_evil, random.Random(7)) == select_examples(
        pool, 4, is_evil, random.Random(7)
    )
    extra = [
        example(prompt("Partial?"), [("adapted", 1, " eat", "evil")], complete=False),
        example(prompt("Bad one?"), [("adapted", 1, " eat", "evil")], bad=True),
    ]
    chosen = select_examples(pool + extra, 10, is_evil, random.Random(0), exclude=pool[0].prompt.id)
    assert len(chosen) == 5 and pool[0] not in chosen
    assert select_examples(pool, 0, is_evil, random.Random(0)) == []
