"""Stock circuit-tracer ``attribute()`` vs emc's driver (``services.attribution.ct.fast.attribute``) on a random Llama.

Each measured call runs in its own fresh process (so its peak RSS is its own), on the
``LLAMA16`` model of tests/fixtures/attribution_models.py: 16 layers, d_model 512, 8192 transcoder features per
layer, vocab 32k, a 24-token prompt (~36k active features).

    python bench_attr.py headline [--max-feature-nodes 4096] [--batch-size 256]
        stock vs fast side by side: seconds, ratio, peak RSS, max |diff| of the graphs
    python bench_attr.py sweep [--rows 16,32,64,128,256] [--max-feature-nodes N]
        the effect of batch_size / rows per backward pass on CPU, for both
    python bench_attr.py passes [--rows-list 16,32,64,128,256]
        the pieces by width in one process: forward seconds, one backward pass stock vs fast
    python bench_attr.py one --mode fast --rows 32 ...
        one measurement (what the other commands run in a subprocess), JSON on stdout

``peak_rss_gb`` is the process's peak resident memory; ``extra_gb`` is that minus the
resident memory after loading the model (what attribution itself added).
"""

from __future__ import annotations

import argparse
import json
import os
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
PY = sys.executable


def _rss_gb() -> float:
    """Current resident set size in GB (Linux /proc)."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 1e9


def _peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux


def one(args: argparse.Namespace) -> dict[str, Any]:
    """Load the model, run one attribution, report (and optionally save the graph)."""
    import torch

    from services.attribution.ct import fast as fast_attr
    from tests.fixtures import attribution_models as models

    torch.set_num_threads(args.threads)
    spec = models.SPECS[args.model]
    model = models.load(spec)
    ids = models.prompt(spec, args.n_tokens)
    targets = None if args.targets is None else [int(t) for t in args.targets.split(",")]
    base_gb = _rss_gb()
    timings: dict[str, float] = {}
    load0 = os.getloadavg()[0]
    c0, t0 = time.process_time(), time.perf_counter()
    graph = fast_attr.attribute(
        model,
        ids,
        max_feature_nodes=args.max_feature_nodes,
        batch_size=args.batch_size,
        max_n_logits=10,
        desired_logit_prob=0.95,
        target_token_ids=targets,
        rows_per_pass=args.rows,
        fast=args.mode != "stock",
        contraction="gather" if args.mode == "driver-only" else "matmul",
        timings=timings,
    )
    seconds = time.perf_counter() - t0
    cpu_seconds = time.process_time() - c0
    peak = _peak_gb()
    if args.save:
        torch.save(
            {
                "adjacency": graph.adjacency_matrix,
                "active": graph.active_features,
                "selected": graph.selected_features,
                "targets": [int(t.vocab_idx) for t in graph.logit_targets],
                "values": graph.activation_values,
            },
            args.save,
        )
    return {
        "mode": args.mode,
        "batch_size": args.batch_size,
        "rows": timings.get("rows", args.batch_size),
        "max_feature_nodes": args.max_feature_nodes,
        "n_active": int(graph.active_features.shape[0]),
        "seconds": round(seconds, 2),
        "cpu_seconds": round(cpu_seconds, 2),
        "loadavg": [round(load0, 1), round(os.getloadavg()[0], 1)],
        "peak_rss_gb": round(peak, 2),
        "extra_gb": round(peak - base_gb, 2),
        "phases": {k: round(v, 2) for k, v in timings.items()},
    }


def _spawn(**kw: Any) -> dict[str, Any]:
    cmd = [PY, str(Path(__file__).resolve()), "one"]
    for k, v in kw.items():
        if v is not None:
            cmd += [f"--{k.replace('_', '-')}", str(v)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def _compare(a: str, b: str) -> dict[str, Any]:
    import torch

    ga, gb = torch.load(a), torch.load(b)
    same_shape = ga["adjacency"].shape == gb["adjacency"].shape
    return {
        "max_abs_diff": float((ga["adjacency"] - gb["adjacency"]).abs().max())
        if same_shape
        else float("nan"),
        "max_abs_value": float(ga["adjacency"].abs().max()),
        "same_active_features": bool(torch.equal(ga["active"], gb["active"])),
        "same_activation_values": bool(torch.equal(ga["values"], gb["values"])),
        "same_selected_features": bool(torch.equal(ga["selected"], gb["selected"])),
        "same_logit_targets": ga["targets"] == gb["targets"],
        "adjacency_shape": list(ga["adjacency"].shape),
    }


def headline(args: argparse.Namespace) -> None:
    """Stock and fast in one run, same graph settings, each in its own process."""
    with tempfile.TemporaryDirectory() as tmp:
        common = {
            "model": args.model,
            "n_tokens": args.n_tokens,
            "max_feature_nodes": args.max_feature_nodes,
            "batch_size": args.batch_size,
            "threads": args.threads,
        }
        print(f"settings: {json.dumps(common)}", flush=True)
        stock = _spawn(mode="stock", save=f"{tmp}/stock.pt", **common)
        print(f"stock: {json.dumps(stock)}", flush=True)
        fast = _spawn(mode="fast", rows=args.rows, save=f"{tmp}/fast.pt", **common)
        print(f"fast:  {json.dumps(fast)}", flush=True)
        cmp = _compare(f"{tmp}/stock.pt", f"{tmp}/fast.pt")
    print(f"equivalence: {json.dumps(cmp)}")
    print(
        f"\nstock attribute(): {stock['seconds']:8.1f} s  peak RSS {stock['peak_rss_gb']:.2f} GB "
        f"(+{stock['extra_gb']:.2f} GB over the loaded model)"
    )
    print(
        f"fast  attribute(): {fast['seconds']:8.1f} s  peak RSS {fast['peak_rss_gb']:.2f} GB "
        f"(+{fast['extra_gb']:.2f} GB), rows per pass {fast['rows']}"
    )
    print(
        f"speed-up: {stock['seconds'] / fast['seconds']:.2f}x   max |diff| {cmp['max_abs_diff']:.2e}"
    )


def sweep(args: argparse.Namespace) -> None:
    """Seconds by rows per backward pass: fast (graph fixed by --batch-size) and stock
    (where batch_size is both, so its graph changes with it)."""
    rows = [int(r) for r in args.rows_list.split(",")]
    common = {
        "model": args.model,
        "n_tokens": args.n_tokens,
        "max_feature_nodes": args.max_feature_nodes,
        "threads": args.threads,
    }
    print(f"settings: {json.dumps(common)}", flush=True)
    for mode in args.modes.split(","):
        for r in rows:
            kw = dict(common)
            if mode == "stock":
                kw["batch_size"] = r
                res = _spawn(mode="stock", **kw)
            else:
                kw["batch_size"] = args.batch_size
                res = _spawn(mode=mode, rows=r, **kw)
            print(json.dumps(res), flush=True)


def passes(args: argparse.Namespace) -> None:
    """Cost of the pieces by width, in one process: the forward pass over ``rows`` copies
    and one backward pass of ``rows`` feature rows, stock contraction vs fast, alternating
    so that a busy machine slows both alike (median of ``--repeat``)."""
    import statistics

    import torch

    from services.attribution.ct import fast as fast_attr
    from tests.fixtures import attribution_models as models

    torch.set_num_threads(args.threads)
    spec = models.SPECS[args.model]
    model = models.load(spec)
    tokens = torch.tensor(models.prompt(spec, args.n_tokens))
    for r in [int(x) for x in args.rows_list.split(",")]:
        res: dict[str, Any] = {"rows": r}
        for mode in ("fast", "stock"):
            ctx = model.setup_attribution(tokens)
            if mode == "fast":
                fast_attr.FastContraction.install(ctx)
            t0 = time.perf_counter()
            model.run_forward_pass(tokens, r, ctx)
            res["forward_s"] = round(time.perf_counter() - t0, 3)
            layers, positions, _ = ctx.activation_matrix.indices()
            pick = torch.randperm(len(layers), generator=torch.Generator().manual_seed(r))[:r]
            times = []
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                ctx.compute_batch(
                    layers=layers[pick],
                    positions=positions[pick],
                    inject_values=ctx.encoder_vecs[pick],
                )
                times.append(time.perf_counter() - t0)
            res[f"{mode}_pass_s"] = round(statistics.median(times), 3)
            res[f"{mode}_ms_per_row"] = round(1000 * statistics.median(times) / r, 2)
            del ctx
        res["pass_ratio"] = round(res["stock_pass_s"] / res["fast_pass_s"], 1)
        res["loadavg"] = round(os.getloadavg()[0], 1)
        print(json.dumps(res), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("command", choices=["headline", "sweep", "passes", "one"])
    p.add_argument("--model", default="llama16")
    p.add_argument("--n-tokens", type=int, default=24)
    p.add_argument("--max-feature-nodes", type=int, default=4096)
    p.add_argument("--batch-size", type=int, default=256, help="upstream's batch_size")
    p.add_argument("--rows", type=int, default=None, help="rows per pass (fast; default: auto)")
    p.add_argument("--rows-list", default="16,32,64,128,256", help="sweep: rows per pass")
    p.add_argument("--modes", default="fast,stock", help="sweep: fast, stock, driver-only")
    p.add_argument("--mode", default="fast", choices=["fast", "stock", "driver-only"])
    p.add_argument("--targets", default=None, help="comma-separated target token ids")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--save", default=None)
    p.add_argument("--repeat", type=int, default=3, help="passes: backward passes per width")
    args = p.parse_args()
    if args.command == "one":
        print(json.dumps(one(args)))
    elif args.command == "headline":
        headline(args)
    elif args.command == "passes":
        passes(args)
    else:
        sweep(args)


if __name__ == "__main__":
    main()
