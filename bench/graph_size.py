"""Bytes of a stored emc graph vs circuit-tracer's ``Graph.to_pt`` for the same graph.

Two targets, each at its experiment's own limits:

- ``toy``: the toy organism (built if needed), the first prompts of its ``prompts.json``;
- ``realfmt``: the real-format stand-in (tiny random Llama-3.2 with the real tokenizer and
  chat template, circuit-tracer-format transcoders, a PEFT LoRA, offline hub cache), fixed
  chat prompts (``bench/gpu_real_scale.PROMPTS``). Its weights are random, so it prunes like random weights do (nearly every
  edge kept), not like a trained model; it is here so that the ratio on a real format is
  known, not as the figure the goal is about.

For every prompt and variant it computes the graph once, writes it with ``Graph.to_pt`` (a
pickle, only measured here) and with emc's artifact (safetensors + manifest JSON), and prints
both sizes, their ratio and the share of feature edges kept. Goals on the toy: the worst
base graph <= 0.10 of ``to_pt``, the worst adapted graph <= 0.20 (the organism's persona latent
is on at every position, so pruning keeps more of its edges; tests hold the same bounds).

    .venv/bin/python bench/graph_size.py [--targets toy,realfmt] [--organism DIR] [--prompts 4]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def measure(rt: Any, exp: Any, prompts: list[str], title: str) -> tuple[int, int, dict[str, float]]:
    """Print one target's table; return (to_pt bytes, emc bytes, worst ratio per variant)."""
    from rich.console import Console
    from rich.table import Table

    from common.graph.artifact import encode
    from common.records import prompt_id
    from common.store.base import dumps

    lim = exp.attribution
    table = Table(
        "prompt",
        "variant",
        "features",
        "nodes",
        "to_pt bytes",
        "emc bytes",
        "ratio",
        "edges kept",
        title=(
            f"graph size, {title} (max_feature_nodes={lim.max_feature_nodes}, "
            f"max_n_logits={lim.max_n_logits}, desired_logit_prob={lim.desired_logit_prob})"
        ),
    )
    total_pt = total_emc = 0
    worst: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for text in prompts:
            for variant in exp.variant_names:
                raw, elapsed = rt.raw_graph(text, variant)
                pt = Path(tmp) / "g.pt"
                raw.to_pt(str(pt))
                pt_bytes = pt.stat().st_size
                graph = rt.from_raw(raw, text, variant, elapsed)
                data, manifest = encode(graph)
                emc_bytes = len(data) + len(dumps(manifest))
                ratio = emc_bytes / pt_bytes
                worst[variant] = max(worst.get(variant, 0.0), ratio)
                total_pt += pt_bytes
                total_emc += emc_bytes
                kept = manifest.limits["edges_feature_kept"]
                nonzero = manifest.limits["edges_feature_nonzero"]
                table.add_row(
                    prompt_id(text),
                    variant,
                    str(manifest.n_features),
                    str(graph.n_nodes),
                    f"{pt_bytes:,}",
                    f"{emc_bytes:,}",
                    f"{ratio:.3f}",
                    f"{kept}/{nonzero} ({kept / max(nonzero, 1):.0%})",
                )
    Console(width=160).print(table)
    return total_pt, total_emc, worst


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--targets", default="toy,realfmt", help="comma list of toy, realfmt")
    ap.add_argument("--organism", type=Path, default=None, help="organism dir (default: built)")
    ap.add_argument("--prompts", type=int, default=4, help="prompts per target")
    args = ap.parse_args(argv)
    targets = [t for t in args.targets.split(",") if t]
    unknown = set(targets) - {"toy", "realfmt"}
    if unknown:
        ap.error(f"unknown targets {sorted(unknown)}; choose from toy, realfmt")

    realfmt_root = Path(tempfile.mkdtemp(prefix="emc-size-realfmt-"))
    if "realfmt" in targets:
        from tests.fixtures.real_format import env_for_root

        # before huggingface_hub is first imported: it reads these once
        os.environ.update(env_for_root(realfmt_root / "fmt"))

    from common.experiment import load_experiment
    from services.attribution.runtime import Runtime

    results: dict[str, tuple[int, int, dict[str, float]]] = {}
    if "toy" in targets:
        from common.organism import ensure_organism
        from common.settings import get_settings

        organism = args.organism or ensure_organism(get_settings().home / "organism")
        exp = load_experiment(organism / "experiment.yaml")
        texts = [p["text"] for p in json.loads((organism / "prompts.json").read_text())["prompts"]]
        results["toy"] = measure(
            Runtime(exp), exp, texts[: args.prompts], f"toy organism {organism}"
        )
    if "realfmt" in targets:
        from bench.gpu_real_scale import PROMPTS
        from tests.fixtures.real_format import build_real_format, default_cache_dir

        fmt = build_real_format(realfmt_root / "fmt", cache_dir=default_cache_dir(REPO / "x"))
        exp = load_experiment(
            fmt.write_experiment(realfmt_root / "experiment.yaml", prompt_format="chat")
        )
        results["realfmt"] = measure(
            Runtime(exp),
            exp,
            PROMPTS[: args.prompts],
            "real-format stand-in (random weights)",
        )
    for name, (total_pt, total_emc, worst) in results.items():
        goals = {"base": 0.10, "adapted": 0.20} if name == "toy" else {}
        worst_txt = ", ".join(
            f"{v} {w:.3f}" + (f" (goal <= {goals[v]:.2f})" if v in goals else "")
            for v, w in worst.items()
        )
        note = "" if goals else " (random weights: no goal)"
        print(
            f"{name}: to_pt {total_pt:,} bytes, emc {total_emc:,} bytes, "
            f"ratio {total_emc / total_pt:.3f}; worst {worst_txt}{note}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
