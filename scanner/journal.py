"""The scan journal: what is done, so a killed scan resumes where it stopped.

`journal.jsonl` gets one line per event, flushed and fsynced before the scan goes on: the
plan, the focus points, and every field's outcome with the flake pieces its tiles showed.
A field's line is written only after its tiles are in `scan.zarr`, so a field in the journal
is never missing its data; a field killed half-way is not in the journal and is scanned
again. The flake map is rebuilt from the journal's pieces (merging is deterministic), so a
resumed scan never reports a flake twice. A line torn by a kill mid-write is ignored.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import shapely
import structlog

from .flakes import TileFlake
from .plan import FieldOfView

log = structlog.get_logger("flakescan.journal")

JOURNAL_NAME = "journal.jsonl"
JOURNAL_VERSION = 1


class JournalError(RuntimeError):
    """A journal that cannot be resumed from (a different plan, or not a flakescan journal)."""


def plan_digest(
    fields: Sequence[FieldOfView],
    frame_shape: tuple[int, int] = (0, 0),
    pixel_matrix: Sequence[float] = (),
) -> str:
    """A fingerprint of the plan and the camera's frame: resuming with a different plan, ROI
    or pixel calibration would misfile tiles or place them wrongly."""
    h = hashlib.sha256()
    h.update(f"{tuple(frame_shape)};{[round(float(v), 9) for v in pixel_matrix]};".encode())
    for f in fields:
        h.update(f"{f.index},{f.row},{f.col},{f.x_um:.3f},{f.y_um:.3f};".encode())
    return h.hexdigest()[:16]


def tile_flake_to_json(f: TileFlake) -> dict[str, Any]:
    # WKB keeps coordinates exact, so a resumed scan merges exactly as an unbroken one.
    return {
        "layer_class": f.layer_class,
        "confidence": f.confidence,
        "tile": f.tile,
        "pixels": f.pixels,
        "touches_edge": f.touches_edge,
        "polygon": shapely.to_wkb(f.polygon, hex=True),
    }


def tile_flake_from_json(d: dict[str, Any], views: dict[int, Any]) -> TileFlake:
    polygon = shapely.from_wkb(d["polygon"])
    return TileFlake(
        layer_class=d["layer_class"],
        confidence=d["confidence"],
        tile=d["tile"],
        pixels=d["pixels"],
        touches_edge=d["touches_edge"],
        field_of_view=views[d["tile"]],
        **TileFlake.geometry_fields(polygon),
    )


@dataclass
class JournalState:
    """What a journal says was done."""

    plan_digest: str | None = None
    #: when the scan was first started (ISO 8601)
    started: str | None = None
    focus_points: list[tuple[float, float, float]] | None = None
    #: field index -> its last line (a field re-scanned on resume has a newer line)
    fields: dict[int, dict[str, Any]] = field(default_factory=dict)
    finished: bool = False
    #: the chip's oxide colour the scan's chip reference started from (scanner/chip_reference.py)
    chip_colour: list[float] | None = None

    def done(self) -> set[int]:
        return {i for i, line in self.fields.items() if line["ok"]}

    def tile_flakes(self) -> list[TileFlake]:
        out: list[TileFlake] = []
        for line in self.fields.values():
            if not line["ok"]:
                continue
            views = {int(k): shapely.from_wkb(v) for k, v in line["views"].items()}
            out += [tile_flake_from_json(d, views) for d in line["flakes"]]
        return out


class Journal:
    """Append-only, one fsynced JSON line per event."""

    def __init__(self, path: Path) -> None:
        self.path = path
        _cut_torn_tail(path)
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 (lives with the scan)

    def write(self, kind: str, **data: Any) -> None:
        # One write call per line: a kill leaves at most this line torn, never two merged.
        self._file.write(json.dumps({"kind": kind, **data}, separators=(",", ":")) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _cut_torn_tail(path: Path) -> None:
    """Drop a last line torn by a kill mid-write, so the next line starts on a line of its
    own (appended to the fragment, it would look like damage on the next resume)."""
    if not path.is_file():
        return
    with open(path, "rb+") as f:
        data = f.read()
        if not data or data.endswith(b"\n"):
            return
        f.truncate(data.rfind(b"\n") + 1)
        f.flush()
        os.fsync(f.fileno())


def read_journal(path: Path) -> JournalState:
    if not path.is_file():
        raise JournalError(f"{path}: no journal here; is this a flakescan scan folder?")
    state = JournalState()
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    for n, raw in enumerate(lines, 1):
        try:
            line = json.loads(raw)
        except json.JSONDecodeError:
            if n == len(lines):  # torn by a kill mid-write: that event did not happen
                log.warning("journal.torn_last_line", path=str(path))
                continue
            raise JournalError(f"{path}:{n}: not a JSON line; the journal is damaged") from None
        kind = line.get("kind")
        if kind == "start":
            if line.get("version") != JOURNAL_VERSION:
                raise JournalError(f"{path}: journal version {line.get('version')} is not 1")
            state.plan_digest = line["plan_digest"]
            state.started = line.get("started")
        elif kind == "focus":
            state.focus_points = [tuple(p) for p in line["points"]]
        elif kind == "field":
            state.fields[int(line["index"])] = line
        elif kind == "finished":
            state.finished = True
        elif kind == "chip_reference":
            state.chip_colour = [float(c) for c in line["colour"]]
    if state.plan_digest is None:
        raise JournalError(f"{path}: the journal has no start line")
    return state
