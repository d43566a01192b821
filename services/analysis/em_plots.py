"""PNG plots of steering and EM evaluation (``matplotlib.figure.Figure`` + Agg, no pyplot state)."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from matplotlib.figure import Figure

from services.analysis.em_stats import EM_ALIGNED_MAX, EM_COHERENT_MIN

DPI = 110
CONTROL = "#7f8c8d"
ARM = "#c0392b"


@dataclass(frozen=True)
class RateBar:
    """One bar: a rate k/n with its Wilson 95% interval."""

    name: str
    k: int
    n: int
    lo: float
    hi: float
    control: bool = False

    @property
    def rate(self) -> float:
        """k/n, or 0 when n is 0."""
        return self.k / self.n if self.n else 0.0


def _png(fig: Figure, path: Path | None) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    data = buf.getvalue()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return data


def plot_rates(
    bars: Sequence[RateBar], *, title: str, ylabel: str, path: Path | None = None
) -> bytes:
    """Bar chart of rates with Wilson 95% error bars; the control bar is grey. Returns PNG."""
    fig = Figure(figsize=(max(4.0, 1.1 * len(bars) + 2), 4.2))
    ax = fig.subplots()
    xs = list(range(len(bars)))
    rates = [b.rate for b in bars]
    err = [[max(0.0, b.rate - b.lo) for b in bars], [max(0.0, b.hi - b.rate) for b in bars]]
    ax.bar(xs, rates, color=[CONTROL if b.control else ARM for b in bars], width=0.6)
    ax.errorbar(xs, rates, yerr=err, fmt="none", ecolor="black", capsize=4, lw=1)
    for x, b in zip(xs, bars, strict=True):
        ax.annotate(f"{b.k}/{b.n}", (x, b.hi), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(xs, [b.name for b in bars], rotation=20, ha="right", fontsize=8)
    ax.set_ylim(0, 1.08)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return _png(fig, path)


def plot_em_scatter(
    points: Mapping[str, Sequence[tuple[float, float]]],
    *,
    title: str,
    path: Path | None = None,
) -> bytes:
    """Aligned (y) vs coherent (x) per model, one panel each, the EM region shaded. PNG."""
    names = list(points)
    fig = Figure(figsize=(4.0 * max(len(names), 1), 4.0))
    axes = fig.subplots(1, max(len(names), 1), squeeze=False)[0]
    for ax, name in zip(axes, names or [""], strict=False):
        pts = points.get(name, [])
        ax.axhspan(
            0, EM_ALIGNED_MAX, xmin=EM_COHERENT_MIN / 100, xmax=1, color="#f5b7b1", alpha=0.5
        )
        if pts:
            ax.scatter([c for _, c in pts], [a for a, _ in pts], s=14, alpha=0.6, color=ARM)
        n_em = sum(1 for a, c in pts if a <= EM_ALIGNED_MAX and c > EM_COHERENT_MIN)
        ax.set_title(f"{name}: {n_em}/{len(pts)} misaligned & coherent", fontsize=9)
        ax.set_xlim(-3, 103)
        ax.set_ylim(-3, 103)
        ax.set_xlabel("coherent")
        ax.set_ylabel("aligned")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _png(fig, path)
