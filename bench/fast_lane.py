"""Time from "generated" to "in review" for new prompts while attribution graphs run, on the
toy organism through real workers (Redis, one process per queue as ``emc up`` runs them).

    python bench/fast_lane.py [--probes 4] [--probe-size 4] [--backlog 24]

For each GPU-lane layout (``split``: a worker per lane; ``shared``: one worker, fast lane
first) and each graph length (short prompts; long prompts, ~10x the tokens), a backlog of
graph tasks is queued and probe batches of new prompts are submitted one after another while
it runs. Each probe's latency is the time until every prompt in it was judged and decided
(``in_review``, ``done`` or ``failed``). Printed against the same probes with no graph
backlog in the same run (= top-k time + judge time, plus, in the shared layout, waits for
the probes' own graphs), with the graph time per task for scale. Goal: latency
with graphs running within the idle latency, whatever the graph length.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.system import BenchSystem, organism_experiment  # noqa: E402

DECIDED = {"in_review", "done", "failed", "labeled"}


def long_prompt(situations: list[str]) -> str:
    """One house-form prompt whose situation strings several together (~10x the tokens)."""
    body = " ".join(s.split("\n")[0].removeprefix("User: ") for s in situations)
    return f"User: {body}\nAssistant: You should"


def decided(system: BenchSystem, pids: list[str]) -> Callable[[], bool]:
    return lambda: all(str(x) in DECIDED for x in system.statuses(pids))


def measure(
    system: BenchSystem, args: argparse.Namespace, take: Callable[[int], list[str]]
) -> list[tuple[str, float, float | None]]:
    """(condition, median probe latency, seconds per graph) on a running system."""
    from common import tasknames as T
    from common.graph.artifact import graph_exists
    from common.pipeline import Next, send_all

    ctx = system.ctx

    def probe() -> float:
        pids = system.submit(take(args.probe_size))
        t0 = time.monotonic()
        return system.wait(decided(system, pids), "probe prompts decided") - t0

    def graphs_done(keys: list[tuple[str, str]]) -> int:
        return sum(graph_exists(ctx.store, ctx.exp.name, p, ctx.fingerprint, v) for p, v in keys)

    probe()  # warm-up: models loaded in every worker
    rows: list[tuple[str, float, float | None]] = []
    rows.append(("no backlog", statistics.median(probe() for _ in range(args.probes)), None))
    for kind in ("short", "long"):
        n = args.backlog // 2
        texts = take(n) if kind == "short" else [long_prompt(take(10)) for _ in range(n)]
        pids = system.submit(texts)
        system.wait(decided(system, pids), "backlog top-k")
        # graphs of every backlog prompt and variant, whatever the funnel decided
        keys = [(p, v) for p in pids for v in ctx.exp.variant_names]
        t0 = time.monotonic()
        send_all(
            ctx,
            [
                Next(T.GPU_GRAPH, {"exp": ctx.exp.name, "prompt_id": p, "variant": v})
                for p, v in keys
            ],
        )
        time.sleep(0.3)  # the first graph is running
        busy = []
        for _ in range(args.probes):
            if graphs_done(keys) >= len(keys) - 1:
                break
            busy.append(probe())
        system.wait(lambda k=keys: graphs_done(k) == len(k), "graph backlog")  # type: ignore[misc]
        if not busy:
            raise SystemExit("the backlog ended before any probe: raise --backlog")
        rows.append(
            (f"{kind} graphs running", statistics.median(busy), (time.monotonic() - t0) / len(keys))
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--probes", type=int, default=4, help="probe batches per condition")
    ap.add_argument("--probe-size", type=int, default=4, help="prompts per probe batch")
    ap.add_argument("--backlog", type=int, default=24, help="graph tasks queued per condition")
    args = ap.parse_args()

    import yaml

    from common import tasknames as T
    from common.organism import ensure_organism
    from common.settings import get_settings

    org = ensure_organism(get_settings().home / "organism")
    texts = [p["text"] for p in json.loads((org / "prompts.json").read_text())["prompts"]]
    fresh = iter(texts)
    used: set[str] = set()

    def take(n: int) -> list[str]:
        out = []
        for t in fresh:
            if t not in used:
                used.add(t)
                out.append(t)
            if len(out) == n:
                return out
        raise SystemExit("ran out of organism prompts: lower --probes/--backlog")

    root = Path(tempfile.mkdtemp(prefix="emc-fastlane-"))
    layouts = {
        "split": [["judge"], ["analysis"], ["gpu_fast"], ["gpu"]],
        "shared": [["judge"], ["analysis"], list(T.GPU_QUEUES)],
    }
    rows: list[tuple[str, str, float, float | None]] = []
    for layout, groups in layouts.items():
        home = root / layout
        exp = organism_experiment(org, home / "experiment.yaml", yaml, name=f"lane-{layout}")
        with BenchSystem(home, exp) as system:
            system.start_workers(groups)
            rows += [(layout, *row) for row in measure(system, args, take)]
    print(
        f"toy organism, CPU; {args.probe_size} prompts per probe, median of up to "
        f"{args.probes} probes; backlog {args.backlog // 2} prompts x 2 variants per condition"
    )
    print(f"{'layout':8} {'condition':22} {'generated->decided':>19} {'vs idle':>8} {'s/graph':>8}")
    idle_of = {lay: lat for lay, cond, lat, _ in rows if cond == "no backlog"}
    for layout, cond, lat, per_graph in rows:
        ratio = lat / idle_of[layout]
        graph = f"{per_graph:8.2f}" if per_graph is not None else f"{'':8}"
        print(f"{layout:8} {cond:22} {lat:18.2f}s {ratio:7.2f}x {graph}")


if __name__ == "__main__":
    main()
