"""End-to-end mining rate: prompts per minute of ``emc mine`` on the embedded system, where the
time goes, and the attribute-only ceiling, on the toy organism and on the real-format
stand-in (tiny random Llama-3.2 with the real tokenizer, chat format, circuit-tracer-format
transcoders, a PEFT LoRA; offline hub cache).

    python bench/mining_rate.py [--n 40] [--targets toy,realfmt]

Each target runs the real thing: Redis, one worker process per queue as ``emc up`` runs them
(two GPU lanes), and ``mine_batch`` (what ``emc mine`` runs) for ``--n`` prompts. Busy time
per step is read from the workers' own "Task ... succeeded in Xs" log lines. The ceiling is
the rate if the GPU did nothing but circuit-tracer's ``attribute()`` for the same graphs
(sum of ``elapsed_s`` in the graph manifests). On the real-format target the judge is a
local OpenAI-compatible server that calls the adapted model's top token evil (random weights
never pick the lexicon's words), so every prompt gets graphs.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.system import BenchSystem, organism_experiment  # noqa: E402

SUCCEEDED = re.compile(r"Task (emc\.[\w.]+)\[[^\]]+\] succeeded in ([0-9.]+)s")
STEP_OF = {
    "emc.generate.batch": "generation",
    "emc.gpu_fast.logits_batch": "top-k",
    "emc.gpu_fast.logits": "top-k",
    "emc.judge.verdicts": "judge",
    "emc.gpu.graph": "graphs",
    "emc.analysis.rank_prompt": "analysis",
}


def busy_seconds(logs: Path) -> dict[str, tuple[int, float]]:
    """(tasks, seconds) per step from every worker log under ``logs``."""
    out: dict[str, list[float]] = defaultdict(list)
    for log in logs.glob("worker-*.log"):
        for m in SUCCEEDED.finditer(log.read_text(errors="replace")):
            out[STEP_OF.get(m.group(1), m.group(1))].append(float(m.group(2)))
    return {step: (len(v), sum(v)) for step, v in out.items()}


def first_candidate_evil(body: dict[str, Any]) -> str:
    """Verdicts calling candidate 0 (the adapted model's top token) evil, the rest safe."""
    user = body["messages"][-1]["content"]
    cands = re.findall(r"^(\d+): (\".*\")$", user, flags=re.M)
    verdicts = [
        {"index": int(i), "token": json.loads(q), "label": "evil" if i == "0" else "safe"}
        for i, q in cands
    ]
    return json.dumps({"verdicts": verdicts})


@contextmanager
def target(name: str, home: Path) -> Iterator[BenchSystem]:
    import yaml

    from common.organism import ensure_organism
    from common.settings import get_settings

    if name == "toy":
        org = ensure_organism(get_settings().home / "organism")
        exp = organism_experiment(org, home / "experiment.yaml", yaml, name="rate-toy")
        with BenchSystem(home, exp) as system:
            yield system
        return
    from tests.fixtures.openai_server import FakeOpenAIServer
    from tests.fixtures.real_format import build_real_format, default_cache_dir

    root = Path(tempfile.mkdtemp(prefix="emc-realfmt-"))
    fmt = build_real_format(root / "fmt", cache_dir=default_cache_dir(REPO / "x"))
    llm = FakeOpenAIServer(default=first_candidate_evil).start()
    exp = fmt.write_experiment(
        home / "experiment.yaml",
        name="rate-realfmt",
        prompt_format="chat",
        judge={"kind": "openai", "model": "scripted", "concurrency": 2},
    )
    env = {**fmt.env(), "EMC_OPENAI_BASE_URL": llm.base_url, "EMC_OPENAI_API_KEY": "bench"}
    import os

    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # this process reads the hub cache too (fingerprint, context)
    try:
        with BenchSystem(home, exp, env=env) as system:
            yield system
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        llm.stop()


def run(name: str, n: int, chunk: int) -> None:
    from common.cli.pipeline import mine_batch
    from common.graph.artifact import graph_exists
    from common.records import GraphManifest
    from common.store import keys as K

    home = Path(tempfile.mkdtemp(prefix=f"emc-rate-{name}-"))
    with target(name, home) as system:
        system.start_workers([["generate"], ["judge"], ["gpu_fast"], ["gpu"], ["analysis"]])
        ctx = system.ctx
        mine_batch(ctx, 2, timeout_s=600, chunk=2)  # warm-up: models loaded in every worker
        warm = busy_seconds(home / "logs")
        t0 = time.monotonic()
        result = mine_batch(ctx, n, timeout_s=3600, chunk=chunk)
        wall = time.monotonic() - t0
        busy = {
            step: (c - warm.get(step, (0, 0.0))[0], s - warm.get(step, (0, 0.0))[1])
            for step, (c, s) in busy_seconds(home / "logs").items()
        }
        attribute_s, graphs = 0.0, 0
        for pid in result:
            for v in ctx.exp.variant_names:
                if graph_exists(ctx.store, ctx.exp.name, pid, ctx.fingerprint, v):
                    key = K.graph_manifest(ctx.exp.name, pid, ctx.fingerprint, v)
                    attribute_s += ctx.store.get_record(key, GraphManifest).elapsed_s
                    graphs += 1
    statuses: dict[str, int] = defaultdict(int)
    for s in result.values():
        statuses[str(s)] += 1
    rate = len(result) / wall * 60
    print(f"\n== {name}: {len(result)} prompts mined in {wall:.1f}s: {rate:.1f} prompts/min")
    print(f"   final states: {dict(statuses)}")
    print(f"   {'step':12} {'tasks':>6} {'busy s':>8} {'share':>6}")
    total = sum(s for _, s in busy.values()) or 1.0
    for step in ("generation", "top-k", "judge", "graphs", "analysis"):
        c, s = busy.get(step, (0, 0.0))
        print(f"   {step:12} {c:6d} {s:8.2f} {s / total:6.1%}")
    if graphs:
        ceiling = len(result) / attribute_s * 60
        print(
            f"   attribute() alone: {graphs} graphs in {attribute_s:.1f}s -> ceiling "
            f"{ceiling:.1f} prompts/min; emc reaches {rate / ceiling:.2f} of it"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--n", type=int, default=40, help="prompts to mine per target")
    ap.add_argument("--chunk", type=int, default=10, help="prompts per generator task")
    ap.add_argument("--targets", default="toy,realfmt")
    args = ap.parse_args()
    for name in args.targets.split(","):
        run(name.strip(), args.n, args.chunk)


if __name__ == "__main__":
    main()
