"""Validate the feature ranking on the toy organism, whose answer is known.

Ablates (sets to 0) the adapted variant's top-N ranked evil features on the held-out
divergent prompts and prints the mean drop of the harmful-token probability mass, next to
the drop from ablating N random active features. Target: top >= 80%, random < 10%.

    .venv/bin/python bench/validate_ranking.py [--organism DIR] [--top 10] [--draws 5] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--organism",
        type=Path,
        default=None,
        help="organism dir (default: built into <EMC_HOME>/organism)",
    )
    ap.add_argument("--top", type=int, default=10, help="features ablated per prompt")
    ap.add_argument("--draws", type=int, default=5, help="random draws per prompt")
    ap.add_argument(
        "--min-gap",
        type=float,
        default=0.1,
        help="adapted - base harmful mass to count as divergent",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-prompts", type=int, default=None)
    ap.add_argument("--json", type=Path, default=None, help="write per-prompt results here")
    args = ap.parse_args(argv)

    from common.experiment import load_experiment
    from common.organism import ensure_organism
    from common.settings import get_settings
    from services.analysis.validate import validate_ranking
    from services.attribution.runtime import Runtime

    organism = args.organism or ensure_organism(get_settings().home / "organism")
    exp = load_experiment(organism / "experiment.yaml")
    runtime = Runtime(exp)
    t0 = time.perf_counter()
    res = validate_ranking(
        runtime,
        organism,
        top_n=args.top,
        draws=args.draws,
        min_gap=args.min_gap,
        seed=args.seed,
        max_prompts=args.max_prompts,
        progress=lambda m: print(m, file=sys.stderr, end="\r"),
    )
    elapsed = time.perf_counter() - t0
    print(
        f"organism {organism} ({exp.fingerprint}); {res.n_heldout} held-out prompts, "
        f"{len(res.divergent)} divergent (gap >= {res.min_gap}), {len(res.skipped)} skipped"
    )
    print(
        f"{'base':>6} {'adapted':>7} {'top':>6} {'random':>6} {'all+':>6} "
        f"{'drop top':>8} {'drop rand':>9} {'drop all+':>9}  prompt"
    )
    for p in res.divergent:
        rand = sum(p.mass_after_random) / len(p.mass_after_random)
        print(
            f"{p.base_mass:6.3f} {p.adapted_mass:7.3f} {p.mass_after_top:6.3f} {rand:6.3f} "
            f"{p.mass_after_all_positive:6.3f} {p.drop_top:8.1%} {p.drop_random:9.1%} "
            f"{p.drop_all_positive:9.1%}  {p.text.splitlines()[0][:56]}"
        )
    print("mean signed score by node (d(P_evil - P_safe), probability units):")
    print("  " + ", ".join(f"{k} {v:+.2f}" for k, v in res.mean_score_by_node.items()))
    print(
        f"all positive-score features ablated (what features can carry at all): "
        f"harmful mass drop {res.mean_drop_all_positive:.1%}"
    )
    print(
        f"top-{res.top_n} ablation: harmful mass drop {res.mean_drop_top:.1%} (mean over prompts)"
    )
    print(
        f"random-{res.top_n} ablation: harmful mass drop {res.mean_drop_random:.1%} "
        f"(mean over prompts, {res.draws} draws each)"
    )
    print(f"elapsed {elapsed:.1f}s")
    if args.json:
        args.json.write_text(json.dumps(res.to_json(), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
