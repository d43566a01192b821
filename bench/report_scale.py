"""``emc analyze report`` and ``emc status`` as the store grows to 10,000 graphed prompts.

Seeds a local store through the project's own store API with N synthetic-but-real prompts:
a prompt record, top-k logits and lexicon verdicts for both variants (every prompt divergent,
the base ranked too), a valid ``emc-graph`` artifact per variant (one small encoded graph,
re-issued under each prompt's manifest so that its tensors name it) and a
:class:`FeatureRanking` per variant (``--features`` rows drawn from 16 layers x 8192
features, Zipf-like, with score shares) that the report's ranking cache accepts as current.

Then, each report in a fresh process (its peak RSS its own):

- the full report at N = 1,000 and N = 10,000: seconds, peak RSS, and the exponent of time
  vs N (1.0 = linear; goal: peak RSS < 1 GB at 10,000);
- the incremental re-run after 100 new prompts, against the full report on the same store;
- ``emc status``'s data (counts, unusable count, recent failures) from Redis, against the
  store scan it replaced (every prompt's failures listed), with 2% of prompts failed.

    python bench/report_scale.py [--sizes 1000,10000] [--features 256] [--dir DIR]
    python bench/report_scale.py report --dir DIR [--full]      (one measurement, JSON)
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

FP = "fp-bench"
EVIL, SAFE, OTHER, BASE_EVIL = 1000, 1001, 1002, 1003
TOPS = {"adapted": [EVIL, SAFE, OTHER], "base": [BASE_EVIL, SAFE, OTHER]}
LABELS = {EVIL: "evil", SAFE: "safe", OTHER: "unsure", BASE_EVIL: "evil"}
N_LAYERS, D_SAE, N_POS = 16, 8192, 24


def _peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux


def experiment() -> Any:
    from common.experiment import parse_experiment

    return parse_experiment(
        {
            "name": "bench",
            "variants": {"base": {"model": "m"}, "adapted": {"model": "m", "adapter": "a"}},
            "transcoders": {"path": "t"},
        },
        base_dir=Path("."),
    )


class Seeder:
    """Writes bench prompts into a store (deterministic per prompt index)."""

    def __init__(self, root: Path, n_features: int) -> None:
        from common.graph.artifact import encode
        from common.store import FsStore
        from tests.analysis.synthetic import linear_net

        self.store = FsStore(root)
        self.exp = experiment()
        self.n_features = n_features
        self.templates = {}
        for i, variant in enumerate(("base", "adapted")):
            g = linear_net(seed=i, n_logits=3).graph
            g.manifest = g.manifest.model_copy(
                update={"variant": variant, "logit_token_ids": TOPS[variant], "fingerprint": FP}
            )
            self.templates[variant] = encode(g)

    def _graph(self, pid: str, variant: str) -> str:
        """Write a valid graph artifact of the template under this prompt's manifest."""
        import hashlib

        from safetensors.numpy import load as st_load
        from safetensors.numpy import save as st_save

        from common.graph import artifact
        from common.store import keys as K

        data, manifest = self.templates[variant]
        manifest = manifest.model_copy(update={"prompt_id": pid})
        meta = {
            artifact._META_KEY: json.dumps(
                {
                    "format": artifact.FORMAT,
                    "version": artifact.FORMAT_VERSION,
                    "manifest_sha256": artifact._manifest_sha(manifest),
                },
                sort_keys=True,
            )
        }
        data = st_save(st_load(data), metadata=meta)
        sha = hashlib.sha256(data).hexdigest()
        manifest = manifest.model_copy(update={"tensors_bytes": len(data), "tensors_sha256": sha})
        name = self.exp.name
        self.store.put_bytes(K.graph_tensors(name, pid, FP, variant), data)
        self.store.put_json(
            K.graph_manifest(name, pid, FP, variant), manifest.model_dump(mode="json")
        )
        return sha

    def prompt(self, index: int) -> str:
        import numpy as np

        from common.labels import resolve_labels
        from common.records import (
            FeatureRanking,
            LayerShares,
            Prompt,
            RankedFeature,
            ScoreShares,
            TokenProb,
            TokenVerdict,
            TopKLogits,
            Verdict,
        )
        from common.store import keys as K
        from services.analysis.shares import error_flag

        store, name = self.store, self.exp.name
        prompt = Prompt.new(f"User: bench prompt {index}?\nAssistant: You should", source="bench")
        pid = prompt.id
        store.put_json(K.prompt(name, pid), prompt)
        rng = np.random.default_rng(index)
        for variant, top in TOPS.items():
            store.put_json(
                K.logits(name, pid, FP, variant),
                TopKLogits(
                    prompt_id=pid,
                    variant=variant,
                    fingerprint=FP,
                    input_ids=list(range(N_POS)),
                    tokens=[TokenProb(token_id=t, token=f"w{t}", prob=0.3, logit=1.0) for t in top],
                ),
            )
            store.put_json(
                K.verdicts(name, pid, FP, "lexicon", variant),
                Verdict(
                    prompt_id=pid,
                    variant=variant,
                    judge="lexicon",
                    fingerprint=FP,
                    verdicts=[
                        TokenVerdict(token_id=t, token=f"w{t}", label=LABELS[t])  # type: ignore[arg-type]
                        for t in top
                    ],
                ),
            )
            sha = self._graph(pid, variant)
            labels = resolve_labels(store, name, pid, FP, variant, "lexicon")
            f = self.n_features
            layers = rng.integers(0, N_LAYERS, f)
            feats = np.minimum(rng.zipf(1.3, f) - 1, D_SAE - 1)
            pos = rng.integers(0, N_POS, f)
            scores = rng.normal(0, 1e-3, f) * (1 + (variant == "adapted"))
            order = np.argsort(-scores)
            errs = rng.normal(0, 0.05, N_LAYERS)
            shares = ScoreShares(
                total=float(rng.normal(0.1, 0.02)),
                tokens=0.2,
                errors=float(errs.sum()),
                adapter=0.0,
                top_feature=float(scores.max()),
                layers=[
                    LayerShares(layer=lay, features=float(rng.normal(0, 0.05)), errors=float(e))
                    for lay, e in enumerate(errs)
                ],
            )
            ranking = FeatureRanking(
                prompt_id=pid,
                variant=variant,
                fingerprint=FP,
                labels_version=labels.version,
                label_source=labels.source,
                evil_token_ids=[t for t in top if LABELS[t] == "evil"],
                safe_token_ids=[t for t in top if LABELS[t] == "safe"],
                features=[
                    RankedFeature(
                        layer=int(layers[i]),
                        pos=int(pos[i]),
                        feature=int(feats[i]),
                        token=f"t{int(pos[i])}",
                        score=float(scores[i]),
                        evil=float(scores[i]),
                        safe=0.0,
                        activation=float(abs(scores[i]) * 1e3),
                    )
                    for i in order
                ],
                shares=shares.model_copy(update={"flag": error_flag(shares)}),
                graph_sha256=sha,
            )
            store.put_json(K.features(name, pid, FP, variant), ranking)
        return pid

    def seed(self, start: int, stop: int) -> list[str]:
        return [self.prompt(i) for i in range(start, stop)]


def report(args: argparse.Namespace) -> dict[str, Any]:
    """One report over the store in ``args.dir`` (what the main command runs per process)."""
    from common.store import FsStore
    from services.analysis.report import build_report

    store = FsStore(args.dir / "store")
    exp = experiment()
    before = _peak_gb()
    t0 = time.perf_counter()
    data = build_report(store, exp, args.dir / "report", fingerprint=FP, full=args.full)
    seconds = time.perf_counter() - t0
    agg = data.aggregates["adapted"]
    return {
        "seconds": seconds,
        "peak_rss_gb": _peak_gb(),
        "rss_before_gb": before,
        "folded": len(data.folded),
        "incremental": data.incremental,
        **{f"{k}_s": v for k, v in data.seconds.items()},
        "prompts": len(agg.prompt_ids),
        "features_total": agg.n_features_total,
    }


def _measure(root: Path, full: bool) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "report", "--dir", str(root)] + (["--full"] if full else [])
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return dict(json.loads(out.strip().splitlines()[-1]))


def status_bench(root: Path, n_failed: int) -> dict[str, float]:
    """Seconds of `emc status`'s data: from Redis now, vs listing every prompt's failures."""
    from common.context import Context
    from common.errors import PromptFailure
    from common.index import failures_of, prompt_ids, recent_failures
    from common.pipeline import record_failure
    from common.records import Status
    from common.settings import Settings
    from common.store import FsStore
    from common.system.broker import start_redis_server
    from services.analysis.report import graphed_prompts
    from tests.fixtures.servers import free_port

    server = start_redis_server(free_port(), root / "redis", appendonly=False)
    try:
        import redis

        ctx = Context(
            settings=Settings(home=root / "home"),
            store=FsStore(root / "store"),
            exp=experiment(),
            fingerprint=FP,
            _redis=redis.Redis.from_url(server.url, decode_responses=True),
        )
        pids = sorted(graphed_prompts(ctx.store, ctx.exp.name, FP))
        ctx.redis.hset(ctx.queue.status_key, mapping=dict.fromkeys(pids, Status.analyzed.value))
        for pid in pids[:n_failed]:
            record_failure(ctx, PromptFailure("judge", "the bench's judge failed"), pid)

        def new() -> int:
            counts = ctx.queue.counts()
            ctx.queue.reasons()
            return len(recent_failures(ctx, 10)) + len(counts)

        def old() -> int:
            found = [f for pid in prompt_ids(ctx) for f in failures_of(ctx, pid)]
            found.sort(key=lambda f: f.created_at, reverse=True)
            return len(found[:10]) + len(ctx.queue.counts())

        t0 = time.perf_counter()
        new()
        t_new = time.perf_counter() - t0
        t0 = time.perf_counter()
        old()
        t_old = time.perf_counter() - t0
        return {"prompts": len(pids), "redis_s": t_new, "scan_s": t_old}
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = ap.add_subparsers(dest="cmd")
    one = sub.add_parser("report")
    one.add_argument("--dir", type=Path, required=True)
    one.add_argument("--full", action="store_true")
    ap.add_argument("--sizes", default="1000,10000")
    ap.add_argument("--features", type=int, default=256, help="ranking rows per prompt/variant")
    ap.add_argument("--added", type=int, default=100, help="new prompts before the re-run")
    ap.add_argument("--dir", type=Path, default=None, help="keep the store here (default: tmp)")
    args = ap.parse_args(argv)
    if args.cmd == "report":
        print(json.dumps(report(args)))
        return 0

    import logging

    from rich.console import Console
    from rich.table import Table

    logging.disable(logging.WARNING)  # the seeded failures' warnings
    console = Console()
    sizes = sorted(int(x) for x in args.sizes.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        root = args.dir or Path(tmp)
        seeder = Seeder(root / "store", args.features)
        done = 0
        rows: list[tuple[int, dict[str, Any]]] = []
        for n in sizes:
            t0 = time.perf_counter()
            seeder.seed(done, n)
            console.print(f"seeded {n - done} prompts in {time.perf_counter() - t0:.0f} s")
            done = n
            rows.append((n, _measure(root, full=True)))
        seeder.seed(done, done + args.added)
        inc = _measure(root, full=False)
        full_after = _measure(root, full=True)
        status = status_bench(root, n_failed=max(1, done // 50))

    table = Table(
        "prompts", "report s", "digests s", "fold s", "write s", "peak RSS GB", "RSS before GB",
        "features seen",
        title=f"emc analyze report, full ({args.features} ranking rows per prompt and variant)",
    )  # fmt: skip
    for n, r in rows:
        table.add_row(
            f"{n:,}",
            f"{r['seconds']:.1f}",
            f"{r['digests_s']:.1f}",
            f"{r['fold_s']:.1f}",
            f"{r['write_s']:.1f}",
            f"{r['peak_rss_gb']:.2f}",
            f"{r['rss_before_gb']:.2f}",
            f"{r['features_total']:,}",
        )
    console.print(table)
    (n0, r0), (n1, r1) = rows[0], rows[-1]
    if n1 > n0:
        for what in ("seconds", "digests_s", "fold_s"):
            expo = math.log(r1[what] / r0[what]) / math.log(n1 / n0)
            console.print(
                f"{what.removesuffix('_s')}: time ~ N^{expo:.2f} from {n0:,} to {n1:,} prompts "
                "(1.00 = linear)"
            )
    console.print(f"peak RSS at {n1:,} prompts: {r1['peak_rss_gb']:.2f} GB (goal < 1 GB)")
    console.print(
        f"after +{args.added} prompts: incremental {inc['seconds']:.1f} s "
        f"({inc['folded']} folded, incremental={inc['incremental']}) vs full "
        f"{full_after['seconds']:.1f} s ({full_after['folded']} folded): "
        f"{full_after['seconds'] / inc['seconds']:.1f}x; folding alone {inc['fold_s']:.1f} s vs "
        f"{full_after['fold_s']:.1f} s, the digest check of every prompt {inc['digests_s']:.1f} s"
    )
    console.print(
        f"emc status data at {status['prompts']:,} prompts: Redis {status['redis_s'] * 1e3:.0f} ms "
        f"vs store scan {status['scan_s'] * 1e3:.0f} ms (goal < 1 s)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
