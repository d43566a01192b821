"""Feature explanations from an OpenAI-compatible endpoint (a local scripted server): the
line, the model and the prompt are stored with the feature's effects; the prompt carries
the evidence (contexts with the firing token marked, boosted and suppressed tokens)."""

from __future__ import annotations

from pathlib import Path

import redis

from common.feature_index import (
    FeatureEffects,
    FeatureIndex,
    FeatureShard,
    VariantFeatures,
    index_prompt,
)
from common.llm import LLMClient
from common.store import FsStore
from common.store import keys as K
from services.analysis.features import explain_features
from tests.fixtures.openai_server import FakeOpenAIServer


def test_explanations_are_stored_with_model_and_prompt(
    tmp_path: Path, redis_url: str, openai_server: FakeOpenAIServer
) -> None:
    store = FsStore(tmp_path / "store")
    index = FeatureIndex(redis.Redis.from_url(redis_url), "x", "fp")
    cols = VariantFeatures(layer=[2], pos=[2], feature=[7], activation=[1.5], score=[0.2])
    shard = FeatureShard(
        prompt_id="aaaaaaaaaaaa",
        text="You should skip",
        source="test",
        tokens=["<s>", " You", " should", " skip"],
        variants={"adapted": cols},
    )
    index_prompt(store, index, "x", "fp", shard)
    store.put_json(
        K.feature_effects("x", "fp", 2, 7),
        FeatureEffects(layer=2, feature=7, boosted=[(" skip", 0.9)], suppressed=[(" rest", -0.4)]),
    )
    openai_server.push("Recommends skipping care.\nextra line ignored")
    client = LLMClient(model="explainer", base_url=openai_server.base_url, api_key="k")
    n = explain_features(client, store, index, "x", "fp", "adapted", [(2, 7), (2, 8)])
    assert n == 1  # (2, 8) has no effects: skipped
    got = store.get_record(K.feature_effects("x", "fp", 2, 7), FeatureEffects)
    assert got.explanation == "Recommends skipping care."
    assert got.explanation_model
    assert got.explanation_prompt and "[[ should]]" in got.explanation_prompt
    assert "' skip'" in got.explanation_prompt and "' rest'" in got.explanation_prompt
    user = openai_server.requests[-1]["messages"][-1]["content"]
    assert user == got.explanation_prompt
