"""The streamed, incremental report equals the report computed from every ranking held in
memory at once (the implementation it replaced, kept here as the reference), and a re-run
folds in only new prompts."""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path

import pytest

from common.records import FeatureRanking, HumanLabel, TokenLabel
from common.store import FsStore, ObjectStore
from common.store import keys as K
from services.analysis.ranking import rank_prompt
from services.analysis.records import AggregateFeature
from services.analysis.report import ReportState, build_report
from tests.analysis.test_report import BASE_ONLY, FP, OTHER, SAFE, experiment, put_prompt

Key = tuple[int, int]


# ------------------------------------------------------------ the in-memory reference


def _folded(r: FeatureRanking) -> tuple[dict[Key, float], dict[Key, float], dict[Key, list[str]]]:
    acts: dict[Key, float] = defaultdict(float)
    scores: dict[Key, float] = defaultdict(float)
    tokens: dict[Key, list[str]] = defaultdict(list)
    for f in r.features:
        acts[f.layer, f.feature] += f.activation
        scores[f.layer, f.feature] += f.score
        tokens[f.layer, f.feature].append(f.token)
    return acts, scores, tokens


def reference_rows(rankings: list[FeatureRanking]) -> list[AggregateFeature]:
    """The pre-streaming ``aggregate`` (every ranking in memory), all rows."""
    n = len(rankings)
    per_key: dict[Key, list[tuple[str, float, float]]] = defaultdict(list)
    tokens: dict[Key, Counter[str]] = defaultdict(Counter)
    for r in rankings:
        acts, scores, toks = _folded(r)
        for k, s in scores.items():
            per_key[k].append((r.prompt_id, s, acts[k]))
            tokens[k].update(toks[k])
    rows = []
    for (layer, feat), seen in per_key.items():
        total = sum(s for _, s, _ in seen)
        mean = total / n
        sign = 1.0 if mean >= 0 else -1.0
        rows.append(
            AggregateFeature(
                layer=layer,
                feature=feat,
                mean_score=mean,
                mean_score_present=total / len(seen),
                n_prompts=len(seen),
                frac_prompts=len(seen) / n,
                sign_consistency=sum(1 for _, s, _ in seen if s * sign > 0) / len(seen),
                mean_activation=sum(a for _, _, a in seen) / len(seen),
                tokens=[t for t, _ in tokens[layer, feat].most_common(3)],
                top_prompts=[p for p, _, _ in sorted(seen, key=lambda x: -x[1] * sign)[:3]],
            )
        )
    rows.sort(key=lambda r: (-r.mean_score, r.layer, r.feature))
    return rows


def _kind_score(r: FeatureRanking, kind: str, layer: int | None) -> float:
    """The score that starts at the tokens, or at one layer's error nodes."""
    s = r.shares
    assert s is not None
    if kind == "tokens":
        return s.tokens * s.total
    return next(x.errors for x in s.layers if x.layer == layer) * s.total


def seed(store: ObjectStore, pids: list[str], first_seed: int) -> None:
    """Divergent prompts; every other one's base ranked too (a human calls BASE_ONLY evil
    there), so that scores, shares and the diff ranking are compared on both sides."""
    for i, pid in enumerate(pids):
        put_prompt(store, pid, first_seed + 2 * i, [SAFE, OTHER, BASE_ONLY])
        if i % 2 == 0:
            store.append(
                K.labels_history("syn", pid),
                HumanLabel(
                    prompt_id=pid,
                    reviewer="r",
                    labels=[
                        TokenLabel(variant="base", token_id=BASE_ONLY, token="w", label="evil")
                    ],
                ),
            )


def test_streamed_report_equals_the_in_memory_one(tmp_path: Path) -> None:
    store = FsStore(tmp_path / "store")
    exp = experiment()
    pids = [f"p{i:02d}" for i in range(9)]
    seed(store, pids, 11)
    data = build_report(store, exp, tmp_path / "out", fingerprint=FP)
    assert not data.incremental and data.folded == pids
    adapted = [rank_prompt(store, exp, p, "adapted", fingerprint=FP) for p in pids]
    base = {p: rank_prompt(store, exp, p, "base", fingerprint=FP) for p in pids[::2]}

    agg = data.aggregates["adapted"]
    want = reference_rows(adapted)
    assert agg.prompt_ids == pids and agg.n_features_total == len(want)
    assert agg.features == want  # fewer than top_n=200 rows: all of them, exactly equal

    # shares: the plain mean of each prompt's shares; the flag is the mean's
    shares = agg.shares
    assert shares is not None and shares.n_prompts == len(pids)
    for name in ("total", "errors", "tokens", "top_feature"):
        mean = sum(getattr(r.shares, name) for r in adapted) / len(adapted)
        assert getattr(shares.shares, name) == pytest.approx(mean, rel=1e-12, abs=1e-15)
    for i, row in enumerate(shares.shares.layers):
        mean_err = sum(r.shares.layers[i].errors for r in adapted if r.shares) / len(adapted)
        assert row.errors == pytest.approx(mean_err, rel=1e-12, abs=1e-15)
    assert shares.n_flagged == sum(1 for r in adapted if r.shares and r.shares.flag)

    # the comparison and the diff ranking, over the prompts ranked in both variants
    cmp = data.comparisons["adapted"]
    assert cmp.prompt_ids == pids and cmp.scored_prompt_ids == sorted(base)
    scored = [(base[p], next(r for r in adapted if r.prompt_id == p)) for p in sorted(base)]
    assert cmp.diff, "no diff ranking"
    for node in cmp.diff:
        if node.kind in ("feature", "adapter"):
            k = (node.layer, node.feature)
            ref = sum(_folded(b)[1].get(k, 0.0) for b, _ in scored) / len(scored)  # type: ignore[arg-type]
            var = sum(_folded(a)[1].get(k, 0.0) for _, a in scored) / len(scored)  # type: ignore[arg-type]
        else:
            ref = sum(_kind_score(b, node.kind, node.layer) for b, _ in scored) / len(scored)
            var = sum(_kind_score(a, node.kind, node.layer) for _, a in scored) / len(scored)
        assert (node.reference, node.variant) == pytest.approx((ref, var), rel=1e-12, abs=1e-15)
    changes = [abs(n.change) for n in cmp.diff]
    assert changes == sorted(changes, reverse=True)
    # activations: mean over every compared prompt (base side from its graph where unranked)
    rows = {(c.layer, c.feature): c for c in cmp.by_activation}
    for k, c in rows.items():
        var_act = sum(_folded(r)[0].get(k, 0.0) for r in adapted) / len(adapted)
        assert c.variant_activation == pytest.approx(var_act, rel=1e-12, abs=1e-15)

    md = (tmp_path / "out" / "summary.md").read_text()
    assert "Where the score goes" in md and "Diff ranking" in md
    assert (tmp_path / "out" / "shares_adapted.png").read_bytes()[:4] == b"\x89PNG"
    assert store.exists(K.report_state("syn", FP))


def test_rerun_folds_in_only_new_prompts(tmp_path: Path) -> None:
    store = FsStore(tmp_path / "store")
    exp = experiment()
    old = [f"a{i:02d}" for i in range(6)]
    seed(store, old, 3)
    build_report(store, exp, tmp_path / "r1", fingerprint=FP)
    new = ["a03x", "b00", "b01"]  # one sorts among the old ones
    seed(store, new, 40)
    again = build_report(store, exp, tmp_path / "r2", fingerprint=FP)
    assert again.incremental and again.folded == sorted(new)
    full = build_report(store, exp, tmp_path / "r3", fingerprint=FP, full=True)
    assert not full.incremental and full.folded == sorted(old + new)
    for v in ("adapted",):
        a, b = again.aggregates[v], full.aggregates[v]
        assert a.prompt_ids == b.prompt_ids == sorted(old + new)
        assert [(f.layer, f.feature) for f in a.features] == [
            (f.layer, f.feature) for f in b.features
        ]
        for x, y in zip(a.features, b.features, strict=True):
            assert x.mean_score == pytest.approx(y.mean_score, rel=1e-12, abs=1e-15)
            assert (x.n_prompts, x.sign_consistency, x.top_prompts) == (
                y.n_prompts,
                y.sign_consistency,
                y.top_prompts,
            )
        assert again.comparisons[v].scored_prompt_ids == full.comparisons[v].scored_prompt_ids
    assert again.index.divergent_prompt_ids == full.index.divergent_prompt_ids
    # nothing new: nothing folded; a changed label of an old prompt: everything again
    assert build_report(store, exp, tmp_path / "r4", fingerprint=FP).folded == []
    store.append(
        K.labels_history("syn", old[1]),
        HumanLabel(prompt_id=old[1], reviewer="r", labels=[], bad_prompt=True),
    )
    changed = build_report(store, exp, tmp_path / "r5", fingerprint=FP)
    assert not changed.incremental and len(changed.folded) == len(old) + len(new)
    assert old[1] not in changed.aggregates["adapted"].prompt_ids
    state = store.get_record(K.report_state("syn", FP), ReportState)
    assert set(state.digests) == set(old + new)
