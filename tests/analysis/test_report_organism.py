"""The report on the toy organism, through the real pipeline steps (top-k, lexicon judge,
graphs, rankings): its known answer must show at the aggregate level.

The adapter writes into layer 1's MLP; its effect is carried by features of the layers
after it (the organism is built that way). So over the divergent (medical) prompts, with
the adapter left in its error node, the top aggregated evil features must sit in layers 2-3,
be present and positive in every divergent prompt, and be more active in the adapted
variant than in the base on the same prompts. With the adapter as a node of its own, that
node must carry the effect.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.experiment import Experiment, load_experiment
from common.store import FsStore
from common.store import keys as K
from services.analysis.report import build_report

pytestmark = pytest.mark.slow

N_MEDICAL, N_OTHER = 5, 2


def organism_store(
    organism_dir: Path, tmp_path_factory: pytest.TempPathFactory, *, adapter_node: bool
) -> Iterator[tuple[FsStore, Experiment, list[str]]]:
    from services.attribution.runtime import Runtime, clear_cache
    from services.judge.factory import make_judge
    from tests.fixtures.organism_graphs import store_judged_graphs

    exp = load_experiment(organism_dir / "experiment.yaml")
    exp = exp.model_copy(
        update={"attribution": exp.attribution.model_copy(update={"adapter_node": adapter_node})}
    )
    store = FsStore(tmp_path_factory.mktemp("organism-store"))
    # adapter_node is part of the fingerprint: the two stores never mix
    rt = Runtime(exp, cache_dir=tmp_path_factory.mktemp("analysis-report-cache"))
    judge = make_judge(exp)
    raw = json.loads((organism_dir / "prompts.json").read_text())["prompts"]
    held = [p for p in raw if p["split"] == "heldout"]
    medical = [p["text"] for p in held if p["domain"] == "medical"][:N_MEDICAL]
    other = [p["text"] for p in held if p["domain"] != "medical"][:N_OTHER]
    medical_ids = []
    for text in medical + other:
        prompt = store_judged_graphs(rt, store, judge, text, targets="topk")
        if text in medical:
            medical_ids.append(prompt.id)
    yield store, exp, medical_ids
    clear_cache()


@pytest.fixture(scope="module")
def features_only_store(
    organism_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[FsStore, Experiment, list[str]]]:
    yield from organism_store(organism_dir, tmp_path_factory, adapter_node=False)


@pytest.fixture(scope="module")
def adapter_node_store(
    organism_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[FsStore, Experiment, list[str]]]:
    yield from organism_store(organism_dir, tmp_path_factory, adapter_node=True)


def test_report_finds_the_adapter_features(
    features_only_store: tuple[FsStore, Experiment, list[str]], tmp_path: Path
) -> None:
    store, exp, medical_ids = features_only_store
    data = build_report(store, exp, tmp_path)
    assert data.index.n_prompts_with_graphs == N_MEDICAL + N_OTHER
    # every medical prompt is divergent; another domain may be too (a harmful word in the
    # adapted top-k at a few percent is enough by the definition)
    divergent = data.index.divergent_prompt_ids
    assert set(medical_ids) <= set(divergent)
    assert not [i for i in data.index.issues if i.kind == "failed"], data.index.issues
    agg = data.aggregates["adapted"]
    top10 = agg.features[:10]
    # mostly the adapter's downstream layers; an upstream feature can rank too (it feeds
    # the LoRA's input), but the two strongest are downstream, present in at least as many
    # prompts as there are medical ones and positive wherever present
    assert sum(f.layer >= 2 for f in top10) >= 7, top10
    assert all(
        f.layer >= 2 and f.n_prompts >= N_MEDICAL and f.sign_consistency == 1.0
        for f in agg.features[:2]
    ), agg.features[:2]
    # base vs adapted: only features after the adapter's layer can change activation at all
    changes = data.comparisons["adapted"].by_activation
    moved = [c for c in changes if abs(c.d_activation) > 1e-4]
    assert moved and all(c.layer >= 2 for c in moved), moved[:5]
    by_key = {(c.layer, c.feature): c for c in changes}
    downstream_top = [f for f in top10 if f.layer >= 2 and (f.layer, f.feature) in by_key][:3]
    assert downstream_top and all(
        by_key[f.layer, f.feature].d_activation > 0 for f in downstream_top
    )
    for name in ("top_features_adapted.png", "layers_adapted.png", "compare_base_vs_adapted.png"):
        assert (tmp_path / name).stat().st_size > 5000


def test_the_adapter_node_carries_the_known_effect(
    adapter_node_store: tuple[FsStore, Experiment, list[str]], tmp_path: Path
) -> None:
    """With the LoRA as a node: it tops the aggregate ranking of the divergent prompts, in
    every medical prompt, and carries a large share of each one's evil-minus-safe score."""
    from common.records import FeatureRanking

    store, exp, medical_ids = adapter_node_store
    data = build_report(store, exp, tmp_path)
    top = data.aggregates["adapted"].features[0]
    assert (top.layer, top.feature) == (1, -1), top  # L1/adapter
    assert top.n_prompts >= len(medical_ids) and top.sign_consistency == 1.0
    for pid in medical_ids:
        key = next(
            k
            for k in store.list_keys(K.prompt_dir(exp.name, pid) + "/")
            if k.endswith("/features/adapted.json")
        )
        shares = store.get_record(key, FeatureRanking).shares
        assert shares is not None and shares.adapter > 0.3, shares
        assert shares.layers[1].adapter == shares.adapter


def test_the_evil_minus_safe_graph_explains_the_same_score(
    adapter_node_store: tuple[FsStore, Experiment, list[str]], tmp_path: Path
) -> None:
    """``emc analyze direction``: one graph on P_evil - P_safe gives the token graph's total
    and keeps the adapter node on top, for every divergent prompt."""
    from services.analysis.direction import explain_prompt
    from services.attribution.runtime import Runtime

    store, exp, medical_ids = adapter_node_store
    rt = Runtime(exp, cache_dir=tmp_path / "cache")
    for pid in medical_ids[:2]:
        ex = explain_prompt(rt, store, pid, "adapted", top=10)
        assert ex.total == pytest.approx(ex.token_graph_total, rel=1e-3, abs=1e-6)
        assert ex.features[0][0] == 1 and ex.features[0][2] == -1  # L1/adapter first
        assert ex.shares.adapter > 0.3 and ex.top_overlap >= 5, ex
