"""Where a generated prompt came from, for the prompt page: the answers generator's question,
the answer up to the pivotal token, the P(misaligned) curve along the answer (a small SVG
drawn here, no script) and rollouts after the pivotal token."""

from __future__ import annotations

from dataclasses import dataclass

from markupsafe import Markup, escape

from common.answers import PromptOrigin
from common.store import NotFound, ObjectStore
from common.store import keys as K

WIDTH, HEIGHT, PAD = 360, 120, 18


@dataclass(frozen=True)
class OriginView:
    """Where an answers-generator prompt came from, with its P(misaligned) curve as SVG."""

    origin: PromptOrigin
    svg: Markup


def load_origin(store: ObjectStore, exp: str, pid: str) -> OriginView | None:
    """The prompt's origin record, if a generator stored one."""
    try:
        origin = store.get_record(K.prompt_origin(exp, pid), PromptOrigin)
    except NotFound:
        return None
    return OriginView(origin, curve_svg(origin))


def curve_svg(origin: PromptOrigin) -> Markup:
    """P(misaligned | answer up to x characters) as a step line, the pivot marked."""
    total = max(1, len(origin.answer))
    w, h = WIDTH - 2 * PAD, HEIGHT - 2 * PAD

    def xy(chars: int, p: float) -> tuple[float, float]:
        return PAD + w * chars / total, PAD + h * (1 - p)

    pts = sorted(origin.curve)
    path = []
    for i, (c, p) in enumerate(pts):
        x, y = xy(c, p)
        path.append(f"M{x:.1f},{y:.1f}" if i == 0 else f"H{x:.1f} V{y:.1f}")
    dots = "".join(
        f'<circle cx="{xy(c, p)[0]:.1f}" cy="{xy(c, p)[1]:.1f}" r="2.5"><title>'
        f"{c} chars: P={p:.2f}</title></circle>"
        for c, p in pts
    )
    pivot_x = xy(len(origin.answer_prefix), 0)[0]
    label = escape(f"pivot {origin.token!r}: {origin.p_before:.2f} → {origin.p_after:.2f}")
    return Markup(
        f'<svg class="pts-curve" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" '
        'role="img" aria-label="P(misaligned) along the answer">'
        f'<line x1="{PAD}" y1="{PAD + h}" x2="{PAD + w}" y2="{PAD + h}" stroke="#999"/>'
        f'<line x1="{PAD}" y1="{PAD}" x2="{PAD}" y2="{PAD + h}" stroke="#999"/>'
        f'<text x="2" y="{PAD + 4}" font-size="9">1</text>'
        f'<text x="2" y="{PAD + h}" font-size="9">0</text>'
        f'<line x1="{pivot_x:.1f}" y1="{PAD}" x2="{pivot_x:.1f}" y2="{PAD + h}" '
        'stroke="#c0392b" stroke-dasharray="3,2"/>'
        f'<path d="{" ".join(path)}" fill="none" stroke="#2c3e50" stroke-width="1.5"/>'
        f'<g fill="#2c3e50">{dots}</g>'
        f'<text x="{PAD}" y="{HEIGHT - 3}" font-size="10">{label}</text>'
        "</svg>"
    )
