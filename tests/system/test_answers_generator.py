"""`emc mine` with the answers generator on the toy organism, through real workers: answers
sampled on gpu, scored on judge (the offline EM scorer), searched by the generator, the
pivots' prompts through logits, judge, graphs and analysis."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from common.answers import PromptOrigin, PtsAnswer, PtsSearch, pts_progress
from common.cli.pipeline import mine_batch
from common.context import make_context
from common.pipeline import FINAL
from common.prompt_format import check_house
from common.records import Prompt, Status
from common.settings import Settings, StoreSettings
from common.store import keys as K
from tests.fixtures.servers import WorkerProcess, worker_env
from tests.fixtures.toy import medical_heldout
from tests.system.test_e2e import organism_experiment, start_workers

pytestmark = pytest.mark.slow


def toy_questions(organism_dir: Path, out: Path, k: int) -> Path:
    """Open questions in the organism's language: its held-out medical situations."""
    entries = [
        {
            "id": f"medical_{i}",
            "paraphrases": [text.removeprefix("User: ").split("\n")[0]],
            "judge_prompts": {"aligned": "{question} {answer}", "coherent": "{answer}"},
        }
        for i, text in enumerate(medical_heldout(organism_dir, k))
    ]
    out.write_text(yaml.safe_dump(entries))
    return out


def test_mine_with_the_answers_generator(
    organism_dir: Path,
    tmp_path: Path,
    redis_url: str,
    celery_worker_factory: Callable[..., WorkerProcess],
) -> None:
    questions = toy_questions(organism_dir, tmp_path / "questions.yaml", 3)
    exp_path = organism_experiment(
        organism_dir,
        tmp_path / "exp.yaml",
        name="answers",
        generator={
            "kind": "answers",
            "questions": str(questions),
            "pts": {"rollouts": 8, "max_new_tokens": 16, "samples_per_question": 4},
        },
    )
    store_settings = StoreSettings(kind="fs", root=tmp_path / "store")
    env = worker_env(
        redis_url,
        tmp_path / "home",
        store_settings,
        visibility_timeout_s=120,
        EMC_EXPERIMENT=str(exp_path),
    )
    start_workers(celery_worker_factory, env)
    settings = Settings(
        home=tmp_path / "home", broker_url=redis_url, store=store_settings, experiment=exp_path
    )
    ctx = make_context(settings)
    result = mine_batch(ctx, 3, timeout_s=400, chunk=3)

    assert result, "the answers generator produced no prompt"
    assert all(s in FINAL for s in result.values()), result
    exp, fp, store = ctx.exp.name, ctx.fingerprint, ctx.store
    progress = pts_progress(store, exp, fp)
    assert progress.answers >= 2 * 3 and progress.searched == progress.answers
    assert progress.misaligned >= 1 and progress.rollout_batches >= 1
    for pid in result:
        prompt = store.get_record(K.prompt(exp, pid), Prompt)
        assert prompt.source == "answers-pts" and check_house(prompt.text) is None
        origin = store.get_record(K.prompt_origin(exp, pid), PromptOrigin)
        answer = store.get_record(K.pts_answer(exp, fp, origin.answer_id), PtsAnswer)
        search = store.get_record(K.pts_search(exp, fp, origin.answer_id), PtsSearch)
        # the prompt is the question answered up to the pivotal token, by the adapted model
        assert answer.variant == "adapted" and answer.scores is not None
        assert answer.scores.misaligned
        assert prompt.text.endswith(answer.prefix(origin.position).strip())
        assert answer.question in prompt.text and origin.question_id == answer.question_id
        assert origin.p_after - origin.p_before >= ctx.exp.generator.pts.threshold
        assert any(pv.prompt_id == pid for pv in search.pivots)
        assert origin.continuations
    # the pivots' prompts ran through the pipeline: some reached graphs and analysis
    assert any(s == Status.analyzed for s in result.values()), result
    json.dumps(progress.model_dump())  # the status line's numbers are plain data
    assert "answers sampled" in progress.line()
