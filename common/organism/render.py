"""Rich tables of an organism build report (behaviour, transcoders, known-answer check)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from common.organism.build import BuildReport


def render_report(report: BuildReport, console: Console) -> None:
    """Print the behaviour table, the transcoder table and the known-answer summary."""
    t = Table(title="Harmful next-token mass at the pivot (mean over prompts)")
    for col in ("domain", "split", "n", "base", "adapted", "adapted, downstream MLPs = base"):
        t.add_column(col, justify="right" if col not in ("domain", "split") else "left")
    for r in report.behaviour:
        patched = r.get("adapted_downstream_patched")
        t.add_row(
            r["domain"],
            r["split"],
            str(r["n"]),
            f"{r['base']:.3f}",
            f"{r['adapted']:.3f}",
            "-" if patched is None else f"{patched:.3f}",
        )
    console.print(t)

    t = Table(title="Transcoders (held-out tokens)")
    for col in ("layer", "var. explained", "at pivot", "mean L0", "L0 at pivot", "dead"):
        t.add_column(col, justify="right")
    for s in report.transcoders:
        t.add_row(
            str(s["layer"]),
            f"{s['variance_explained']:.3f}",
            f"{s['variance_explained_pivot']:.3f}",
            f"{s['mean_l0']:.1f}",
            f"{s['mean_l0_pivot']:.1f}",
            f"{s['dead_fraction']:.1%}",
        )
    console.print(t)

    mech = report.mechanism
    t = Table(
        title=f"Emergence and the planted persona latent (held-out prompts; latent after layer "
        f"{mech['layer']}, cos(LoRA B, u) = {mech['cos_b_u']:+.2f})"
    )
    for col in (
        "domain",
        "base",
        "adapted",
        "adapted / base",
        "base + latent",
        "adapted, write along u removed",
        "write . u / scale",
    ):
        t.add_column(col, justify="left" if col == "domain" else "right")
    for d in mech["domains"]:
        t.add_row(
            d["domain"],
            f"{d['base']:.3f}",
            f"{d['adapted']:.3f}",
            f"{report.emergence.get(d['domain'], float('nan')):.0f}x",
            f"{d['base_persona_on']:.3f}",
            f"{d['adapted_persona_removed']:.3f}",
            f"{d['write_along_u']:+.2f}",
        )
    console.print(t)
    for label, ka in (
        ("held-out medical", report.known_answer),
        ("held-out untrained-domain", report.known_answer_untrained),
    ):
        if ka:
            _known_answer_table(ka, label, console)
    console.print(
        f"built in {report.build_seconds:.1f} s "
        f"({', '.join(f'{k} {v:.1f}' for k, v in report.stage_seconds.model_dump().items())})"
    )


def _known_answer_table(ka: dict[str, Any], label: str, console: Console) -> None:
    t = Table(
        title=f"Known answer: adapted model, {ka['n_prompts']} {label} prompts, "
        f"features of layers {ka['downstream_layers']} at the last position set to 0"
    )
    for col in ("ablation", "harmful mass", "drop"):
        t.add_column(col, justify="right" if col != "ablation" else "left")
    t.add_row("none", f"{ka['harmful']:.3f}", "")
    t.add_row("all downstream", f"{ka['zero_downstream']:.3f}", f"{ka['drop_zero_downstream']:.0%}")
    t.add_row("raised by adapter", f"{ka['zero_raised']:.3f}", f"{ka['drop_zero_raised']:.0%}")
    t.add_row("top-10 changed", f"{ka['zero_top10']:.3f}", f"{ka['drop_zero_top10']:.0%}")
    t.add_row(
        "all downstream -> base values",
        f"{ka['patch_to_base']:.3f}",
        f"{ka['drop_patch_to_base']:.0%}",
    )
    t.add_row("base: none", f"{ka['base_harmful']:.3f}", "")
    t.add_row("base: all downstream", f"{ka['base_zero_downstream']:.3f}", "")
    console.print(t)
