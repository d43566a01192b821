"""Graph encoding and analysis vs the number of feature nodes F, against fast attribution.

Graphs are synthetic but shaped like circuit-tracer's at 16 layers x 24 tokens: features in
layer order, causal edges only from earlier layers and earlier-or-same positions, logit
rows over every source. Two kinds of edge weights:

- ``random``: Gaussian, as random model weights give (pruning keeps nearly every edge;
  ``bench/graph_size.py`` and issue 20 saw 87-95% kept on random Llamas);
- ``toylike``: the Gaussian weights times a log-normal factor (sigma 3), so pruning keeps
  ~46% of edges, the middle of what the toy organism's real graphs keep
  (``bench/graph_size.py``: 26-32% base, 59-62% adapted);
- ``heavy``: log-normal magnitudes (sigma 4) with random signs, so that a small share of
  edges carries most of the influence (0.5-7% kept; sparser than the toy's graphs).

Each (F, kind) runs in a fresh process: ``encode`` (pruning, CSR, logit-row correction,
verification) and the analysis of the stored graph (decode + ``rank_features``: influence
solve, scores, shares), seconds and extra peak RSS over what was resident when the phase
began (the peak is reset per phase; the analysis' figure includes the dense decoded graph
it reads). ``toylike`` prunes like the toy's real graphs; ``random`` (what random weights give)
is the worst case, ``heavy`` the sparse end. The exponent of
each cost vs F comes from a log-log fit. Baseline in the same run: emc's fast attribution at
16 layers x 8192 features x 24 tokens (``bench/attribution_speed.py one --mode fast``), and
the 3% / 1 GB goal at F = 8192.

    python bench/encode_scale.py [--sizes 1024,2048,4096,8192] [--kinds random,toylike,heavy]
                                 [--no-attribution] [--threads 2]
    python bench/encode_scale.py one --features 8192 --kind heavy     (one measurement, JSON)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def _rss_gb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 1e9


def _peak_gb() -> float:
    """Peak RSS since the last :func:`_reset_peak` (the process' whole life without one)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1e6
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def _reset_peak() -> None:
    """Start a new peak-RSS window (Linux: ``5`` to ``/proc/self/clear_refs``), so a phase's
    extra memory is not hidden under the peak of building the synthetic graph."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def synthetic_graph(
    f: int, kind: str, *, n_layers: int = 16, n_pos: int = 24, n_logits: int = 10, seed: int = 0
) -> Any:
    """A layer-ordered causal attribution graph with ``f`` feature nodes (see module doc)."""
    import torch

    from common.graph.model import AttributionGraph
    from tests.analysis.synthetic import make_manifest

    gen = torch.Generator().manual_seed(seed)
    layers = torch.sort(torch.randint(0, n_layers, (f,), generator=gen)).values
    pos = torch.randint(1, n_pos, (f,), generator=gen)
    feats = torch.stack([layers, pos, torch.randint(0, 8192, (f,), generator=gen)], 1)
    s = f + (n_layers + 1) * n_pos
    n = s + n_logits
    src_layer = torch.cat(
        [layers, torch.arange(n_layers).repeat_interleave(n_pos), torch.full((n_pos,), -1)]
    )
    src_pos = torch.cat([pos, torch.arange(n_pos).repeat(n_layers), torch.arange(n_pos)])
    adjacency = torch.zeros(n, n)
    rows = adjacency[:f, :s]
    for r0 in range(0, f, 1024):  # a block of rows at a time: no F x S temporaries
        r1 = min(r0 + 1024, f)
        ok = (src_layer[None, :] < layers[r0:r1, None]) & (src_pos[None, :] <= pos[r0:r1, None])
        w = torch.randn(r1 - r0, s, generator=gen)
        if kind == "heavy":
            w = w.sign() * torch.exp(4.0 * torch.randn(r1 - r0, s, generator=gen) - 8.0)
        elif kind == "toylike":  # mean square kept below the Gaussian's: not amplifying
            w = w * torch.exp(3.0 * torch.randn(r1 - r0, s, generator=gen) - 9.0)
        rows[r0:r1] = w * ok / ok.sum(1, keepdim=True).clamp_min(1).sqrt()
    adjacency[s:, :s] = torch.randn(n_logits, s, generator=gen) * 0.05
    activations = torch.rand(f, generator=gen) + 0.5
    probs = [0.5 / n_logits] * n_logits
    manifest = make_manifest(n_layers, n_pos, f, n_logits, logit_probabilities=probs)
    return AttributionGraph(manifest, adjacency, feats, activations)


def one(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from common.graph.artifact import decode, encode
    from common.labels import TokenLabels
    from services.analysis.ranking import rank_features

    torch.set_num_threads(args.threads)
    graph = synthetic_graph(args.features, args.kind)
    ids = graph.manifest.logit_token_ids
    labels = TokenLabels.given({ids[0]: "evil", ids[1]: "evil", ids[2]: "safe"}, source="judge")
    base = _rss_gb()
    _reset_peak()
    t0 = time.perf_counter()
    data, manifest = encode(graph)
    t_encode = time.perf_counter() - t0
    peak_encode = _peak_gb()
    del graph
    before_analysis = _rss_gb()
    _reset_peak()
    t0 = time.perf_counter()
    stored = decode(data, manifest)
    ranking = rank_features(stored, labels)
    t_analysis = time.perf_counter() - t0
    peak_analysis = _peak_gb()
    lim = manifest.limits
    return {
        "features": args.features,
        "kind": args.kind,
        "encode_s": t_encode,
        "analysis_s": t_analysis,
        "encode_extra_gb": max(0.0, peak_encode - base),
        # the decoded graph is dense N x N float32 (what the analysis reads), counted here
        "analysis_extra_gb": max(0.0, peak_analysis - before_analysis),
        "graph_gb": base,
        "edges_kept": float(lim["edges_feature_kept"])
        / max(float(lim["edges_feature_nonzero"]), 1),
        "bytes": len(data),
        "ranked": len(ranking.features),
    }


def _spawn(script: Path, *argv: str) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, str(script), *argv], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{script.name} {' '.join(argv)} failed:\n{proc.stderr[-3000:]}")
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def _exponent(xs: list[float], ys: list[float]) -> float:
    lx, ly = [math.log(x) for x in xs], [math.log(max(y, 1e-9)) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly, strict=True)) / sum(
        (a - mx) ** 2 for a in lx
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = ap.add_subparsers(dest="cmd")
    o = sub.add_parser("one")
    o.add_argument("--features", type=int, required=True)
    o.add_argument("--kind", default="toylike", choices=["random", "toylike", "heavy"])
    o.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sizes", default="1024,2048,4096,8192")
    ap.add_argument("--kinds", default="random,toylike,heavy")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-attribution", action="store_true", help="skip the baseline")
    args = ap.parse_args(argv)
    if args.cmd == "one":
        print(json.dumps(one(args)))
        return 0

    from rich.console import Console
    from rich.table import Table

    console = Console(width=140)
    sizes = [int(x) for x in args.sizes.split(",")]
    kinds = args.kinds.split(",")
    attribution_s = None
    if not args.no_attribution:
        base = _spawn(
            HERE / "attribution_speed.py", "one", "--mode", "fast", "--max-feature-nodes",
            str(max(sizes)), "--threads", str(args.threads),
        )  # fmt: skip
        attribution_s = float(base["seconds"])
        console.print(
            f"baseline: fast attribution, 16 layers x 8192 features x 24 tokens, "
            f"max_feature_nodes={max(sizes)}: {attribution_s:.1f} s, peak RSS "
            f"{base['peak_rss_gb']} GB (+{base['extra_gb']} GB), load {base['loadavg']}"
        )
    rows = {
        (f, k): _spawn(Path(__file__), "one", "--features", str(f), "--kind", k,
                       "--threads", str(args.threads))
        for k in kinds
        for f in sizes
    }  # fmt: skip
    table = Table(
        "kind", "F", "encode s", "analysis s", "encode extra GB", "analysis extra GB", "edges kept",
        "stored MB", "% of attribution",
        title=f"graph encoding and analysis vs F ({args.threads} threads)",
    )  # fmt: skip
    for (f, k), r in rows.items():
        share = (
            f"{100 * (r['encode_s'] + r['analysis_s']) / attribution_s:.1f}%"
            if attribution_s and f == max(sizes)
            else ""
        )
        table.add_row(
            k,
            str(f),
            f"{r['encode_s']:.2f}",
            f"{r['analysis_s']:.2f}",
            f"{r['encode_extra_gb']:.2f}",
            f"{r['analysis_extra_gb']:.2f}",
            f"{r['edges_kept']:.1%}",
            f"{r['bytes'] / 1e6:.1f}",
            share,
        )
    console.print(table)
    for k in kinds:
        xs = [float(f) for f in sizes]
        for what in ("encode_s", "analysis_s"):
            e = _exponent(xs, [rows[f, k][what] for f in sizes])
            console.print(f"{k}: {what.removesuffix('_s')} ~ F^{e:.2f}")
    if attribution_s:
        for k in kinds:
            r = rows[max(sizes), k]
            total = r["encode_s"] + r["analysis_s"]
            console.print(
                f"{k}, F={max(sizes)}: encode + analysis {total:.2f} s = "
                f"{100 * total / attribution_s:.1f}% of attribution (goal <= 3%), extra memory "
                f"encode {r['encode_extra_gb']:.2f} GB, analysis {r['analysis_extra_gb']:.2f} GB "
                "(goal <= 1 GB)"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
