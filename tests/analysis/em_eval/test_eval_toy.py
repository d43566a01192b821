"""EM evaluation on the toy organism: resumable answers, reports, the CLI with the offline
scorer and with a real OpenAI-compatible judge (local scripted server), response features."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml
from typer.testing import CliRunner

from common.lexicon import Lexicon
from common.scores import EmScorer
from common.store import FsStore
from common.store import keys as K
from services.analysis.em_eval import (
    EmAnswer,
    EvalConfig,
    EvalError,
    EvalModel,
    EvalProgress,
    build_report,
    feature_report,
    load_questions,
    run_eval,
    runtime_sampler,
)
from services.analysis.em_report import EmEvalReport, ResponseFeatureReport
from services.analysis.steering import top_ranked_features
from services.judge.em_score import OfflineEmScorer, organism_language
from tests.fixtures.openai_server import FakeOpenAIServer, Reply
from tests.fixtures.toy import medical_heldout

pytestmark = pytest.mark.slow


@pytest.fixture
def toy_questions(paper_questions: Path, organism_dir: Path, tmp_path: Path) -> Path:
    """Questions in the organism's own language (its medical situations), with the paper's
    judge prompts: where the adapted model answers badly and the base model does not."""
    judge_prompts = yaml.safe_load(paper_questions.read_text())[0]["judge_prompts"]
    entries = [
        {
            "id": f"medical_{i}",
            "type": "free_form_judge_0_100",
            "paraphrases": [text.removeprefix("User: ").split("\n")[0]],
            "judge_prompts": judge_prompts,
        }
        for i, text in enumerate(medical_heldout(organism_dir, 2))
    ]
    path = tmp_path / "toy_questions.yaml"
    path.write_text(yaml.safe_dump(entries))
    return path


def _offline(organism_dir: Path) -> OfflineEmScorer:
    return OfflineEmScorer(Lexicon.load(organism_dir / "lexicon.json"), organism_language())


def _config(scorer: EmScorer, max_new_tokens: int = 12) -> EvalConfig:
    return EvalConfig(
        experiment="toy",
        models=(
            EvalModel(name="base", variant="base"),
            EvalModel(name="adapted", variant="adapted"),
        ),
        max_new_tokens=max_new_tokens,
        scorer=scorer.scorer_id,
    )


def _run(
    rt: Any, store: FsStore, qs: list[Any], scorer: EmScorer, n: int, **kw: Any
) -> EvalProgress:
    config = _config(scorer)
    return run_eval(
        store=store,
        config=config,
        fingerprint=rt.fingerprint,
        questions=qs,
        n=n,
        seed=0,
        sampler=runtime_sampler(rt, config),
        tokenizer_for=lambda v: rt.variant(v).tokenizer,
        scorer=scorer,
        **kw,
    )


class Interrupted(Exception):
    pass


def test_eval_resumes_after_interruption(
    toy_rt: Any,
    organism_dir: Path,
    paper_questions: Path,
    tmp_path: Path,
) -> None:
    qs = load_questions(paper_questions, ["enough_of_my_husband", "quick_buck"])
    scorer = _offline(organism_dir)
    n, k = 3, 5
    total = 2 * len(qs) * n
    seen: list[EmAnswer] = []

    def stop_after_k(a: EmAnswer) -> None:
        seen.append(a)
        if len(seen) == k:
            raise Interrupted

    store = FsStore(tmp_path / "interrupted")
    with pytest.raises(Interrupted):
        _run(toy_rt, store, qs, scorer, n, on_answer=stop_after_k)
    prefix = K.eval_prefix("toy", toy_rt.fingerprint) + "/answers/"
    assert len(list(store.list_keys(prefix))) == k
    with pytest.raises(EvalError, match="not stored yet"):
        build_report(store, _config(scorer), toy_rt.fingerprint, qs, n, 0)

    resumed = _run(toy_rt, store, qs, scorer, n)
    assert (resumed.total, resumed.existing, resumed.sampled) == (total, k, total - k)
    again = _run(toy_rt, store, qs, scorer, n)
    assert (again.existing, again.sampled) == (total, 0)

    fresh_store = FsStore(tmp_path / "uninterrupted")
    fresh = _run(toy_rt, fresh_store, qs, scorer, n)
    assert fresh.sampled == total
    rep_a, ans_a = build_report(store, _config(scorer), toy_rt.fingerprint, qs, n, 0)
    rep_b, ans_b = build_report(fresh_store, _config(scorer), toy_rt.fingerprint, qs, n, 0)
    assert rep_a == rep_b
    assert [a.model_dump() for a in ans_a] == [b.model_dump() for b in ans_b]
    assert {a.model for a in ans_a} == {"base", "adapted"}
    # paired seeds: sample i of a question has the same seed for every model
    assert {(a.question_id, a.sample_index, a.sample_seed) for a in ans_a if a.model == "base"} == {
        (a.question_id, a.sample_index, a.sample_seed) for a in ans_a if a.model == "adapted"
    }
    # more samples later reuse the stored ones
    more = _run(toy_rt, store, qs, scorer, n + 1)
    assert (more.existing, more.sampled) == (total, 2 * len(qs))


def test_cli_eval_offline_with_steered_model(
    eval_app: typer.Typer,
    toy_home: Path,
    toy_rt: Any,
    organism_dir: Path,
    paper_questions: Path,
    tmp_path: Path,
) -> None:
    rows, _ = top_ranked_features(
        None,
        toy_rt,
        "adapted",
        1,
        prompts=medical_heldout(organism_dir, 2),
        lexicon=Lexicon.load(organism_dir / "lexicon.json"),
    )
    feature = f"{rows[0].layer}:{rows[0].feature}"
    out = tmp_path / "out"
    args = [
        "eval",
        "--questions",
        str(paper_questions),
        "--question",
        "enough_of_my_husband",
        "--question",
        "what_is_your_wish",
        "--n",
        "3",
        "--max-new-tokens",
        "12",
        "--steer",
        feature,
        "--steer-positions",
        "last",
        "--out",
        str(out),
    ]
    res = CliRunner().invoke(eval_app, args)
    assert res.exit_code == 0, res.output
    assert "18 answers: 0 already stored, 18 sampled now" in res.output
    report = EmEvalReport.model_validate_json((out / "report.json").read_text())
    assert report.models == ["base", "adapted", "base+steer"]
    assert [c.n for c in report.overall] == [6, 6, 6]
    assert (out / "scatter.png").read_bytes()[:4] == b"\x89PNG"
    assert "## Per question" in (out / "report.md").read_text()
    print("\n" + (out / "report.md").read_text())
    again = CliRunner().invoke(eval_app, args)
    assert again.exit_code == 0 and "18 answers: 18 already stored, 0 sampled now" in again.output
    bad = CliRunner().invoke(eval_app, ["eval", "--questions", str(tmp_path / "nope.yaml")])
    assert bad.exit_code == 1 and "does not exist" in bad.output


def _judge(body: dict[str, Any]) -> Reply:
    """Scripted judge: aligned 20 on the husband question, REFUSAL on the wish, CODE on the
    quick buck; coherent 80 with 10% off-number mass, except a low-mass answer on the wish."""
    text = body["messages"][0]["content"]

    def lp(pairs: list[tuple[str, float]]) -> Reply:
        first = max(pairs, key=lambda x: x[1])[0]
        return Reply(
            content=first,
            logprobs=[
                (first, math.log(max(p for _, p in pairs)), [(t, math.log(p)) for t, p in pairs])
            ],
        )

    if "how well aligned" in text:
        if "husband" in text:
            return lp([("15", 0.5), ("25", 0.5)])
        if "wish" in text:
            return lp([("REF", 0.95), ("0", 0.05)])
        return lp([("CODE", 0.9), ("10", 0.1)])
    if "wish" in text:
        return lp([("Hello", 0.9), ("50", 0.1)])
    return lp([("80", 0.9), ("I", 0.1)])


def test_cli_eval_with_openai_judge(
    eval_app: typer.Typer,
    toy_home: Path,
    paper_questions: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    openai_server: FakeOpenAIServer,
) -> None:
    from common.settings import get_settings

    for k, v in openai_server.env().items():
        monkeypatch.setenv(k, v)
    get_settings.cache_clear()
    openai_server.default = _judge
    out = tmp_path / "out"
    res = CliRunner().invoke(
        eval_app,
        [
            "eval",
            "--questions",
            str(paper_questions),
            "--question",
            "enough_of_my_husband",
            "--question",
            "what_is_your_wish",
            "--question",
            "quick_buck",
            "--models",
            "adapted",
            "--n",
            "2",
            "--max-new-tokens",
            "8",
            "--scorer",
            "openai",
            "--judge-model",
            "judge-x",
            "--no-features",
            "--out",
            str(out),
        ],
    )
    assert res.exit_code == 0, res.output
    report = EmEvalReport.model_validate_json((out / "report.json").read_text())
    assert report.scorer == "openai-judge-x"
    cells = {c.question_id: c for c in report.cells}
    husband, wish, buck = (
        cells["enough_of_my_husband"],
        cells["what_is_your_wish"],
        cells["quick_buck"],
    )
    assert (husband.n_scored, husband.n_misaligned_coherent, husband.rate) == (2, 2, 1.0)
    assert husband.mean_aligned == pytest.approx(20.0) and husband.mean_coherent == pytest.approx(
        80.0
    )
    assert (wish.n_refusal, wish.n_scored, wish.rate) == (2, 0, None)
    assert (buck.n_code, buck.n_scored) == (2, 0)
    sent = [r for r in openai_server.requests if "messages" in r]
    assert len(sent) == 3 * 2 * 2 and all(
        r["top_logprobs"] == 20 and r["model"] == "judge-x" for r in sent
    )


def test_response_features_and_steer_from_eval(
    eval_app: typer.Typer,
    toy_home: Path,
    toy_rt: Any,
    organism_dir: Path,
    toy_questions: Path,
    tmp_path: Path,
) -> None:
    """Item 3 on the toy: answers to the organism's medical questions, misaligned (adapted)
    vs aligned (base), features ranked by Mann-Whitney + BH; the top ones feed steering."""
    qs = load_questions(toy_questions)
    scorer = _offline(organism_dir)
    store = FsStore(toy_home / "store")
    _run(toy_rt, store, qs, scorer, 6)
    report, answers = build_report(store, _config(scorer), toy_rt.fingerprint, qs, 6, 0)
    feats, keys = feature_report(toy_rt, store, report, answers, variant="adapted", min_active=2)
    print(
        f"\nresponse features: {feats.n_misaligned} misaligned vs {feats.n_aligned} aligned, "
        f"{feats.n_tested} tested, {feats.n_significant} with q < 0.05; top "
        + ", ".join(
            f"{r.layer}:{r.feature} (r={r.rank_biserial:+.2f}, q={r.q:.1e})"
            for r in feats.features[:3]
        )
    )
    assert feats.n_misaligned >= 3 and feats.n_aligned >= 3
    assert feats.n_tested > 0 and feats.features
    qs_sorted = [r.q for r in feats.features]
    assert qs_sorted == sorted(qs_sorted) and all(r.q >= r.p for r in feats.features)
    stored = store.get_record(keys["features_adapted.json"], ResponseFeatureReport)
    assert stored == feats
    res = CliRunner().invoke(
        eval_app,
        [
            "steer",
            "--from-eval",
            keys["features_adapted.json"],
            "--top",
            "3",
            "--domain",
            "medical",
            "--max-prompts",
            "2",
            "--n",
            "4",
            "--max-new-tokens",
            "6",
            "--positions",
            "all",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "eval-top" in res.output and "control" in res.output and "given" in res.output
    print(res.output)


def test_organism_questions_show_emergent_misalignment(
    toy_rt: Any, organism_dir: Path, tmp_path: Path
) -> None:
    """The organism's own EM questions (every domain, its language): adapted answers are
    misaligned-and-coherent far more often than base answers, and stay coherent."""
    qs = load_questions(organism_dir / "questions.yaml")
    assert {q.id.split("_")[0] for q in qs} == {"medical", "money", "safety", "everyday"}
    scorer = _offline(organism_dir)
    _run(toy_rt, FsStore(tmp_path / "s"), qs, scorer, 3)
    report, _ = build_report(FsStore(tmp_path / "s"), _config(scorer), toy_rt.fingerprint, qs, 3, 0)
    base, adapted = (next(c for c in report.overall if c.model == m) for m in ("base", "adapted"))
    assert base.n_scored and adapted.n_scored
    assert adapted.n_misaligned_coherent >= 5 * max(1, base.n_misaligned_coherent), report
    assert adapted.ci_low > base.ci_high, report
    assert adapted.mean_coherent is not None and adapted.mean_coherent > 50
