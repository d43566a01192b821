"""Mining on the real-format stand-in, offline, through real worker processes: hub names,
the Llama-3 chat format, hf:// transcoders, a PEFT LoRA; mine -> graphs -> ranking."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from common.cli.pipeline import mine_batch
from common.context import make_context
from common.pipeline import FINAL
from common.records import FeatureRanking, GraphManifest, Status
from common.settings import Settings, StoreSettings
from common.store import keys as K
from tests.fixtures.openai_server import FakeOpenAIServer, Reply
from tests.fixtures.real_format import RealFormat, offline_env
from tests.fixtures.servers import WorkerProcess, worker_env
from tests.system.test_e2e import start_workers


def first_candidate_evil(body: dict[str, Any]) -> Reply | str:
    """A judge that calls the first candidate (the adapted model's top token) evil."""
    user = body["messages"][-1]["content"]
    cands = re.findall(r"^(\d+): (\".*\")$", user, flags=re.M)
    verdicts = [
        {
            "index": int(i),
            "token": json.loads(q),
            "label": "evil" if i == "0" else "safe",
            "reason": "scripted",
        }
        for i, q in cands
    ]
    return json.dumps({"verdicts": verdicts})


def test_mine_graphs_and_ranking_on_the_real_format(
    real_format: RealFormat,
    tmp_path: Path,
    redis_url: str,
    openai_server: FakeOpenAIServer,
    celery_worker_factory: Callable[..., WorkerProcess],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    offline_env(real_format, monkeypatch)
    openai_server.default = first_candidate_evil
    exp_path = real_format.write_experiment(
        tmp_path / "exp.yaml",
        prompt_format="chat",
        judge={"kind": "openai", "model": "scripted", "concurrency": 2},
        generator={"kind": "template", "batch_size": 3},
        attribution={"max_feature_nodes": 96},
    )
    store = StoreSettings(kind="fs", root=tmp_path / "store")
    env = worker_env(
        redis_url,
        tmp_path / "home",
        store,
        visibility_timeout_s=300,
        EMC_EXPERIMENT=str(exp_path),
        EMC_OPENAI_BASE_URL=openai_server.base_url,
        EMC_OPENAI_API_KEY="k",
        **real_format.env(),
    )
    start_workers(celery_worker_factory, env)
    ctx = make_context(
        Settings(home=tmp_path / "home", broker_url=redis_url, store=store, experiment=exp_path)
    )
    result = mine_batch(ctx, 3, timeout_s=600, chunk=3)
    assert len(result) == 3 and all(s in FINAL for s in result.values()), result
    analyzed = [p for p, s in result.items() if s == Status.analyzed]
    assert analyzed, {p: ctx.queue.reason(p) for p in result}
    for pid in analyzed:
        ranking = ctx.store.get_record(
            K.features(ctx.exp.name, pid, ctx.fingerprint, "adapted"), FeatureRanking
        )
        assert ranking.features and ranking.evil_token_ids
        manifest = ctx.store.get_record(
            K.graph_manifest(ctx.exp.name, pid, ctx.fingerprint, "adapted"), GraphManifest
        )
        assert manifest.input_ids[:2] == [128000, 128006]  # one BOS, then the chat header
