"""What the review UI's graph viewer costs per page, on the toy organism.

Stores base and adapted graphs of held-out medical prompts (union targets, as the
pipeline does), then times building the viewer's document from the store
(``common.graph.view.stored_graph_view``, done on every request) against the baseline
measured in the same run: circuit-tracer's viewer JSON export of the same graphs
(``services.attribution.viewer.export_stored``, what the UI served before, per variant).
Also prints the documents' sizes and how much of each graph is drawn.

    .venv/bin/python bench/graph_view.py [--organism DIR] [--prompts 3] [--repeat 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--organism", type=Path, default=None, help="default: <EMC_HOME>/organism")
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args(argv)

    from common.experiment import load_experiment
    from common.graph.view import stored_graph_view
    from common.organism import ensure_organism
    from common.settings import get_settings
    from common.store import FsStore
    from services.attribution.runtime import Runtime
    from services.attribution.viewer import export_stored
    from services.judge.factory import make_judge
    from tests.fixtures.organism_graphs import store_judged_graphs

    organism = ensure_organism(args.organism or get_settings().home / "organism")
    exp = load_experiment(organism / "experiment.yaml")
    work = Path(tempfile.mkdtemp(prefix="emc-bench-view-"))
    store = FsStore(work / "store")
    rt = Runtime(exp, cache_dir=work / "models")
    judge = make_judge(exp)
    raw = json.loads((organism / "prompts.json").read_text())["prompts"]
    texts = [p["text"] for p in raw if p["domain"] == "medical" and p["split"] == "heldout"]
    pids = []
    for text in texts[: args.prompts]:
        pids.append(store_judged_graphs(rt, store, judge, text, targets="union").id)

    def timed(fn: object) -> float:
        times = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            fn()  # type: ignore[operator]
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    print(f"{len(pids)} prompts, variants {exp.variant_names}, median of {args.repeat}")
    print(f"{'prompt':14} {'emc view':>10} {'ct export':>10} {'view KB':>8} {'ct KB':>8} "
          f"{'nodes':>6} {'edges':>6} {'features':>9} {'mass':>5}")  # fmt: skip
    for pid in pids:
        view = stored_graph_view(store, exp, pid, fingerprint=rt.fingerprint)
        ours = timed(lambda pid=pid: stored_graph_view(store, exp, pid, fingerprint=rt.fingerprint))
        out = work / "ct" / pid

        def export(pid: str = pid, out: Path = out) -> None:
            for v in exp.variant_names:
                export_stored(store, exp, pid, v, out, fingerprint=rt.fingerprint)

        base = timed(export)
        ct_kb = sum(p.stat().st_size for p in out.glob("*.json")) / 1024
        view_kb = len(view.model_dump_json()) / 1024
        feats = sum(s.features for s in view.summaries.values())
        mass = min(s.shown_mass for s in view.summaries.values())
        print(f"{pid:14} {ours * 1e3:8.1f}ms {base * 1e3:8.1f}ms {view_kb:8.1f} {ct_kb:8.1f} "
              f"{len(view.nodes):6d} {len(view.edges):6d} {feats:9d} {mass:5.0%}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
