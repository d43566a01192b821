"""PNG plots of the analysis report.

Figures are made with ``matplotlib.figure.Figure`` directly (rendered by Agg), not pyplot: no
global state, no display, safe in worker processes.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.figure import Figure

from common.records import node_label
from services.analysis.records import FeatureAggregate, FeatureChange, SharesAggregate

EVIL = "#c0392b"
SAFE = "#2e86c1"
ERROR = "#7f8c8d"
ADAPTER = "#8e44ad"
DPI = 110


def _feature_label(layer: int, feature: int, tokens: Sequence[str] = ()) -> str:
    tok = f" {tokens[0].strip()!r}" if tokens else ""
    return f"{node_label(layer, feature)}{tok}"


def plot_top_features(agg: FeatureAggregate, path: Path, *, top_n: int = 20) -> Path:
    """Horizontal bars: the top features by mean score, annotated with presence and sign."""
    rows = agg.features[:top_n]
    fig = Figure(figsize=(8, 0.35 * max(len(rows), 3) + 1.4))
    ax = fig.subplots()
    if rows:
        labels = [_feature_label(r.layer, r.feature, r.tokens) for r in rows][::-1]
        values = [r.mean_score for r in rows][::-1]
        colors = [EVIL if v >= 0 else SAFE for v in values]
        bars = ax.barh(range(len(rows)), values, color=colors)
        ax.set_yticks(range(len(rows)), labels, fontsize=8)
        n = len(agg.prompt_ids)
        for bar, r in zip(bars, rows[::-1], strict=True):
            ax.annotate(
                f" {r.n_prompts}/{n}, {r.sign_consistency:.0%}",
                (bar.get_width(), bar.get_y() + bar.get_height() / 2),
                va="center",
                ha="left" if r.mean_score >= 0 else "right",
                fontsize=7,
                color="#444",
            )
        ax.axvline(0, color="#888", lw=0.8)
        ax.margins(x=0.25)
    else:
        ax.text(0.5, 0.5, "no divergent prompts ranked yet", ha="center", va="center")
        ax.set_axis_off()
    ax.set_xlabel("mean score: d(P_evil - P_safe) (prompts in / sign consistency)")
    ax.set_title(
        f"{agg.variant}: top features over {len(agg.prompt_ids)} divergent prompts", fontsize=10
    )
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    return path


def plot_layers(agg: FeatureAggregate, path: Path) -> Path:
    """Per layer: evil-pushing (positive) and safe-pushing (negative) score mass."""
    fig = Figure(figsize=(7, 3.6))
    ax = fig.subplots()
    if agg.layers:
        layers = [s.layer for s in agg.layers]
        ax.bar(layers, [s.positive for s in agg.layers], color=EVIL, label="towards evil (+)")
        ax.bar(layers, [s.negative for s in agg.layers], color=SAFE, label="towards safe (-)")
        for s in agg.layers:
            ax.annotate(
                f"{s.n_features}",
                (s.layer, s.positive),
                ha="center",
                va="bottom",
                fontsize=7,
                color="#444",
            )
        ax.set_xticks(layers)
        ax.axhline(0, color="#888", lw=0.8)
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no features", ha="center", va="center")
    ax.set_xlabel("layer (numbers: distinct features)")
    ax.set_ylabel("sum of mean scores")
    ax.set_title(f"{agg.variant}: where the evil-vs-safe score sits", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    return path


def plot_shares(agg: SharesAggregate, path: Path, *, variant: str) -> Path:
    """Per layer: mean share of the score carried by features, error nodes and the adapter."""
    s = agg.shares
    fig = Figure(figsize=(7.5, 3.8))
    ax = fig.subplots()
    layers = [r.layer for r in s.layers]
    width = 0.27 if s.adapter else 0.4
    ax.bar(
        [x - width / 2 for x in layers],
        [r.features for r in s.layers],
        width,
        color=EVIL,
        label="features",
    )
    ax.bar(
        [x + width / 2 for x in layers],
        [r.errors for r in s.layers],
        width,
        color=ERROR,
        label="error nodes",
    )
    if s.adapter:
        ax.bar(
            [x + 1.5 * width for x in layers],
            [r.adapter for r in s.layers],
            width,
            color=ADAPTER,
            label="adapter",
        )
    ax.axhline(0, color="#888", lw=0.8)
    ax.set_xticks(layers)
    ax.yaxis.set_major_formatter(lambda v, _pos: f"{v:.0%}")
    ax.set_xlabel(f"layer (tokens carry {s.tokens:+.0%}; largest feature {s.top_feature:+.1%})")
    ax.set_ylabel("mean share of the score")
    title = f"{variant}: where the evil-vs-safe score goes ({agg.n_prompts} prompts)"
    if s.flag:
        title += f"\nflag: errors carry more than features ({agg.n_flagged} prompts flagged)"
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    return path


def plot_comparison(
    changes: Sequence[FeatureChange],
    path: Path,
    *,
    reference: str,
    variant: str,
    highlight: Sequence[tuple[int, int]] = (),
) -> Path:
    """Scatter of mean activation (and score, where both were ranked): reference vs variant."""
    scored = [c for c in changes if c.reference_score is not None and c.variant_score is not None]
    panels = 2 if scored else 1
    fig = Figure(figsize=(5.2 * panels, 4.6))
    axes = fig.subplots(1, panels, squeeze=False)
    hl = set(highlight)
    labelled = set(highlight[:5])  # name only the strongest: labels of close points overlap

    def scatter(
        ax: Axes, xs: list[float], ys: list[float], keys: list[tuple[int, int]], what: str
    ) -> None:
        base = [i for i, k in enumerate(keys) if k not in hl]
        top = [i for i, k in enumerate(keys) if k in hl]
        ax.scatter([xs[i] for i in base], [ys[i] for i in base], s=8, alpha=0.4, color="#777")
        ax.scatter(
            [xs[i] for i in top],
            [ys[i] for i in top],
            s=22,
            color=EVIL,
            label="top-10 evil features",
        )
        for i in (i for i in top if keys[i] in labelled):
            ax.annotate(f"L{keys[i][0]}/F{keys[i][1]}", (xs[i], ys[i]), fontsize=7)
        lo = min([*xs, *ys, 0.0])
        hi = max([*xs, *ys, 0.0])
        ax.plot([lo, hi], [lo, hi], color="#aaa", lw=0.8, ls="--")
        ax.set_xlabel(f"{reference}: mean {what}")
        ax.set_ylabel(f"{variant}: mean {what}")
        if top:
            ax.legend(fontsize=7, loc="upper left")

    keys = [(c.layer, c.feature) for c in changes]
    if changes:
        scatter(
            axes[0][0],
            [c.reference_activation for c in changes],
            [c.variant_activation for c in changes],
            keys,
            "activation",
        )
    axes[0][0].set_title("feature activation (summed over positions)", fontsize=9)
    if scored:
        scatter(
            axes[0][1],
            [c.reference_score or 0.0 for c in scored],
            [c.variant_score or 0.0 for c in scored],
            [(c.layer, c.feature) for c in scored],
            "score",
        )
        axes[0][1].set_title("evil-vs-safe score (prompts ranked in both)", fontsize=9)
    fig.suptitle(f"{reference} vs {variant} on the same prompts", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    return path
