"""GPU-queue tasks besides the pipeline steps, through real worker processes over Redis:
the review UI's continuations and a steering run (gpu -> judge -> analysis)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from common import tasknames as T
from common.context import make_context
from common.pipeline import Next, send_all
from common.records import Prompt, TopKLogits
from common.settings import Settings, StoreSettings
from common.store import keys as K
from common.store.base import dumps
from services.analysis.steering import (
    FeatureSet,
    SteeringResult,
    SteeringSpec,
    parse_features,
)
from tests.fixtures.servers import WorkerProcess, wait_until, worker_env
from tests.system.test_e2e import organism_experiment

pytestmark = pytest.mark.slow


def test_continuations_and_steering_tasks(
    organism_dir: Path,
    tmp_path: Path,
    redis_url: str,
    celery_worker_factory: Callable[..., WorkerProcess],
) -> None:
    exp_path = organism_experiment(organism_dir, tmp_path / "exp.yaml", name="gputasks")
    store = StoreSettings(kind="fs", root=tmp_path / "store")
    env = worker_env(
        redis_url, tmp_path / "home", store, visibility_timeout_s=120, EMC_EXPERIMENT=str(exp_path)
    )
    celery_worker_factory(
        list(T.GPU_QUEUES), env, include=(), pool="solo", name="gpu", ready_timeout_s=90
    )
    # a steering run is sampled on gpu_fast, judged on judge and counted on analysis
    celery_worker_factory(["judge"], env, include=(), pool="solo", name="judge")
    celery_worker_factory(["analysis"], env, include=(), pool="solo", name="analysis")
    ctx = make_context(
        Settings(home=tmp_path / "home", broker_url=redis_url, store=store, experiment=exp_path)
    )
    doc = json.loads((organism_dir / "prompts.json").read_text())
    text = next(p["text"] for p in doc["prompts"] if p["domain"] == "medical")
    prompt = Prompt.new(text, source="test")
    ctx.store.put_new(K.prompt("gputasks", prompt.id), dumps(prompt))

    # logits first (the UI only offers continuations after a top-k token)
    send_all(ctx, [Next(T.GPU_LOGITS, {"exp": "gputasks", "prompt_id": prompt.id})])
    logits_key = K.logits("gputasks", prompt.id, ctx.fingerprint, "adapted")
    wait_until(lambda: ctx.store.exists(logits_key), 120, "top-k logits")
    token = ctx.store.get_record(logits_key, TopKLogits).tokens[0]
    send_all(
        ctx,
        [
            Next(
                T.GPU_CONTINUATIONS,
                {
                    "exp": "gputasks",
                    "prompt_id": prompt.id,
                    "variant": "adapted",
                    "token_id": token.token_id,
                    "n": 3,
                },
            )
        ],
    )
    samples_key = K.samples("gputasks", prompt.id, ctx.fingerprint, "adapted", token.token_id)
    wait_until(lambda: ctx.store.exists(samples_key), 120, "continuations")
    samples = ctx.store.get_json(samples_key)
    assert samples["schema_version"] == 1 and len(samples["continuations"]) == 3
    assert all(isinstance(c, str) for c in samples["continuations"])

    spec = SteeringSpec(
        experiment="gputasks",
        prompts=[text],
        feature_sets=[FeatureSet(name="two", features=parse_features("2:0,3:0"))],
        mode="value",
        value=5.0,
        n=3,
        max_new_tokens=4,
    )
    send_all(ctx, [Next(T.GPU_STEER, {"exp": "gputasks", "spec": spec.model_dump(mode="json")})])
    key = K.steering_result("gputasks", ctx.fingerprint, spec.spec_hash)
    wait_until(lambda: ctx.store.exists(key), 180, "steering result")
    result = ctx.store.get_record(key, SteeringResult)
    assert result.control.n == 3 and result.arms[0].n == 3
    wait_until(
        lambda: ctx.store.exists(K.steering_plot("gputasks", ctx.fingerprint, spec.spec_hash)),
        30,
        "steering plot",
    )
