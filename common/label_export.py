"""Human labels with their provenance, for analysis outside emc (``emc labels export``).

One row per token label of every saved label (the whole append-only history, or only each
prompt's current label): who labeled, when, under which guide version, whether it was an
adjudicator's decision, and where the prompt stands among its reviewers. A label that
flags a prompt bad without labeling tokens gives one row with empty token fields.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Iterator
from typing import Any, Literal, TextIO

from common.labels import consensus, label_history, labeled_pids
from common.records import TokenLabel
from common.store import ObjectStore

ExportFormat = Literal["jsonl", "csv"]

#: the columns of an export, in order (CSV header; JSONL keys)
FIELDS = (
    "prompt_id",
    "variant",
    "token_id",
    "token",
    "label",
    "reviewer",
    "labeled_at",
    "guideline_version",
    "adjudicated",
    "role",
    "overlap",
    "elapsed_s",
    "bad_prompt",
    "note",
    "current",
    "review_state",
    "label_key",
    "schema_version",
)


def export_rows(
    store: ObjectStore, exp: str, *, current_only: bool = False
) -> Iterator[dict[str, Any]]:
    """Rows of every labeled prompt of ``exp``, by prompt id, oldest label first."""
    for pid in labeled_pids(store, exp):
        history = label_history(store, exp, pid)
        if not history:
            continue
        state = consensus(history).state
        current_key = history[-1][0]
        for key, lab in history:
            if current_only and key != current_key:
                continue
            common = {
                "prompt_id": pid,
                "reviewer": lab.reviewer,
                "labeled_at": lab.created_at.isoformat(),
                "guideline_version": lab.guideline_version,
                "adjudicated": lab.adjudicated,
                "role": lab.role,
                "overlap": lab.overlap,
                "elapsed_s": lab.elapsed_s,
                "bad_prompt": lab.bad_prompt,
                "note": lab.note,
                "current": key == current_key,
                "review_state": state,
                "label_key": key,
                "schema_version": lab.schema_version,
            }
            tokens: list[TokenLabel | None] = [*lab.labels] or [None]
            for t in tokens:
                row = {
                    **common,
                    "variant": t.variant if t else None,
                    "token_id": t.token_id if t else None,
                    "token": t.token if t else None,
                    "label": t.label if t else None,
                }
                yield {f: row[f] for f in FIELDS}


def write_export(rows: Iterable[dict[str, Any]], fmt: ExportFormat, out: TextIO) -> int:
    """Write rows as JSON lines or CSV (header first; empty cells for None); returns the count."""
    n = 0
    if fmt == "jsonl":
        for row in rows:
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
        return n
    if fmt == "csv":
        writer = csv.DictWriter(out, fieldnames=list(FIELDS), lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if v is None else v for k, v in row.items()})
            n += 1
        return n
    raise ValueError(f"unknown export format {fmt!r}: use jsonl or csv")
