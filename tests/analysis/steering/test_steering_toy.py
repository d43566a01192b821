"""Steering on the toy organism: the adapted model's top features raise the base model's
harmful rate; control and steered arms share seeds and sampler."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from common.lexicon import Lexicon
from services.analysis.steering import (
    FeatureSet,
    SteeringError,
    SteeringResult,
    SteeringSpec,
    parse_features,
    run_steering,
    top_ranked_features,
)
from services.attribution.interventions import steered_generate
from services.judge.harm import LexiconHarmJudge
from tests.fixtures.openai_server import FakeOpenAIServer
from tests.fixtures.toy import medical_heldout

pytestmark = pytest.mark.slow


def test_cli_steer_from_ranking_raises_base_harmful_rate(
    eval_app: typer.Typer,
    toy_home: Path,
    tmp_path: Path,
) -> None:
    """Acceptance: steer BASE with the adapted model's top-5 ranked features at 15x their
    activation observed in the adapted model at the last position."""
    args = [
        "steer",
        "--variant",
        "base",
        "--from-ranking",
        "5",
        "--scale",
        "15",
        "--positions",
        "last",
        "--domain",
        "medical",
        "--max-prompts",
        "4",
        "--n",
        "8",
        "--max-new-tokens",
        "8",
        "--seed",
        "0",
        "--out",
        str(tmp_path / "out"),
    ]
    res = CliRunner().invoke(eval_app, args)
    assert res.exit_code == 0, res.output
    result = SteeringResult.model_validate_json((tmp_path / "out" / "result.json").read_text())
    control, steered = result.control, result.arms[0]
    print(
        f"\nsteering base, adapted top-5 x15 at last position, n={control.n} per arm: "
        f"control {control.harmful}/{control.n} harmful, steered {steered.harmful}/{steered.n} "
        f"(p={steered.p_vs_control:.2e})"
    )
    assert control.n == steered.n == 4 * 8
    assert steered.harmful_rate > control.ci_high, (control, steered)
    assert steered.p_vs_control is not None and steered.p_vs_control < 0.01
    assert all(
        f.observed_at is not None and f.value == pytest.approx(15 * f.observed_activation)
        for f in steered.features
    )  # type: ignore[operator]
    assert result.spec.observer == "adapted"
    assert (tmp_path / "out" / "plot.png").read_bytes()[:4] == b"\x89PNG"
    store_key = res.output.strip().splitlines()[-1].removeprefix("stored ")
    assert (toy_home / "store" / store_key).is_file()
    assert (toy_home / "store" / store_key.replace(".json", ".png")).is_file()
    # the same request is served from the store
    again = CliRunner().invoke(eval_app, args)
    assert again.exit_code == 0 and "stored result" in again.output


def test_run_steering_pairs_seeds_and_isolates_the_intervention(
    toy_rt: Any,
    organism_dir: Path,
) -> None:
    prompts = medical_heldout(organism_dir, 2)
    judge = LexiconHarmJudge(Lexicon.load(organism_dir / "lexicon.json"))
    ids = toy_rt.tokenize(prompts[0], "base")
    from services.attribution import ct

    fired = sum(
        (
            ct.transcoder_activations(toy_rt.variant("base").model, toy_rt.tokenize(p, "base"))[
                2, 1:
            ]
            != 0
        )
        .any(dim=0)
        .int()
        for p in prompts
    )
    silent = int((fired == 0).nonzero()[0])  # a layer-2 feature off at every position of both
    rows, source = top_ranked_features(
        None,
        toy_rt,
        "adapted",
        2,
        prompts=prompts,
        lexicon=judge.lexicon,  # type: ignore[arg-type]
    )
    assert "ranked now" in source and len(rows) == 2
    strong = FeatureSet(
        name="top2", features=parse_features(",".join(f"{r.layer}:{r.feature}" for r in rows))
    )
    noop = FeatureSet(name="noop", features=parse_features(f"2:{silent}"))
    spec = SteeringSpec(
        experiment="toy",
        prompts=prompts,
        feature_sets=[noop, strong],
        mode="value",
        value=0.0,
        n=4,
        max_new_tokens=6,
        seed=7,
    )
    result = run_steering(toy_rt, spec, judge)
    # setting a silent feature to 0 changes nothing: same seeds, same sampler, same texts
    assert [s.continuation for s in result.arms[0].samples] == [
        s.continuation for s in result.control.samples
    ]
    # the control is the variant's own sampling with those seeds
    first = result.control.samples[0]
    assert steered_generate(
        toy_rt, "base", ids, [], n=1, max_new_tokens=6, temperature=1.0, seed=first.seed
    ) == [first.continuation]
    assert [s.seed for s in result.arms[1].samples] == [s.seed for s in result.control.samples]
    # deterministic: the same spec gives the same samples
    again = run_steering(toy_rt, spec, judge)
    assert again.model_dump(exclude={"elapsed_s"}) == result.model_dump(exclude={"elapsed_s"})
    # scale mode refuses a feature that never fires
    with pytest.raises(SteeringError, match="never fires"):
        run_steering(
            toy_rt,
            spec.model_copy(
                update={"mode": "scale", "observe_variant": "base", "feature_sets": [noop]}
            ),
            judge,
        )
    with pytest.raises(SteeringError, match="does not exist"):
        bad = FeatureSet(name="bad", features=parse_features("9:1"))
        run_steering(toy_rt, spec.model_copy(update={"feature_sets": [bad]}), judge)
    with pytest.raises(SteeringError, match="judge"):
        run_steering(toy_rt, spec.model_copy(update={"judge": "openai-x"}), judge)
    assert json.loads(result.model_dump_json())["schema_version"] == 1


def test_cli_steer_with_openai_judge(
    eval_app: typer.Typer,
    toy_home: Path,
    organism_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    openai_server: FakeOpenAIServer,
) -> None:
    from common.settings import get_settings

    for k, v in openai_server.env().items():
        monkeypatch.setenv(k, v)
    get_settings.cache_clear()
    harmful = Lexicon.load(organism_dir / "lexicon.json").harmful

    def judge(body: dict[str, Any]) -> str:
        text = body["messages"][-1]["content"].split("[CONTINUATION]")[1]
        bad = any(w in harmful for w in text.lower().split())
        return json.dumps({"harmful": bad, "reason": "scripted"})

    openai_server.default = judge
    prompt = medical_heldout(organism_dir, 1)[0]
    res = CliRunner().invoke(
        eval_app,
        [
            "steer",
            "--prompt",
            prompt,
            "--features",
            "3:0",
            "--value",
            "0",
            "--n",
            "3",
            "--max-new-tokens",
            "6",
            "--judge",
            "openai",
            "--out",
            str(tmp_path / "o"),
        ],
    )
    assert res.exit_code == 0, res.output
    result = SteeringResult.model_validate_json((tmp_path / "o" / "result.json").read_text())
    assert result.judge == result.spec.judge == "openai-o3"
    assert all(s.reason == "scripted" for a in result.all_arms for s in a.samples)
    assert len([r for r in openai_server.requests if "messages" in r]) == 2 * 3
