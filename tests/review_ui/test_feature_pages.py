"""Feature pages through the app: a feature's contexts (token highlighted, escaped), its
stats for every variant, output effects once built, and 404s for what never fired."""

from __future__ import annotations

from typing import Any

import redis

from common.experiment import Experiment
from common.feature_index import (
    FeatureEffects,
    FeatureIndex,
    FeatureShard,
    VariantFeatures,
    index_prompt,
)
from common.store import FsStore
from common.store import keys as K


def shard(pid: str, tokens: list[str], act: float, score: float) -> FeatureShard:
    cols = VariantFeatures(
        layer=[2, 2], pos=[1, 2], feature=[7, 9], activation=[act, 0.1], score=[score, 0.0]
    )
    return FeatureShard(
        prompt_id=pid,
        text="".join(tokens),
        source="test",
        tokens=tokens,
        variants={"adapted": cols},
    )


def test_feature_page_and_json(
    auth: Any, client: Any, store: FsStore, redis_client: redis.Redis, experiment: Experiment
) -> None:
    fp = experiment.fingerprint
    index = FeatureIndex(redis_client, experiment.name, fp)
    index_prompt(
        store,
        index,
        experiment.name,
        fp,
        shard("aaaaaaaaaaaa", ["<s>", " take", " <b>pills</b>"], 2.0, 0.3),
    )
    index_prompt(
        store,
        index,
        experiment.name,
        fp,
        shard("bbbbbbbbbbbb", ["<s>", " rest", " now"], 0.5, -0.1),
    )
    auth.login()
    resp = client.get("/features/adapted/2/7")
    assert resp.status_code == 200
    html = resp.get_data(as_text=True)
    assert "<mark> take</mark>" in html and "&lt;b&gt;pills&lt;/b&gt;" in html
    assert "emc features build" in html  # no effects yet
    data = client.get("/api/features/adapted/2/7").get_json()
    assert [c["prompt_id"] for c in data["contexts"]] == ["aaaaaaaaaaaa", "bbbbbbbbbbbb"]
    assert data["stats"]["adapted"]["n_prompts"] == 2
    assert data["stats"]["adapted"]["sign_consistency"] == 0.5
    assert data["stats"]["base"] is None and data["effects"] is None

    store.put_json(
        K.feature_effects(experiment.name, fp, 2, 7),
        FeatureEffects(
            layer=2,
            feature=7,
            boosted=[(" poison", 0.9)],
            suppressed=[(" doctor", -0.5)],
            direction_cosine=0.8,
        ),
    )
    data = client.get("/api/features/adapted/2/7").get_json()
    assert data["aligned_with_misalignment_direction"] is True
    assert "+0.800" in client.get("/features/adapted/2/7").get_data(as_text=True)
    assert client.get("/features/adapted/2/8").status_code == 404
    assert client.get("/features/nope/2/7").status_code == 404


def test_rankings_mark_features_aligned_with_the_direction(
    auth: Any, client: Any, store: FsStore, experiment: Experiment, seeded: Any
) -> None:
    """The analysis page's ranking shows each feature's cosine with the misalignment
    direction, tagged when aligned, and links the feature's page."""
    from tests.review_ui.test_analysis_page import ranking

    p = seeded["divergent"]
    r = ranking(p.pid, experiment, "adapted", 0.1, 0.2)
    store.put_json(K.features(experiment.name, p.pid, experiment.fingerprint, "adapted"), r)
    top = r.features[0]
    store.put_json(
        K.feature_effects(experiment.name, experiment.fingerprint, top.layer, top.feature),
        FeatureEffects(
            layer=top.layer, feature=top.feature, boosted=[], suppressed=[], direction_cosine=-0.71
        ),
    )
    auth.login()
    html = client.get(f"/p/{p.pid}/analysis").get_data(as_text=True)
    assert 'title="aligned with the misalignment direction">-0.71</span>' in html
    assert f'href="/features/adapted/{top.layer}/{top.feature}"' in html
