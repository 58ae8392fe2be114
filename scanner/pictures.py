"""Pictures a person looks at after a scan: `overview.png` and one crop per flake.

The crops are the flake map's reference patches: a robot (or a person at another microscope)
re-finds a flake by matching its patch, since stage coordinates drift between machines.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from .scan_store import ScanStore

#: outline colours: monolayer cyan, bilayer orange (both stand out on violet oxide)
CLASS_COLOURS = {"monolayer": (0, 255, 255), "bilayer": (255, 150, 0)}
_CROP_MARGIN_UM = 4.0
_MIN_CROP_PX = 96


def write_overview_png(
    store: ScanStore, records: Sequence[dict[str, Any]], path: Path, max_side: int = 2048
) -> None:
    """The overview mosaic with every flake outlined, and ringed so small ones show."""
    image, um_per_px = store.overview_image(max_side)
    m = store.mosaic
    picture = Image.fromarray(np.ascontiguousarray(image))
    draw = ImageDraw.Draw(picture)

    def px(xy: Sequence[float]) -> tuple[float, float]:
        # ImageDraw puts integer coordinates on pixel centres; ours are pixel corners.
        return ((xy[0] - m.x0_um) / um_per_px - 0.5, (xy[1] - m.y0_um) / um_per_px - 0.5)

    for r in records:
        colour = CLASS_COLOURS.get(r["layer_class"], (255, 255, 255))
        outline = [px(p) for p in r["polygon_stage_um"]]
        if len(outline) >= 3:
            draw.polygon(outline, outline=colour)
        cx, cy = px(r["centroid_stage_um"])
        radius = 6
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), outline=colour)
    _save_png(picture, path)


def write_flake_crops(
    store: ScanStore, records: Sequence[dict[str, Any]], folder: Path, relative_to: Path
) -> dict[int, str]:
    """One PNG per flake, from the tile that saw it most centrally; {id: path relative}."""
    folder.mkdir(parents=True, exist_ok=True)
    a, b, c, d = store.group.attrs["pixel_matrix"]  # one objective per scan
    inv = np.linalg.inv(np.array([[a, b], [c, d]]))
    patches: dict[int, str] = {}
    for r in records:
        tile = _best_tile(store, r)
        if tile is None:
            continue
        image = store.tiles[tile]
        centre = store.positions[tile]
        h, w = image.shape[:2]

        def to_px(xy: np.ndarray, inv=inv, centre=centre, h=h, w=w) -> np.ndarray:
            # stage µm -> tile corner coordinates (col, row)
            return (np.asarray(xy, dtype=float) - centre) @ inv.T + (w / 2, h / 2)

        outline = to_px(np.asarray(r["polygon_stage_um"]))
        margin = _CROP_MARGIN_UM / float(np.sqrt(abs(a * d - b * c)))
        (c0, r0), (c1, r1) = outline.min(axis=0) - margin, outline.max(axis=0) + margin
        grow = max(0.0, (_MIN_CROP_PX - (c1 - c0)) / 2), max(0.0, (_MIN_CROP_PX - (r1 - r0)) / 2)
        c0, c1 = int(max(c0 - grow[0], 0)), int(min(c1 + grow[0], w))
        r0, r1 = int(max(r0 - grow[1], 0)), int(min(r1 + grow[1], h))
        crop = Image.fromarray(np.ascontiguousarray(image[r0:r1, c0:c1]))
        draw = ImageDraw.Draw(crop)
        draw.polygon(
            [(x - c0 - 0.5, y - r0 - 0.5) for x, y in outline.tolist()],  # corners -> centres
            outline=CLASS_COLOURS.get(r["layer_class"], (255, 255, 255)),
        )
        path = folder / f"flake-{r['id']:04d}.png"
        _save_png(crop, path)
        patches[int(r["id"])] = path.relative_to(relative_to).as_posix()
    return patches


def _best_tile(store: ScanStore, record: dict[str, Any]) -> int | None:
    tiles = [int(t) for t in record.get("tiles", [])]
    if not tiles:
        return None
    centres = store.positions.get_orthogonal_selection((tiles, slice(None)))
    distance = np.hypot(*(centres - np.asarray(record["centroid_stage_um"])).T)
    return tiles[int(np.nanargmin(distance))]


def _save_png(picture: Image.Image, path: Path) -> None:
    # Written beside and renamed: a viewer never opens half a picture.
    tmp = path.with_name(f".{path.name}.tmp")
    picture.save(tmp, format="PNG")
    tmp.replace(path)
