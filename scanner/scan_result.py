"""What a scan reports: progress while it runs, the result and summary.json at the end."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .flakemap import ScanScore, replace_atomically


@dataclass
class ScanProgress:
    fields_total: int
    fields_done: int = 0
    fields_failed: int = 0
    monolayers: int = 0
    bilayers: int = 0
    #: planning, focusing, scanning, finishing, done (or stopped)
    phase: str = "planning"
    #: fields done before this run (a resumed scan)
    fields_resumed: int = 0
    #: tiles read against the chip's oxide colour, not their own (scanner/chip_reference.py)
    tiles_chip_reference: int = 0
    tiles_transparent: int = 0


@dataclass
class ScanResult:
    out: Path
    progress: ScanProgress
    flakes: list[dict[str, Any]]
    failed_fields: list[dict[str, Any]]
    score: ScanScore | None
    wall_s: float
    focus_points: list[tuple[float, float, float]] = field(default_factory=list)


def write_json(path: Path, doc: dict[str, Any]) -> None:
    replace_atomically(path, json.dumps(doc, indent=1) + "\n")


def summary(result: ScanResult) -> dict[str, Any]:
    p = result.progress
    counts = {"monolayer": 0, "bilayer": 0}
    for r in result.flakes:
        counts[r["layer_class"]] += 1
    return {
        "fields_total": p.fields_total,
        "fields_done": p.fields_done,
        "fields_failed": p.fields_failed,
        "fields_resumed": p.fields_resumed,
        "tiles_read_against_chip_oxide": p.tiles_chip_reference,
        "tiles_read_as_transparent_substrate": p.tiles_transparent,
        "flakes": counts,
        "failed_fields": result.failed_fields,
        "focus_points_um": [list(pt) for pt in result.focus_points],
        "wall_s": round(result.wall_s, 2),
        "score": result.score.model_dump(mode="json") if result.score else None,
    }
