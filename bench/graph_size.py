"""Bytes of a stored emc graph vs circuit-tracer's ``Graph.to_pt`` for the same graph.

Runs on the toy organism (built if needed) at the organism experiment's own limits: for the
first prompts of ``prompts.json`` and every variant, computes the graph once, writes it with
``Graph.to_pt`` (a pickle, only measured here) and with emc's artifact (safetensors + manifest
JSON), and prints both sizes and their ratio. Goal: ratio <= 0.10.

    .venv/bin/python bench/graph_size.py [--organism DIR] [--prompts 4]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--organism", type=Path, default=None, help="organism dir (default: built)")
    ap.add_argument("--prompts", type=int, default=4, help="how many prompts of prompts.json")
    args = ap.parse_args(argv)

    from rich.console import Console
    from rich.table import Table

    from common.experiment import load_experiment
    from common.graph.artifact import encode
    from common.organism import ensure_organism
    from common.records import prompt_id
    from common.settings import get_settings
    from common.store.base import dumps
    from services.attribution.runtime import Runtime

    organism = args.organism or ensure_organism(get_settings().home / "organism")
    exp = load_experiment(organism / "experiment.yaml")
    prompts = [p["text"] for p in json.loads((organism / "prompts.json").read_text())["prompts"]]
    rt = Runtime(exp)
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
            f"graph size, organism {organism} (max_feature_nodes={lim.max_feature_nodes}, "
            f"max_n_logits={lim.max_n_logits}, desired_logit_prob={lim.desired_logit_prob})"
        ),
    )
    total_pt = total_emc = 0
    worst = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for text in prompts[: args.prompts]:
            for variant in exp.variant_names:
                raw, elapsed = rt.raw_graph(text, variant)
                pt = Path(tmp) / "g.pt"
                raw.to_pt(str(pt))
                pt_bytes = pt.stat().st_size
                graph = rt.from_raw(raw, text, variant, elapsed)
                data, manifest = encode(graph)
                emc_bytes = len(data) + len(dumps(manifest))
                ratio = emc_bytes / pt_bytes
                worst = max(worst, ratio)
                total_pt += pt_bytes
                total_emc += emc_bytes
                table.add_row(
                    prompt_id(text),
                    variant,
                    str(manifest.n_features),
                    str(graph.n_nodes),
                    f"{pt_bytes:,}",
                    f"{emc_bytes:,}",
                    f"{ratio:.3f}",
                    f"{manifest.limits['edges_feature_kept']}/{manifest.limits['edges_feature_nonzero']}",
                )
    console = Console()
    console.print(table)
    console.print(
        f"total: to_pt {total_pt:,} bytes, emc {total_emc:,} bytes, "
        f"ratio {total_emc / total_pt:.3f} (worst {worst:.3f}; goal <= 0.100)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
