"""Top-k logits: padded batches (``Runtime.top_k_many``) vs one prompt at a time
(``Runtime.top_k``), side by side in one run, on the toy organism.

    python bench/topk_batch.py [--prompts 256] [--batch-size 32] [--rounds 3] [--threads 2]

Both paths run the same prompts through the same loaded models with health checks, and the
bench checks that they give the same top-k ids. Prints prompts/s (prompt x variant passes per
second) per round for each, and the ratio; the goal on CPU is at least 8x.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import torch

    from common.experiment import load_experiment
    from common.organism import ensure_organism
    from common.records import TopKLogits
    from common.settings import get_settings
    from services.attribution.runtime import Runtime

    torch.set_num_threads(args.threads)
    org = ensure_organism(get_settings().home / "organism")
    exp = load_experiment(org / "experiment.yaml")
    rt = Runtime(exp, cache_dir=Path(tempfile.mkdtemp(prefix="emc-topk-")))
    texts = [p["text"] for p in json.loads((org / "prompts.json").read_text())["prompts"]]
    texts = (texts * (args.prompts // len(texts) + 1))[: args.prompts]
    variants = exp.variant_names
    for v in variants:  # load and warm up both paths
        rt.top_k(texts[0], v)
        rt.top_k_many(texts[: args.batch_size], v, batch_size=args.batch_size)

    def single() -> tuple[float, list[list[int]]]:
        t0 = time.perf_counter()
        ids = [[t.token_id for t in rt.top_k(x, v).tokens] for v in variants for x in texts]
        return time.perf_counter() - t0, ids

    def batched() -> tuple[float, list[list[int]]]:
        t0 = time.perf_counter()
        out = [r for v in variants for r in rt.top_k_many(texts, v, batch_size=args.batch_size)]
        elapsed = time.perf_counter() - t0
        assert all(isinstance(r, TopKLogits) for r in out)
        return elapsed, [[t.token_id for t in r.tokens] for r in out if isinstance(r, TopKLogits)]

    n = len(texts) * len(variants)
    print(
        f"toy organism, {len(texts)} prompts x {len(variants)} variants, batch {args.batch_size}, "
        f"{args.threads} threads, device {rt.device}",
        flush=True,
    )
    rates_s, rates_b = [], []
    for r in range(args.rounds):  # alternate, so drift hits both alike
        ts, ids_s = single()
        tb, ids_b = batched()
        mismatches = sum(a != b for a, b in zip(ids_s, ids_b, strict=True))
        rates_s.append(n / ts)
        rates_b.append(n / tb)
        print(
            f"round {r + 1}: one at a time {n / ts:8.1f} prompts/s | batched {n / tb:8.1f} "
            f"prompts/s | ratio {ts / tb:5.2f}x | top-k id mismatches {mismatches}",
            flush=True,
        )
    ratio = statistics.median(rates_b) / statistics.median(rates_s)
    print(
        f"median: one at a time {statistics.median(rates_s):.1f} prompts/s, batched "
        f"{statistics.median(rates_b):.1f} prompts/s: {ratio:.2f}x (goal >= 8x on CPU: "
        f"{'ok' if ratio >= 8 else 'MISSED'})"
    )


if __name__ == "__main__":
    main()
