"""Pipeline overhead and GPU-worker memory, on the toy organism (CPU here, GPU where there is one).

Prints two figures, each against a baseline measured in the same run:

1. (pipeline wall time per graph) / (bare circuit-tracer ``attribute()`` time per graph) on
   the same prompts, the same limits and the same logit targets (the prompt's stored top-k,
   which is what the pipeline attributes). The pipeline time runs from enqueueing
   ``emc.gpu.graph`` tasks on a warm GPU worker (a real Celery worker process over a real
   Redis) until every graph manifest is in the store: Celery, the health probes, encoding
   and store writes are all inside. The top-k logits come first, from ``emc.gpu_fast.logits``
   tasks as in the real flow (a step of its own for every prompt, graphed or not; its time
   per prompt is printed too). The bare baseline runs in the same worker process
   (``bench/worker_tasks.py``: same heap, threads and caches, no emc code around
   ``attribute()``); the same calls in this plain process are printed too (on a small
   shared machine, two processes differ by a few percent either way). Bare and pipeline
   runs alternate over ``--rounds`` so that drift falls on both. Goal: <= 1.15.
2. The GPU worker's resident memory after 50 prompts / after 5 prompts (top-k logits and a
   graph per variant for each prompt). Goal: <= 1.10.

    python bench/pipeline_overhead.py [--prompts 8] [--memory-prompts 50]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def organism_texts(org: Path, n: int) -> list[str]:
    """Pivotal prompts of every domain and split, deduplicated, cycled if needed."""
    doc = json.loads((org / "prompts.json").read_text())
    texts = list(dict.fromkeys(p["text"] for p in doc["prompts"]))
    return (texts * (n // len(texts) + 1))[:n]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--prompts", type=int, default=8, help="prompts per round for the time ratio")
    ap.add_argument("--rounds", type=int, default=3, help="alternating bare/pipeline rounds")
    ap.add_argument("--memory-prompts", type=int, default=50)
    ap.add_argument("--home", type=Path, default=None)
    args = ap.parse_args()

    from bench.system import free_port
    from bench.worker_tasks import Item, bare_attribute
    from common import tasknames as T
    from common.context import make_context
    from common.organism import ensure_organism
    from common.pipeline import Next, send_all
    from common.records import GraphManifest, Prompt, TopKLogits
    from common.settings import Settings, StoreSettings, get_settings
    from common.store import keys as K
    from common.store.base import dumps
    from common.system.broker import start_redis_server
    from common.system.supervisor import spawn, stop_groups, worker_argv
    from services.attribution.runtime import get_runtime

    org = ensure_organism(get_settings().home / "organism")
    home = args.home or Path(tempfile.mkdtemp(prefix="emc-bench-"))
    redis = start_redis_server(free_port(), home / "redis", appendonly=False)
    store_settings = StoreSettings(kind="fs", root=home / "store")
    exp_path = org / "experiment.yaml"
    settings = Settings(home=home, broker_url=redis.url, store=store_settings, experiment=exp_path)
    ctx = make_context(settings)
    exp, fp = ctx.exp, ctx.fingerprint
    variants = exp.variant_names
    limits = exp.attribution
    n_warm, n_timed = 2, args.prompts * args.rounds
    texts = organism_texts(org, n_warm + n_timed + args.memory_prompts)
    runtime = get_runtime(exp, fp, cache_dir=home / "cache")

    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("EMC_")},
        "EMC_BROKER_URL": redis.url,
        "EMC_HOME": str(home),
        "EMC_EXPERIMENT": str(exp_path),
        "EMC_STORE__KIND": "fs",
        "EMC_STORE__ROOT": str(store_settings.root),
        "EMC_LOG_LEVEL": "WARNING",
    }
    proc = spawn(
        worker_argv(
            list(T.GPU_QUEUES),
            hostname="bench-gpu@bench",
            pool="solo",
            include=["bench.worker_tasks"],
        ),
        env=env,
        log_path=home / "gpu.log",
        cwd=REPO,
    )

    def submit(batch: list[str]) -> list[str]:
        pids = []
        for text in batch:
            p = Prompt.new(text, source="bench")
            ctx.store.put_new(K.prompt(exp.name, p.id), dumps(p))
            pids.append(p.id)
        return pids

    def wait(keys_: list[str], what: str, timeout_s: float = 1800) -> None:
        deadline = time.monotonic() + timeout_s
        while not all(ctx.store.exists(k) for k in keys_):
            if proc.poll() is not None:
                raise RuntimeError(f"GPU worker died: see {home / 'gpu.log'}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what} not done in {timeout_s} s")
            time.sleep(0.01)

    def logits(pids: list[str]) -> float:
        """Seconds until the top-k of every variant of these prompts is stored."""
        t0 = time.perf_counter()
        send_all(ctx, [Next(T.GPU_LOGITS, {"exp": exp.name, "prompt_id": p}) for p in pids])
        wait([K.logits(exp.name, p, fp, v) for p in pids for v in variants], "logits")
        return time.perf_counter() - t0

    def graphs(pids: list[str]) -> float:
        """Seconds until the graph of every variant of these prompts is stored."""
        t0 = time.perf_counter()
        send_all(
            ctx,
            [
                Next(T.GPU_GRAPH, {"exp": exp.name, "prompt_id": p, "variant": v})
                for p in pids
                for v in variants
            ],
        )
        wait([K.graph_manifest(exp.name, p, fp, v) for p in pids for v in variants], "graphs")
        return time.perf_counter() - t0

    def items(pids: list[str]) -> list[Item]:
        """The graphs of these prompts as bare attribute() inputs: tokens, variant, targets."""
        out: list[Item] = []
        for p in pids:
            for v in variants:
                topk = ctx.store.get_record(K.logits(exp.name, p, fp, v), TopKLogits)
                out.append((topk.input_ids, v, [t.token_id for t in topk.tokens]))
        return out

    def bare_here(pids: list[str]) -> float:
        """Seconds of bare attribute() in this process."""
        return sum(bare_attribute(runtime, exp, items(pids)))

    def bare_in_worker(pids: list[str]) -> float:
        """Seconds of bare attribute() in the GPU worker process (timed there)."""
        key = f"bench/bare-{time.monotonic_ns()}.json"
        send_all(ctx, [Next("emc.gpu.bench_bare_attribute", {"items": items(pids), "key": key})])
        wait([key], "bare attribute() in the worker")
        return float(sum(ctx.store.get_json(key)["seconds"]))

    try:
        all_pids = submit(texts)
        warm = all_pids[:n_warm]
        timed = all_pids[n_warm : n_warm + n_timed]
        mem_pids = all_pids[n_warm + n_timed :]
        # warm-up: models load once per process (worker and this one), first-call costs
        logits(warm)
        graphs(warm)
        bare_in_worker(warm)
        bare_here(warm)
        logits_s = logits(timed)
        bare_s = here_s = pipe_s = 0.0
        for r in range(args.rounds):
            chunk = timed[r * args.prompts : (r + 1) * args.prompts]
            bare_s += bare_in_worker(chunk)
            pipe_s += graphs(chunk)
            here_s += bare_here(chunk)
        n_graphs = len(timed) * len(variants)
        # attribute() as timed inside the worker (GraphManifest.elapsed_s): splits the
        # overhead into "attribute() runs slower there" and "work around it"
        inside_s = sum(
            ctx.store.get_record(K.graph_manifest(exp.name, p, fp, v), GraphManifest).elapsed_s
            for p in timed
            for v in variants
        )

        # memory: logits + graphs for each prompt, RSS after 5 and after all
        rss = {}
        for i, pid in enumerate(mem_pids, 1):
            logits([pid])
            graphs([pid])
            if i in (5, len(mem_pids)):
                rss[i] = rss_mb(proc.pid)
    finally:
        stop_groups([(proc, (signal.SIGTERM,))], 30.0)
        redis.stop()

    n_last = max(rss)
    print(
        f"prompts timed: {len(timed)} x {len(variants)} variants in {args.rounds} rounds; "
        f"limits {limits.model_dump()}"
    )
    print(f"top-k logits per prompt    : {logits_s / len(timed) * 1000:8.1f} ms  (own step)")
    print(f"bare attribute() per graph : {bare_s / n_graphs * 1000:8.1f} ms  (in the GPU worker)")
    print(f"  same, in a plain process : {here_s / n_graphs * 1000:8.1f} ms")
    print(f"pipeline per graph         : {pipe_s / n_graphs * 1000:8.1f} ms")
    print(f"  of which attribute()     : {inside_s / n_graphs * 1000:8.1f} ms  (timed in the task)")
    print(f"overhead ratio             : {pipe_s / bare_s:8.3f}   (goal <= 1.15)")
    print(f"  vs the plain process     : {pipe_s / here_s:8.3f}")
    print(f"GPU worker RSS after 5     : {rss[5]:8.1f} MB")
    print(f"GPU worker RSS after {n_last:<6}: {rss[n_last]:8.1f} MB")
    print(f"memory ratio {n_last}/5          : {rss[n_last] / rss[5]:8.3f}   (goal <= 1.10)")


if __name__ == "__main__":
    main()
