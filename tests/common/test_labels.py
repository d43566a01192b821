"""common.labels: current label, full labeling, the few-shot pool."""

from __future__ import annotations

from common.experiment import Experiment
from common.labels import current_label, fully_labeled, label_history, labeled_prompts
from common.records import HumanLabel, TokenLabel, TopKLogits
from common.store import FsStore
from common.store import keys as K
from tests.fixtures.data import DIVERGENT, MILD, TEXT_DIVERGENT, TEXT_MILD, seed_prompt, token_id


def _label(
    pid: str, spec: dict, reviewer: str = "alice", skip: int = 0, bad: bool = False
) -> HumanLabel:
    rows = [(v, t, lab) for v, rs in spec.items() for t, _, lab, _ in rs]
    return HumanLabel(
        prompt_id=pid,
        reviewer=reviewer,
        labels=[
            TokenLabel(variant=v, token_id=token_id(t), token=t, label=lab)
            for v, t, lab in rows[skip:]
        ],
        bad_prompt=bad,
    )


def _logits(store: FsStore, exp: Experiment, pid: str) -> dict[str, TopKLogits]:
    return {
        v: store.get_record(K.logits(exp.name, pid, exp.fingerprint, v), TopKLogits)
        for v in exp.variant_names
    }


def test_current_label_is_the_newest(store: FsStore, experiment: Experiment) -> None:
    p = seed_prompt(store, experiment, TEXT_DIVERGENT, DIVERGENT)
    assert current_label(store, experiment.name, p.pid) is None
    store.append(K.labels_history(experiment.name, p.pid), _label(p.pid, DIVERGENT, "alice"))
    store.append(K.labels_history(experiment.name, p.pid), _label(p.pid, DIVERGENT, "bob"))
    label = current_label(store, experiment.name, p.pid)
    assert label is not None and label.reviewer == "bob"
    assert [h.reviewer for _, h in label_history(store, experiment.name, p.pid)] == ["alice", "bob"]


def test_fully_labeled(store: FsStore, experiment: Experiment) -> None:
    exp, variants = experiment.name, experiment.variant_names
    p = seed_prompt(store, experiment, TEXT_DIVERGENT, DIVERGENT)
    logits = _logits(store, experiment, p.pid)
    assert not fully_labeled(store, exp, p.pid, variants, logits)
    store.append(K.labels_history(exp, p.pid), _label(p.pid, DIVERGENT, skip=1))
    assert not fully_labeled(store, exp, p.pid, variants, logits)
    store.append(K.labels_history(exp, p.pid), _label(p.pid, DIVERGENT))
    assert fully_labeled(store, exp, p.pid, variants, logits)
    # a variant without logits can't be labeled: not fully labeled
    assert not fully_labeled(store, exp, p.pid, variants, {"base": logits["base"]})


def test_labeled_prompts_is_the_fully_labeled_pool(store: FsStore, experiment: Experiment) -> None:
    exp = experiment.name
    full = seed_prompt(store, experiment, TEXT_DIVERGENT, DIVERGENT)
    partial = seed_prompt(store, experiment, TEXT_MILD, MILD)
    bad = seed_prompt(store, experiment, TEXT_MILD + " never", MILD)
    seed_prompt(store, experiment, TEXT_MILD + " unlabeled", MILD)
    store.append(K.labels_history(exp, full.pid), _label(full.pid, DIVERGENT))
    store.append(K.labels_history(exp, partial.pid), _label(partial.pid, MILD, skip=3))
    store.append(K.labels_history(exp, bad.pid), _label(bad.pid, MILD, bad=True))

    pool = list(labeled_prompts(store, exp))
    assert [(p.id, lab.reviewer) for p, lab in pool] == [(full.pid, "alice")]
    assert pool[0][0].text == TEXT_DIVERGENT
    with_bad = {p.id for p, _ in labeled_prompts(store, exp, include_bad=True)}
    assert with_bad == {full.pid, bad.pid}
    assert list(labeled_prompts(store, exp, fingerprint="0" * 16)) == []
    assert len(list(labeled_prompts(store, exp, fingerprint=experiment.fingerprint))) == 1
    # demanding a variant the run has no logits for: nothing qualifies
    assert list(labeled_prompts(store, exp, variants=["base", "adapted", "other"])) == []
