"""Pipeline overhead and GPU-worker memory, on the toy organism (CPU here, GPU where there is one).

Prints two figures, each against a baseline measured in the same run:

1. (pipeline wall time per graph) / (bare circuit-tracer ``attribute()`` time per graph) on
   the same prompts and limits. The pipeline time runs from enqueueing ``emc.gpu.graph``
   tasks on a warm GPU worker (a real Celery worker process over a real Redis) until every
   graph artifact is in the store: Celery, health checks, encoding and store writes are
   all inside. Goal: <= 1.15.
2. The GPU worker's resident memory after 50 prompts / after 5 prompts (top-k logits and a
   graph per variant for each prompt). Goal: <= 1.10.

    python bench/pipeline_overhead.py [--prompts 8] [--memory-prompts 50]
"""

from __future__ import annotations

import argparse
import json
import os
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
    ap.add_argument("--prompts", type=int, default=8, help="prompts for the time ratio")
    ap.add_argument("--memory-prompts", type=int, default=50)
    ap.add_argument("--home", type=Path, default=None)
    args = ap.parse_args()

    import torch
    from circuit_tracer import attribute

    from common.broker import start_redis_server
    from common.context import make_context
    from common.organism import ensure_organism
    from common.pipeline import Next, send_all
    from common.records import Prompt
    from common.settings import Settings, StoreSettings, get_settings
    from common.store import keys as K
    from common.store.base import dumps
    from common.supervisor import spawn, stop_groups, worker_argv
    from services.attribution.runtime import get_runtime

    org = ensure_organism(get_settings().home / "organism")
    home = args.home or Path(tempfile.mkdtemp(prefix="emc-bench-"))
    redis = start_redis_server(_free_port(), home / "redis", appendonly=False)
    url = redis.url
    store_settings = StoreSettings(kind="fs", root=home / "store")
    exp_path = org / "experiment.yaml"
    settings = Settings(home=home, broker_url=url, store=store_settings, experiment=exp_path)
    ctx = make_context(settings)
    exp, fp = ctx.exp, ctx.fingerprint
    limits = exp.attribution
    texts = organism_texts(org, args.prompts + args.memory_prompts + 1)

    # --- baseline: bare attribute() on loaded models, same prompts and limits -------------
    runtime = get_runtime(exp, fp, cache_dir=home / "cache")
    bare: list[float] = []

    def bare_attribute(text: str, variant: str) -> None:
        # the same token ids the pipeline uses (BOS from the tokenizer), the same limits
        ids = torch.tensor(runtime.tokenize(text, variant), dtype=torch.long)
        attribute(
            ids,
            runtime.variant(variant).model,
            max_n_logits=limits.max_n_logits,
            desired_logit_prob=limits.desired_logit_prob,
            batch_size=limits.batch_size,
            max_feature_nodes=limits.max_feature_nodes,
        )

    for variant in exp.variant_names:
        bare_attribute(texts[0], variant)  # warm-up
        for text in texts[1 : 1 + args.prompts]:
            t0 = time.perf_counter()
            bare_attribute(text, variant)
            bare.append(time.perf_counter() - t0)

    # --- the pipeline: a real GPU worker process over Redis -------------------------------
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("EMC_")},
        "EMC_BROKER_URL": url,
        "EMC_HOME": str(home),
        "EMC_EXPERIMENT": str(exp_path),
        "EMC_STORE__KIND": "fs",
        "EMC_STORE__ROOT": str(store_settings.root),
        "EMC_LOG_LEVEL": "WARNING",
    }
    proc = spawn(
        worker_argv(["gpu"], hostname="bench-gpu@bench", pool="solo"),
        env=env,
        log_path=home / "gpu.log",
        cwd=REPO,
    )
    try:

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
                time.sleep(0.02)

        def graphs(pids: list[str]) -> list[str]:
            send_all(
                ctx,
                (
                    Next("emc.gpu.graph", {"exp": exp.name, "prompt_id": p, "variant": v})
                    for p in pids
                    for v in exp.variant_names
                ),
            )
            return [K.graph_manifest(exp.name, p, fp, v) for p in pids for v in exp.variant_names]

        # warm-up: models load once per worker process
        wait(graphs(submit(texts[:1])), "warm-up")
        pids = submit(texts[1 : 1 + args.prompts])
        t0 = time.perf_counter()
        wait(graphs(pids), "timed graphs")
        pipeline_per_graph = (time.perf_counter() - t0) / (len(pids) * len(exp.variant_names))
        bare_per_graph = sum(bare) / len(bare)

        # memory: logits + graphs for 50 prompts, RSS after 5 and after 50
        mem_texts = texts[1 + args.prompts :]
        mem_pids = submit(mem_texts)
        rss = {}
        for i, pid in enumerate(mem_pids, 1):
            send_all(ctx, [Next("emc.gpu.logits", {"exp": exp.name, "prompt_id": pid})])
            wait(graphs([pid]), f"prompt {i}")
            if i in (5, len(mem_pids)):
                rss[i] = rss_mb(proc.pid)
    finally:
        stop_groups([(proc, ())], 10.0)
        redis.stop()

    n_last = max(rss)
    print(
        f"prompts timed: {len(pids)} x {len(exp.variant_names)} variants; limits {limits.model_dump()}"
    )
    print(f"bare attribute() per graph : {bare_per_graph * 1000:8.1f} ms")
    print(f"pipeline per graph         : {pipeline_per_graph * 1000:8.1f} ms")
    print(
        f"overhead ratio             : {pipeline_per_graph / bare_per_graph:8.3f}   (goal <= 1.15)"
    )
    print(f"GPU worker RSS after 5     : {rss[5]:8.1f} MB")
    print(f"GPU worker RSS after {n_last:<6}: {rss[n_last]:8.1f} MB")
    print(f"memory ratio {n_last}/5          : {rss[n_last] / rss[5]:8.3f}   (goal <= 1.10)")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


if __name__ == "__main__":
    main()
