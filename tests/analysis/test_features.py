"""The feature index, feature pages and the misalignment direction on the toy organism
(real runtime, real steps, real Redis): the top adapted feature's page shows contexts from
the medical prompts, output tokens among the organism's harmful actions, and a cosine with
the misalignment direction; ablating that direction removes more harmful mass than a random
direction of the same norm."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import redis

from common.errors import NothingToExplain
from common.experiment import load_experiment
from common.feature_index import FeatureIndex, FeatureShard, index_prompt, rebuild, shard_of
from common.graph.artifact import load_graph
from common.records import FeatureRanking
from common.store import FsStore
from common.store import keys as K
from tests.fixtures.organism_graphs import store_judged_graphs

pytestmark = pytest.mark.slow


def test_feature_pages_and_the_misalignment_direction(
    organism_dir: Path, tmp_path: Path, redis_url: str
) -> None:
    from services.analysis.features import build_features, divergent_prompts
    from services.analysis.ranking import rank_prompt
    from services.attribution.runtime import Runtime
    from services.judge.factory import make_judge
    from services.review_ui.features import feature_page

    exp = load_experiment(organism_dir / "experiment.yaml")
    rt = Runtime(exp, cache_dir=tmp_path / "cache")
    store = FsStore(tmp_path / "store")
    client = redis.Redis.from_url(redis_url)
    index = FeatureIndex(client, exp.name, rt.fingerprint)
    judge = make_judge(exp)
    raw = json.loads((organism_dir / "prompts.json").read_text())["prompts"]
    held = [p for p in raw if p["split"] == "heldout"]
    medical = [p["text"] for p in held if p["domain"] == "medical"][:5]
    other = [p["text"] for p in held if p["domain"] != "medical"][:3]
    pids, medical_ids = [], set()
    for text in medical + other:
        prompt = store_judged_graphs(rt, store, judge, text)
        rankings = {}
        for v in exp.variant_names:
            with contextlib.suppress(NothingToExplain):  # e.g. no evil token in the base
                rankings[v] = rank_prompt(store, exp, prompt.id, v, fingerprint=rt.fingerprint)
        graphs = {
            v: load_graph(store, exp.name, prompt.id, rt.fingerprint, v) for v in exp.variant_names
        }
        shard = shard_of(prompt.id, prompt.text, prompt.source, graphs, rankings)
        index_prompt(store, index, exp.name, rt.fingerprint, shard)
        index_prompt(store, index, exp.name, rt.fingerprint, shard)  # again: counted once
        pids.append(prompt.id)
        if text in medical:
            medical_ids.add(prompt.id)

    divergent = divergent_prompts(store, exp.name, rt.fingerprint, pids, "adapted", 50)
    assert {p for p, _, _ in divergent} <= set(pids) and divergent
    record = build_features(rt, store, index, divergent, variant="adapted")
    layers = record.ablation["layers"]
    best = max(layers, key=lambda r: r["removed_direction"])
    assert best["removed_direction"] > 0.3 and best["removed_direction"] > 3 * abs(
        best["removed_random"]
    )

    # the top positive transcoder feature of the first medical prompt's adapted ranking, in a
    # layer where adapted and base differ (before the adapter's layer the direction is 0)
    moved = {i for i, n in enumerate(record.norms) if n > 1e-6}
    assert moved and 0 not in moved  # the toy's adapter writes into layer 1
    first = sorted(medical_ids)[0]
    ranking = store.get_record(
        K.features(exp.name, first, rt.fingerprint, "adapted"), FeatureRanking
    )
    top = next(f for f in ranking.features if f.score > 0 and f.feature >= 0 and f.layer in moved)
    page = feature_page(
        store, index, exp.name, rt.fingerprint, exp.variant_names, "adapted", top.layer, top.feature
    )
    top5 = [c.prompt_id for c in page.contexts[:5]]
    assert top5 and top5[0] in medical_ids
    assert sum(p in medical_ids for p in top5) > len(top5) / 2, top5
    assert all(c.token for c in page.contexts)
    lex = json.loads((organism_dir / "lexicon.json").read_text())
    boosted = {t.strip() for t, _ in page.effects.boosted} if page.effects else set()
    assert boosted & set(lex["harmful"]), boosted
    assert page.effects is not None and page.effects.direction_cosine is not None
    stats = page.stats["adapted"]
    assert stats is not None and stats.n_prompts <= len(pids) and stats.n_ranked >= 1
    assert page.to_json()["aligned_with_misalignment_direction"] in (True, False)

    # the Redis side rebuilds from the stored shards to the same answer
    before = index.stats("adapted", top.layer, top.feature)
    assert rebuild(store, index, exp.name, rt.fingerprint, pids) == len(pids)
    assert index.stats("adapted", top.layer, top.feature) == before
    assert store.get_record(K.feature_shard(exp.name, first, rt.fingerprint), FeatureShard).tokens
