"""Validate the feature ranking on the toy organism, whose answer is known.

Ablates (sets to 0) the adapted variant's top-N ranked evil features on the held-out
divergent prompts and prints the mean drop of the harmful-token probability mass, next to
the drop from ablating N random active features. Target: top >= 80%, random < 10%.

Then the untrained domains (the organism's misalignment is emergent there): the adapted
graphs of divergent held-out prompts of money, safety and everyday are ranked and the
rankings aggregated; the top-N aggregate features (every position), N random active features
and the adapter node (LoRA delta off at the last position / everywhere) are ablated.
Targets: top-10 >= 80%, random < 10%, adapter node >= 90% of the adapter's harmful mass.

    .venv/bin/python bench/validate_ranking.py [--organism DIR] [--top 10] [--draws 5] [--per-domain 6] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any


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
    ap.add_argument(
        "--per-domain",
        type=int,
        default=6,
        help="divergent prompts per untrained domain in the aggregate ranking (0: skip)",
    )
    ap.add_argument("--json", type=Path, default=None, help="write per-prompt results here")
    args = ap.parse_args(argv)

    from common.experiment import load_experiment
    from common.organism import ensure_organism
    from common.settings import get_settings
    from services.analysis.validate import validate_ranking, validate_untrained
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
    out = {"trained_domain": res.to_json()}
    if args.per_domain > 0:
        t1 = time.perf_counter()
        un = validate_untrained(
            runtime,
            organism,
            top_n=args.top,
            draws=args.draws,
            min_gap=args.min_gap,
            seed=args.seed,
            per_domain=args.per_domain,
            progress=lambda m: print(m, file=sys.stderr, end="\r"),
        )
        print_untrained(un)
        elapsed += time.perf_counter() - t1
        out["untrained_domains"] = un.to_json()
    print(f"elapsed {elapsed:.1f}s")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


def print_untrained(un: Any) -> None:
    """The untrained-domain figures: aggregate ranking, top / random / adapter-node ablation."""
    by = {d: sum(1 for p in un.prompts if p.domain == d) for d in un.domains}
    print(
        f"\nuntrained domains ({', '.join(f'{d} {n}' for d, n in by.items())} divergent "
        f"prompts; aggregate ranking over all {len(un.prompts)})"
    )
    place = "absent" if un.adapter_rank is None else f"#{un.adapter_rank + 1}"
    print(f"  adapter node in the aggregate ranking: {place}")
    print("  top aggregate features (layer/feature, mean score, |cos(encoder, persona)|):")
    for (layer, feat, score), c in zip(un.top, un.top_persona_cos, strict=True):
        print(f"    L{layer}/{feat:<4} {score:+.3f}  {c:.2f}")
    print(f"  chance |cos| with the persona direction: {un.random_persona_cos:.2f}")
    print(
        f"{'domain':>9} {'base':>6} {'adapted':>7} {'top':>6} {'random':>6} {'ad.last':>7}  prompt"
    )
    for p in un.prompts:
        rand = sum(p.mass_after_random) / len(p.mass_after_random)
        print(
            f"{p.domain:>9} {p.base_mass:6.3f} {p.adapted_mass:7.3f} {p.mass_after_top:6.3f} "
            f"{rand:6.3f} {p.mass_adapter_off_last:7.3f}  {p.text.splitlines()[0][:50]}"
        )
    print(
        f"  top-{un.top_n} aggregate features ablated (every position): harmful mass drop "
        f"{un.drop_top:.1%} (adapter's mass: {un.adapter_drop_top:.1%})"
    )
    print(
        f"  random-{un.top_n} active features ablated ({un.draws} draws): harmful mass drop "
        f"{un.drop_random:.1%} (adapter's mass: {un.adapter_drop_random:.1%})"
    )
    print(
        f"  adapter node ablated (LoRA delta off): at the last position, adapter's harmful "
        f"mass removed {un.adapter_drop_last:.1%}; at every position {un.adapter_drop_all:.1%}"
    )


if __name__ == "__main__":
    raise SystemExit(main())
