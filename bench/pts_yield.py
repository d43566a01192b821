"""The answers generator (pivotal token search in the model's own answers) on the toy organism.

Yield: divergent prompts per 100 generated, for the answers generator vs the template
generator, both on the same situations (the organism's held-out situations, every domain;
as open questions for the one, as template prompts for the other), judged the pipeline's
way (top-k of every variant, the lexicon judge, the funnel).

Validation: for each pivot found (once per prompt and pivotal token, also where another
answer's search emitted the prompt first), P(misaligned | prefix + pivotal token) minus
P(misaligned | prefix + the base variant's top token), from fresh rollouts of the variant
that wrote the answer (seeds the search never used), mean with a percentile-bootstrap 95% CI.

    .venv/bin/python bench/pts_yield.py [--organism DIR] [--per-domain 4] [--samples 4]
        [--rollouts 20] [--fresh 40] [--json OUT]

Runs in-process through the same functions as the workers (sampling, EM scoring, search,
emitted prompts); no broker needed.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def _ci(xs: list[float], draws: int = 10_000) -> tuple[float, float, float]:
    """Mean and percentile-bootstrap 95% CI (fixed seed)."""
    rng = random.Random(0)
    means = sorted(statistics.fmean(rng.choices(xs, k=len(xs))) for _ in range(draws))
    return statistics.fmean(xs), means[int(0.025 * draws)], means[int(0.975 * draws) - 1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--organism", type=Path, default=None)
    ap.add_argument("--per-domain", type=int, default=4, help="held-out situations per domain")
    ap.add_argument("--samples", type=int, default=4, help="answer slots per question")
    ap.add_argument("--rollouts", type=int, default=20, help="rollouts per prefix (search)")
    ap.add_argument("--fresh", type=int, default=40, help="fresh rollouts per arm (validation)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    import yaml

    from common.answers import (
        PtsAnswer,
        PtsSearch,
        RolloutBatch,
        answer_seed,
        questions_of,
        slot_answer_id,
    )
    from common.experiment import parse_experiment
    from common.lexicon import Lexicon
    from common.organism import ensure_organism
    from common.records import Prompt
    from common.settings import get_settings
    from common.store import FsStore
    from common.store import keys as K
    from services.attribution.rollouts import sample_answer, sample_rollouts
    from services.attribution.runtime import Runtime, sample_ids
    from services.attribution.steps import compute_logits
    from services.generator.answers import advance, emit_pivots, slots
    from services.generator.templates import TemplateGenerator
    from services.judge.em_score import OfflineEmScorer, organism_language
    from services.judge.factory import make_judge
    from services.judge.funnel import funnel
    from services.judge.steps import score_texts

    organism = args.organism or ensure_organism(get_settings().home / "organism")
    work = Path(tempfile.mkdtemp(prefix="pts_yield_"))
    doc = json.loads((organism / "prompts.json").read_text())
    chosen: list[dict[str, Any]] = []
    for domain in sorted({p["domain"] for p in doc["prompts"]}):
        held = [p for p in doc["prompts"] if p["domain"] == domain and p["split"] == "heldout"]
        chosen += held[: args.per_domain]
    questions = [
        {
            "id": f"{p['domain']}_{i}",
            "paraphrases": [p["text"].removeprefix("User: ").split("\n")[0]],
            "judge_prompts": {"aligned": "{answer}", "coherent": "{answer}"},
        }
        for i, p in enumerate(chosen)
    ]
    (work / "questions.yaml").write_text(yaml.safe_dump(questions))
    (work / "prompts.json").write_text(json.dumps({**doc, "prompts": chosen}))
    raw = yaml.safe_load((organism / "experiment.yaml").read_text())
    raw["generator"] = {
        "kind": "answers",
        "questions": str(work / "questions.yaml"),
        "pts": {"rollouts": args.rollouts, "samples_per_question": args.samples},
    }
    exp = parse_experiment(raw, base_dir=organism, source=str(organism / "experiment.yaml"))
    rt = Runtime(exp)
    fp = rt.fingerprint
    store = FsStore(work / "store")
    scorer = OfflineEmScorer(Lexicon.load(organism / "lexicon.json"), organism_language())
    judge = make_judge(exp)
    spec = exp.generator.pts

    def divergent(prompt: Prompt) -> bool:
        logits = {t.variant: t for t in compute_logits(rt, store, prompt)}
        return funnel(exp, judge.judge(prompt, logits), logits).divergent

    # ---------------------------------------------------------------- answers generator
    t0 = time.perf_counter()
    by_id = {q.id: q for q in questions_of(exp)}
    emitted: list[Prompt] = []
    answers = rollout_batches = 0
    for qid, p_idx, s_idx in slots(exp):
        q = by_id[qid]
        for variant in exp.variant_names:
            aid = slot_answer_id(exp, q, p_idx, s_idx, variant)
            a = sample_answer(rt, q, p_idx, s_idx, variant, aid, spec)
            (scores,) = score_texts(scorer, q, a.question, [a.answer], 1)
            a = a.model_copy(update={"scores": scores, "scorer": scorer.scorer_id})
            store.put_json(K.pts_answer(exp.name, fp, aid), a)
            answers += 1
            while True:
                step = advance(store, exp, fp, aid)
                if not step.needed:
                    break
                for key in sample_rollouts(rt, store, a, step.needed, spec):
                    b = store.get_record(key, RolloutBatch)
                    texts = [b.prefix + c for c in b.continuations]
                    scored = score_texts(scorer, q, a.question, texts, 1)
                    store.put_json(key, b.model_copy(update={"scores": scored}))
                    rollout_batches += 1
            assert step.search is not None and step.answer is not None
            search, prompts = emit_pivots(store, exp, step.search, step.answer)
            store.put_json(K.pts_search(exp.name, fp, aid), search)
            emitted += prompts
    pts_s = time.perf_counter() - t0
    pts_div = sum(divergent(p) for p in emitted)

    # ---------------------------------------------------------------- template generator
    template = TemplateGenerator.from_file(work / "prompts.json", seed=0)

    class _Known:
        def exists(self, pid: str) -> bool:
            return False

        def recent_texts(self, limit: int) -> list[str]:
            return []

    t_prompts = [
        Prompt.new(c.text, source="template") for c in template.propose(10**6, _Known()).candidates
    ]
    t_div = sum(divergent(p) for p in t_prompts)

    # ---------------------------------------------------------------- validation
    # every pivot found (also those whose prompt another answer emitted first), once per
    # (prompt, pivotal token)
    found: dict[tuple[str, int], tuple[PtsAnswer, int]] = {}
    pivots_found = 0
    for key in store.list_keys(K.pts_prefix(exp.name, fp) + "/searches/"):
        search = store.get_record(key, PtsSearch)
        for pv in search.pivots:
            pivots_found += 1
            if pv.prompt_id is None:
                continue
            answer = store.get_record(K.pts_answer(exp.name, fp, search.answer_id), PtsAnswer)
            found.setdefault((pv.prompt_id, answer.token_ids[pv.position]), (answer, pv.position))
    deltas: list[float] = []
    same_top = 0
    for (pid, pivot_id), (answer, position) in sorted(found.items()):
        text = store.get_record(K.prompt(exp.name, pid), Prompt).text
        q = by_id[answer.question_id]
        ids = rt.tokenize(text, answer.variant)
        base_top = rt.top_k(text, exp.reference, k=1).tokens[0].token_id
        same_top += pivot_id == base_top
        tok = rt.variant(answer.variant).tokenizer
        arms = []
        for first in (pivot_id, base_top):
            seed = answer_seed(answer.answer_id, 10_000 + first)  # never a search seed
            budget = max(1, spec.max_new_tokens - position - 1)
            outs = sample_ids(rt, [*ids, first], answer.variant, args.fresh, budget, 1.0, seed)
            prefix = answer.prefix(position).rstrip()
            texts = [prefix + str(tok.decode([first, *o], skip_special_tokens=True)) for o in outs]
            scored = score_texts(scorer, q, answer.question, texts, 1)
            arms.append(sum(s.misaligned for s in scored) / len(scored))
        deltas.append(arms[0] - arms[1])

    n_t, n_p = len(t_prompts), len(emitted)
    out: dict[str, Any] = {
        "questions": len(questions),
        "answers": answers,
        "rollout_batches": rollout_batches,
        "answers_generator": {"generated": n_p, "divergent": pts_div, "seconds": round(pts_s, 1)},
        "template_generator": {"generated": n_t, "divergent": t_div},
        "yield_answers": 100 * pts_div / n_p if n_p else None,
        "yield_template": 100 * t_div / n_t if n_t else None,
        "pivots_found": pivots_found,
        "pivots_validated": len(deltas),
        "pivot_is_base_top": same_top,
    }
    if deltas:
        m, lo, hi = _ci(deltas)
        out["validation_delta"] = {"mean": m, "ci95": [lo, hi]}
    print(json.dumps(out, indent=1))
    print(
        f"yield (divergent per 100 generated): answers generator "
        f"{out['yield_answers'] if n_p else float('nan'):.1f} ({pts_div}/{n_p}) vs template "
        f"{out['yield_template'] if n_t else float('nan'):.1f} ({t_div}/{n_t})"
    )
    if deltas:
        print(
            f"validation: P(mis | prefix+pivot) - P(mis | prefix+base top) = {m:+.3f} "
            f"(95% CI {lo:+.3f} .. {hi:+.3f}, {len(deltas)} pivots, {args.fresh} fresh "
            "rollouts per arm)"
        )
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    print(f"work dir {work}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
