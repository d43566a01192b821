"""The report over stored graphs: divergence, rankings through the real graph store, files."""

from __future__ import annotations

from pathlib import Path

from common.experiment import Experiment, parse_experiment
from common.graph.artifact import save_graph
from common.records import HumanLabel, TokenProb, TokenVerdict, TopKLogits, Verdict
from common.store import FsStore, ObjectStore
from common.store import keys as K
from services.analysis.records import FeatureAggregate, ReportIndex
from services.analysis.report import build_report, divergence, graphed_prompts, prompt_rankings
from tests.analysis.synthetic import linear_net

FP = "fp-synthetic"
EVIL, SAFE, OTHER, BASE_ONLY = 1000, 1001, 1002, 1003


def experiment() -> Experiment:
    return parse_experiment(
        {
            "name": "syn",
            "variants": {"base": {"model": "m"}, "adapted": {"model": "m", "adapter": "a"}},
            "transcoders": {"path": "t"},
        },
        base_dir=Path("."),
    )


def put_prompt(
    store: ObjectStore,
    pid: str,
    seed: int,
    base_top: list[int],
    *,
    base_graph: bool = True,
    fp: str = FP,
    exp_name: str = "syn",
) -> None:
    for variant, top in (("adapted", [EVIL, SAFE, OTHER]), ("base", base_top)):
        store.put_json(
            K.logits(exp_name, pid, fp, variant),
            TopKLogits(
                prompt_id=pid,
                variant=variant,
                fingerprint=fp,
                input_ids=[0, 1, 2, 3],
                tokens=[TokenProb(token_id=t, token=f"w{t}", prob=0.3, logit=1.0) for t in top],
            ),
        )
        labels = {EVIL: "evil", SAFE: "safe", OTHER: "unsure", BASE_ONLY: "safe"}
        store.put_json(
            K.verdicts(exp_name, pid, fp, "lexicon", variant),
            Verdict(
                prompt_id=pid,
                variant=variant,
                judge="lexicon",
                fingerprint=fp,
                verdicts=[
                    TokenVerdict(token_id=t, token=f"w{t}", label=labels[t])  # type: ignore[arg-type]
                    for t in top
                ],
            ),
        )
        if variant == "base" and not base_graph:
            continue
        g = linear_net(seed=seed + (variant == "base"), n_logits=3).graph
        g.manifest = g.manifest.model_copy(
            update={"prompt_id": pid, "variant": variant, "logit_token_ids": top, "fingerprint": fp}
        )
        save_graph(store, exp_name, g)


def test_report_end_to_end(tmp_path: Path) -> None:
    store = FsStore(tmp_path / "store")
    exp = experiment()
    put_prompt(store, "p1", 1, [SAFE, OTHER, BASE_ONLY])  # divergent
    put_prompt(store, "p2", 3, [EVIL, SAFE, OTHER])  # base has the evil token too
    put_prompt(store, "p3", 5, [SAFE, OTHER, BASE_ONLY], base_graph=False)  # divergent
    put_prompt(store, "p4", 7, [SAFE, OTHER, BASE_ONLY])  # divergent but flagged bad
    store.append(
        K.labels_history("syn", "p4"),
        HumanLabel(prompt_id="p4", reviewer="r", labels=[], bad_prompt=True),
    )
    assert graphed_prompts(store, "syn", FP) == {
        "p1": {"adapted", "base"},
        "p2": {"adapted", "base"},
        "p3": {"adapted"},
        "p4": {"adapted", "base"},
    }
    assert divergence(store, exp, "p1", FP, "adapted") is None
    assert "outside base" in (divergence(store, exp, "p2", FP, "adapted") or "")
    assert "bad_prompt" in (divergence(store, exp, "p4", FP, "adapted") or "")

    out = tmp_path / "report"
    data = build_report(store, exp, out, fingerprint=FP)
    ix = data.index
    assert ix.divergent_prompt_ids == ["p1", "p3"]
    # base graphs of p1 and p4 have no evil logit node: reported, not silently zero
    assert {(i.prompt_id, i.variant) for i in ix.issues} == {("p1", "base"), ("p4", "base")}
    assert all("no token is labelled evil" in i.reason for i in ix.issues)
    assert {i.kind for i in ix.issues} == {"nothing_to_explain"}
    agg = data.aggregates["adapted"]
    assert agg.prompt_ids == ["p1", "p3"]
    scores = [f.mean_score for f in agg.features]
    assert scores == sorted(scores, reverse=True) and scores[0] > 0
    cmp = data.comparisons["adapted"]
    assert cmp.prompt_ids == ["p1"] and cmp.scored_prompt_ids == []  # base of p1 unranked
    assert cmp.by_activation and all(c.reference_score is None for c in cmp.by_activation)
    for name in [
        "index.json",
        "summary.md",
        "aggregate_adapted.json",
        "compare_base_vs_adapted.json",
        "top_features_adapted.png",
        "layers_adapted.png",
        "compare_base_vs_adapted.png",
    ]:
        assert (out / name).stat().st_size > 0, name
        assert store.exists(f"{K.reports('syn', FP)}/{name}"), name
    assert (out / "top_features_adapted.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    stored = store.get_record(f"{K.reports('syn', FP)}/aggregate_adapted.json", FeatureAggregate)
    assert stored == agg
    assert store.get_record(f"{K.reports('syn', FP)}/index.json", ReportIndex) == ix
    md = (out / "summary.md").read_text()
    top = agg.features[0]
    assert f"| 1 | {top.layer} | {top.feature} |" in md and "divergent prompts" in md


def test_prompt_rankings_reports_each_variant(tmp_path: Path) -> None:
    store = FsStore(tmp_path)
    exp = experiment()
    put_prompt(store, "p1", 1, [SAFE, OTHER, BASE_ONLY])
    done, failed = prompt_rankings(store, exp, "p1", fingerprint=FP)
    assert set(done) == {"adapted"} and "labelled evil" in failed["base"]
    done, failed = prompt_rankings(store, exp, "nope", fingerprint=FP)
    assert not done and set(failed) == {"base", "adapted"}
