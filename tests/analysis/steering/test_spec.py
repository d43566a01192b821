"""Steering specs: feature and position parsing, spec hashes, store keys, interventions."""

from __future__ import annotations

import pytest

from common.store import keys as K
from services.analysis.steering import (
    AppliedFeature,
    FeatureRef,
    FeatureSet,
    SteeringError,
    SteeringSpec,
    interventions_for,
    parse_features,
    parse_positions,
    resolve_positions,
)


def test_parse_features() -> None:
    assert parse_features("2:17, 3:101") == (
        FeatureRef(layer=2, feature=17),
        FeatureRef(layer=3, feature=101),
    )
    for bad in ("", "2", "a:1", "2:-1", "1:2,1:2"):
        with pytest.raises(SteeringError):
            parse_features(bad)


def test_positions() -> None:
    assert parse_positions(" ALL ") == "all"
    assert parse_positions("3, -1") == "3,-1"
    with pytest.raises(SteeringError):
        parse_positions("first")
    assert resolve_positions("last", 10) == [9]
    assert resolve_positions("all", 10) == slice(1, None)
    assert resolve_positions("3,-1,3", 10) == [3, 9]
    with pytest.raises(SteeringError):
        resolve_positions("12", 10)


def test_interventions_for() -> None:
    feats = [
        AppliedFeature(layer=1, feature=5, value=2.5),
        AppliedFeature(layer=2, feature=7, value=-1.0),
    ]
    assert interventions_for(feats, "last", 6) == [(1, 5, 5, 2.5), (2, 5, 7, -1.0)]
    assert interventions_for(feats, "all", 6) == [
        (1, slice(1, None), 5, 2.5),
        (2, slice(1, None), 7, -1.0),
    ]
    assert interventions_for([], "last", 6) == []


def test_spec_hash_and_key() -> None:
    fs = FeatureSet(name="x", features=parse_features("1:2"))
    a = SteeringSpec(experiment="toy", prompts=["p"], feature_sets=[fs])
    b = SteeringSpec(experiment="toy", prompts=["p"], feature_sets=[fs], positions="LAST")
    c = SteeringSpec(experiment="toy", prompts=["p"], feature_sets=[fs], n=21)
    assert a.spec_hash == b.spec_hash != c.spec_hash
    assert len(a.spec_hash) == 16
    assert (
        K.steering_result("toy", "fp1", a.spec_hash)
        == f"experiments/toy/steering/fp1/{a.spec_hash}.json"
    )
    assert SteeringSpec.model_validate_json(a.model_dump_json()).spec_hash == a.spec_hash
    with pytest.raises(ValueError):
        SteeringSpec(experiment="toy", prompts=[], feature_sets=[fs])
