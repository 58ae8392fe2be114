"""flakes.json, the flake map the transfer robot reads: written whole or not at all.

Ids are 0..N-1 in chip reading order: flakes sorted by their chip-frame centroid, y then x
(rounded to the 1 nm written), then layer class. The same flakes therefore get the same ids
whatever order the tiles were processed in, and a reader can re-derive them; a rewrite in the
middle of a scan renumbers flakes after a newly found one, so the final map is the one to pick
from. `score_against_truth` scores any flake map's records against the simulated world's truth.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import shapely
from pydantic import BaseModel, ConfigDict, computed_field
from shapely.geometry import LinearRing, Polygon

from .flakes import LAYER_LABELS, Flake, LayerClass

SCHEMA_VERSION = "1.0"
SCHEMA_PATH = Path(__file__).parent / "schemas" / f"flakes-{SCHEMA_VERSION}.schema.json"
#: keys the schema requires of `scan`; a test holds this to the schema file
SCAN_REQUIRED = ("started", "chip_outline_stage_um", "pixel_size_um")
_DECIMALS = 3  # 1 nm: far below a pixel (150 nm at 100×), as truth.json


class FlakeMapError(ValueError):
    """A flake map that cannot be written or read as schema 1.x."""


class ChipFrame(BaseModel):
    """Stage to chip: chip = R(−rotation_deg) · (stage − chip_origin_stage_um)."""

    model_config = ConfigDict(frozen=True)

    chip_origin_stage_um: tuple[float, float]
    rotation_deg: float = 0.0

    def to_chip(self, xy: np.ndarray) -> np.ndarray:
        """Chip µm of stage points (… × 2)."""
        theta = math.radians(self.rotation_deg)
        cos, sin = math.cos(theta), math.sin(theta)
        d = np.asarray(xy, dtype=float) - self.chip_origin_stage_um
        return np.stack([cos * d[..., 0] + sin * d[..., 1], -sin * d[..., 0] + cos * d[..., 1]], -1)


def flake_records(flakes: Sequence[Flake], frame: ChipFrame) -> list[dict[str, Any]]:
    """Records in id order (see the module's note on ids)."""
    keyed = []
    for f in flakes:
        cx, cy = np.round(frame.to_chip(np.array(f.centroid_stage_um)), _DECIMALS).tolist()
        keyed.append(((cy, cx, f.layer_class), f))
    keyed.sort(key=lambda k: k[0])
    return [_record(i, f, frame) for i, (_, f) in enumerate(keyed)]


def _record(flake_id: int, f: Flake, frame: ChipFrame) -> dict[str, Any]:
    centroid = np.array(f.centroid_stage_um)
    outline = np.asarray(f.polygon.exterior.coords)
    record: dict[str, Any] = {
        "id": flake_id,
        "layer_class": f.layer_class,
        "confidence": round(min(max(f.confidence, 0.0), 1.0), 4),
        "centroid_stage_um": _round(centroid),
        "centroid_chip_um": _round(frame.to_chip(centroid)),
        "bbox_stage_um": _round(np.array(f.bbox_stage_um)),
        "polygon_stage_um": _round(outline),
        "holes_stage_um": [_round(np.asarray(h.coords)) for h in f.polygon.interiors],
        "polygon_chip_um": _round(frame.to_chip(outline)),
        "area_um2": round(f.area_um2, _DECIMALS),
        "tiles": list(f.tiles),
    }
    if f.patch is not None:
        record["patch"] = f.patch
    return record


def _round(a: np.ndarray) -> list:
    return np.round(a, _DECIMALS).tolist()


def write_flake_map(
    path: str | os.PathLike[str],
    flakes: Sequence[Flake],
    *,
    scan_meta: dict[str, Any],
    chip_origin_stage_um: tuple[float, float],
    rotation_deg: float = 0.0,
    patches: Mapping[int, str] | None = None,
) -> dict[str, Any]:
    """Replace `path` with a flake map, atomically; returns the document (metadata as given).

    A reader sees the old file or the new one, never part of one; a write that fails (say, a
    value JSON cannot hold) leaves the old file as it was. A process killed mid-write may leave
    a hidden `.flakes.json.*.tmp` beside it, never a damaged flakes.json.
    """
    missing = [k for k in SCAN_REQUIRED if k not in scan_meta]
    if missing:
        raise FlakeMapError(f"scan metadata lacks {', '.join(missing)} (required by the schema)")
    frame = ChipFrame(chip_origin_stage_um=chip_origin_stage_um, rotation_deg=rotation_deg)
    doc = {
        "schema_version": SCHEMA_VERSION,
        "scan": scan_meta,
        "frames": frame.model_dump(mode="json"),
        "flakes": flake_records(flakes, frame),
    }
    for record in doc["flakes"]:
        if patches and record["id"] in patches:
            record["patch"] = patches[record["id"]]
    replace_atomically(Path(path), dump_flake_map(doc))
    return doc


def replace_atomically(path: Path, text: str) -> None:
    """Replace `path` with `text`: a reader sees the old file or the new one, never part."""
    # Temp file in the same folder: os.replace is atomic only within one file system.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        # mkstemp makes the file owner-only; the robot may read as another user.
        os.chmod(tmp, path.stat().st_mode & 0o777 if path.exists() else 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_folder(path.parent)


def dump_flake_map(doc: dict[str, Any]) -> str:
    """A flake map (or truth.json) as text: one flake per line, so a person can read and
    diff the file and it stays compact."""
    head = {k: v for k, v in doc.items() if k != "flakes"}
    text = json.dumps(head, indent=1, default=_json_default, allow_nan=False)
    parts = [text[:-2] + ',\n "flakes": [']
    for i, record in enumerate(doc["flakes"]):
        parts.append(("\n  " if i == 0 else ",\n  ") + json.dumps(record, allow_nan=False))
    parts.append("\n ]\n}\n")
    return "".join(parts)


def _json_default(value: Any) -> Any:
    # What scan metadata naturally holds; anything else is a bug and must fail the write.
    if isinstance(value, np.generic | np.ndarray):
        return value.tolist()
    if isinstance(value, dt.datetime | dt.date):
        return value.isoformat()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Polygon):
        value = value.exterior
    if isinstance(value, LinearRing):
        return np.asarray(value.coords).tolist()
    raise TypeError(f"{type(value).__name__} in scan metadata is not JSON serialisable")


def _fsync_folder(folder: Path) -> None:
    # The rename is durable only once the folder's entry is on disk (POSIX; no-op elsewhere).
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_flake_map(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The document at `path`, checked to be a 1.x flake map (1.x only ever adds fields)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"no flake map at {path} (has the scan written one yet?)") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise FlakeMapError(
            f"{path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})"
        ) from None
    if not isinstance(doc, dict):
        raise FlakeMapError(f"{path} holds a JSON {type(doc).__name__}, not a flake map object")
    version = doc.get("schema_version")
    major = SCHEMA_VERSION.split(".")[0]
    if not isinstance(version, str) or version.split(".")[0] != major:
        raise FlakeMapError(
            f"{path} has schema_version {version!r}; this flakescan reads {major}.x "
            f"(written as {SCHEMA_VERSION})"
        )
    if not isinstance(doc.get("flakes"), list):
        raise FlakeMapError(f"{path} has no 'flakes' list")
    return doc


# ------------------------------------------------------------------ scoring against truth
class ClassScore(BaseModel):
    """How one layer class fared. Counts are of flakes at or above the score's minimum area."""

    layer_class: LayerClass
    truth: int
    found: int
    #: truth flakes (counted) with a matching found flake
    matched_truth: int
    #: found flakes (counted) with a matching truth flake
    matched_found: int
    #: unmatched found flakes (counted) that would match a truth flake of another class
    wrong_class: int
    centroid_error_median_um: float | None
    centroid_error_max_um: float | None

    @computed_field
    @property
    def precision(self) -> float | None:
        return self.matched_found / self.found if self.found else None

    @computed_field
    @property
    def recall(self) -> float | None:
        return self.matched_truth / self.truth if self.truth else None


class ScanScore(BaseModel):
    min_area_um2: float
    match_um: float
    min_iou: float
    classes: dict[LayerClass, ClassScore]

    def format_table(self) -> str:
        def num(v: float | None, fmt: str = ".3f") -> str:
            return "—" if v is None else format(v, fmt)

        lines = [
            f"flakes ≥ {self.min_area_um2:g} µm²; match: same class and IoU > {self.min_iou:g} "
            f"or centroids within {self.match_um:g} µm",
            f"{'layer class':<12}{'truth':>7}{'found':>7}{'recall':>8}{'precision':>11}"
            f"{'wrong class':>13}   centroid error µm (median / max)",
        ]
        for c in self.classes.values():
            lines.append(
                f"{c.layer_class:<12}{c.truth:>7}{c.found:>7}{num(c.recall):>8}"
                f"{num(c.precision):>11}{c.wrong_class:>13}   "
                f"{num(c.centroid_error_median_um)} / {num(c.centroid_error_max_um)}"
            )
        return "\n".join(lines)


class _Shapes:
    """Records' geometry as arrays, for vectorised GEOS calls."""

    def __init__(self, records: Sequence[dict[str, Any]]) -> None:
        self.layer_class = np.array([r["layer_class"] for r in records], dtype=object)
        self.area = np.array([float(r["area_um2"]) for r in records])
        self.centroid = np.array([r["centroid_stage_um"] for r in records], dtype=float)
        self.centroid = self.centroid.reshape(-1, 2)
        polygons = [Polygon(r["polygon_stage_um"], r.get("holes_stage_um") or []) for r in records]
        # A hand-edited or foreign record may self-intersect; GEOS overlay would refuse it.
        self.polygon = shapely.make_valid(np.array(polygons, dtype=object))


def score_against_truth(
    found: Sequence[dict[str, Any]],
    truth: Sequence[dict[str, Any]],
    *,
    min_area_um2: float = 10.0,
    match_um: float = 2.0,
    min_iou: float = 0.3,
) -> ScanScore:
    """Precision and recall per layer class of flake records against truth records.

    A found and a truth flake can match when they are of the same class and their polygons
    overlap with IoU > `min_iou` or their centroids lie within `match_um`; pairs are taken
    one to one, greedily, highest IoU first (then nearest centroids). Matching uses every
    flake, but recall counts only truth flakes of at least `min_area_um2` and precision only
    found flakes of at least it, so a flake whose area straddles the threshold is neither a
    miss nor a false alarm. Centroid errors are over matched pairs whose truth flake counts.
    """
    f, t = _Shapes(found), _Shapes(truth)
    fi, ti, iou, dist = _candidates(f, t, match_um)
    ok = (iou > min_iou) | (dist <= match_um)
    fi, ti, iou, dist = fi[ok], ti[ok], iou[ok], dist[ok]
    same = f.layer_class[fi] == t.layer_class[ti]
    match_f = np.full(len(found), -1)
    match_t = np.full(len(truth), -1)
    for k in np.lexsort((ti, fi, dist, -iou)):
        if same[k] and match_f[fi[k]] < 0 and match_t[ti[k]] < 0:
            match_f[fi[k]], match_t[ti[k]] = ti[k], fi[k]
    near_other = np.zeros(len(found), dtype=bool)
    near_other[fi[~same]] = True
    counted_f, counted_t = f.area >= min_area_um2, t.area >= min_area_um2
    classes = {}
    for layer_class in LAYER_LABELS.values():
        in_f = counted_f & (f.layer_class == layer_class)
        in_t = counted_t & (t.layer_class == layer_class)
        pairs = np.flatnonzero(in_t & (match_t >= 0))
        errors = np.hypot(*(t.centroid[pairs] - f.centroid[match_t[pairs]]).T)
        classes[layer_class] = ClassScore(
            layer_class=layer_class,
            truth=int(in_t.sum()),
            found=int(in_f.sum()),
            matched_truth=len(pairs),
            matched_found=int((in_f & (match_f >= 0)).sum()),
            wrong_class=int((in_f & (match_f < 0) & near_other).sum()),
            centroid_error_median_um=float(np.median(errors)) if len(errors) else None,
            centroid_error_max_um=float(errors.max()) if len(errors) else None,
        )
    return ScanScore(min_area_um2=min_area_um2, match_um=match_um, min_iou=min_iou, classes=classes)


def _candidates(
    f: _Shapes, t: _Shapes, match_um: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Pairs (found, truth) that overlap or whose centroids are near, with IoU and distance."""
    if not len(f.area) or not len(t.area):
        empty = np.zeros(0, dtype=int)
        return empty, empty, empty.astype(float), empty.astype(float)
    overlap = shapely.STRtree(t.polygon).query(f.polygon, predicate="intersects")
    near = shapely.STRtree(shapely.points(t.centroid)).query(
        shapely.points(f.centroid), predicate="dwithin", distance=match_um
    )
    fi, ti = np.unique(np.concatenate([overlap, near], axis=1), axis=1)
    inter = shapely.area(shapely.intersection(f.polygon[fi], t.polygon[ti]))
    union = shapely.area(f.polygon[fi]) + shapely.area(t.polygon[ti]) - inter
    iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    return fi, ti, iou, np.hypot(*(f.centroid[fi] - t.centroid[ti]).T)
