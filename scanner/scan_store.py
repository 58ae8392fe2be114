"""`scan.zarr` (Zarr v3): every tile, its label mask and position, and an overview mosaic.

Layout (one chunk per tile, so a tile is written once and read back alone):

    tiles       (n_tiles, 512, 512, 3) uint8    raw RGB tiles
    labels      (n_tiles, 512, 512)    uint8    0 other, 1 monolayer, 2 bilayer; 255 not yet
    positions   (n_tiles, 2)           float64  tile centre, stage µm (NaN: not yet)
    field_status (n_fields,)           uint8    0 pending, 1 done, 2 failed
    overview/0..k (3, H, W)            uint8    mosaic pyramid, OME-NGFF 0.5 multiscales

Tile t of field f is `f * tiles_per_field + k`: plan order, so a resumed scan writes into the
same places. The overview's rows run along stage +y and its columns along +x, like the
tiles; its `ome` attributes place it in stage µm, so napari (with napari-ome-zarr) opens it
at the right scale.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from PIL import Image

from .flakes import PixelToStage

PENDING, DONE, FAILED = 0, 1, 2
NOT_SEGMENTED = 255
_CHUNK = 512
_SMALLEST_LEVEL_PX = 256


@dataclass(frozen=True)
class MosaicGrid:
    """Where the overview's finest level lies on the stage."""

    x0_um: float
    y0_um: float
    um_per_px: float
    shape: tuple[int, int]  # rows, cols

    @classmethod
    def covering(cls, bounds: tuple[float, float, float, float], um_per_px: float) -> MosaicGrid:
        x0, y0, x1, y1 = bounds
        shape = (max(1, math.ceil((y1 - y0) / um_per_px)), max(1, math.ceil((x1 - x0) / um_per_px)))
        return cls(x0, y0, um_per_px, shape)


class ScanStore:
    """Writes and reads `scan.zarr`. Create with `create`, reopen (resume) with `open`."""

    def __init__(self, group: zarr.Group) -> None:
        self.group = group
        self.tiles = group["tiles"]
        self.labels = group["labels"]
        self.positions = group["positions"]
        self.field_status = group["field_status"]
        self.tiles_per_field = int(group.attrs["tiles_per_field"])
        m = group.attrs["mosaic"]
        self.mosaic = MosaicGrid(m["x0_um"], m["y0_um"], m["um_per_px"], tuple(m["shape"]))
        self.overview = group["overview/0"]

    @classmethod
    def create(
        cls,
        path: Path,
        *,
        n_fields: int,
        tiles_per_field: int,
        tile_shape: tuple[int, int],
        mosaic: MosaicGrid,
        attrs: dict[str, Any],
    ) -> ScanStore:
        group = zarr.open_group(path, mode="w-")  # never over an existing store
        n = max(n_fields * tiles_per_field, 1)
        th, tw = tile_shape
        group.create_array(
            "tiles", shape=(n, th, tw, 3), chunks=(1, th, tw, 3), dtype="uint8", fill_value=0
        )
        group.create_array(
            "labels",
            shape=(n, th, tw),
            chunks=(1, th, tw),
            dtype="uint8",
            fill_value=NOT_SEGMENTED,
        )
        group.create_array(
            "positions",
            shape=(n, 2),
            chunks=(min(n, 4096), 2),
            dtype="float64",
            fill_value=float("nan"),
        )
        group.create_array(
            "field_status",
            shape=(max(n_fields, 1),),
            chunks=(min(max(n_fields, 1), 4096),),
            dtype="uint8",
            fill_value=PENDING,
        )
        rows, cols = mosaic.shape
        overview = group.create_group("overview")
        overview.create_array(
            "0", shape=(3, rows, cols), chunks=(3, _CHUNK, _CHUNK), dtype="uint8", fill_value=0
        )
        group.attrs.update(
            {
                **attrs,
                "tiles_per_field": tiles_per_field,
                "mosaic": {
                    "x0_um": mosaic.x0_um,
                    "y0_um": mosaic.y0_um,
                    "um_per_px": mosaic.um_per_px,
                    "shape": list(mosaic.shape),
                },
            }
        )
        _write_multiscales(overview, mosaic, levels=1)
        return cls(group)

    @classmethod
    def open(cls, path: Path) -> ScanStore:
        return cls(zarr.open_group(path, mode="r+"))

    def tile_index(self, field_index: int, k: int) -> int:
        return field_index * self.tiles_per_field + k

    def write_field(
        self,
        field_index: int,
        tiles: list[tuple[np.ndarray, np.ndarray, PixelToStage]],
        overview_tiles: list[np.ndarray] | None = None,
    ) -> None:
        """A done field's tiles, label masks and positions, and its place in the overview.

        `overview_tiles` (flat-field corrected, say) are pasted into the overview instead of
        the stored tiles, so the mosaic shows no grid of dark field corners.
        """
        for k, (tile, labels, to_stage) in enumerate(tiles):
            t = self.tile_index(field_index, k)
            self.tiles[t] = tile
            self.labels[t] = labels
            self.positions[t] = np.asarray(to_stage.center_um)
            self._paste(tile if overview_tiles is None else overview_tiles[k], to_stage)
        self.field_status[field_index] = DONE

    def mark_failed(self, field_index: int) -> None:
        self.field_status[field_index] = FAILED

    def _paste(self, tile: np.ndarray, to_stage: PixelToStage) -> None:
        m = self.mosaic
        fx0, fy0, fx1, fy1 = to_stage.footprint().bounds
        c0 = max(math.floor((fx0 - m.x0_um) / m.um_per_px), 0)
        r0 = max(math.floor((fy0 - m.y0_um) / m.um_per_px), 0)
        c1 = min(math.ceil((fx1 - m.x0_um) / m.um_per_px), m.shape[1])
        r1 = min(math.ceil((fy1 - m.y0_um) / m.um_per_px), m.shape[0])
        if c1 <= c0 or r1 <= r0:
            return
        # Shrink by whole pixels first (box filter: no aliasing), then one affine resample
        # from mosaic pixels into the tile, which also undoes camera rotation and flip.
        reduce = max(1, int(m.um_per_px / to_stage.pixel_size_um))
        h, w = tile.shape[:2]
        # Whole boxes only: a part-filled last box would paint past the tile's edge.
        whole = tile[: h - h % reduce, : w - w % reduce]
        small = Image.fromarray(np.ascontiguousarray(whole)).reduce(reduce)
        a, b, c, d = to_stage.matrix
        inv = np.linalg.inv(np.array([[a, b], [c, d]])) / reduce  # stage µm -> small-tile px
        cx, cy = to_stage.center_um
        # mosaic pixel -> stage -> tile pixel (corner coordinates) / reduce; PIL adds the
        # half pixel to output coordinates itself
        sx0 = m.x0_um + c0 * m.um_per_px - cx
        sy0 = m.y0_um + r0 * m.um_per_px - cy
        s = m.um_per_px
        coeffs = (
            inv[0, 0] * s,
            inv[0, 1] * s,
            inv[0, 0] * sx0 + inv[0, 1] * sy0 + w / 2 / reduce,
            inv[1, 0] * s,
            inv[1, 1] * s,
            inv[1, 0] * sx0 + inv[1, 1] * sy0 + h / 2 / reduce,
        )
        size = (c1 - c0, r1 - r0)
        patch = small.transform(size, Image.Transform.AFFINE, coeffs, Image.Resampling.BILINEAR)
        seen = Image.new("L", small.size, 255).transform(size, Image.Transform.AFFINE, coeffs)
        mask = np.asarray(seen) > 0
        region = self.overview[:, r0:r1, c0:c1]
        region[:, mask] = np.moveaxis(np.asarray(patch), -1, 0)[:, mask]
        self.overview[:, r0:r1, c0:c1] = region

    def finish_overview(self) -> int:
        """Build the pyramid's coarser levels from level 0; returns the number of levels."""
        overview = self.group["overview"]
        level, prev = 0, self.overview
        while max(prev.shape[1:]) > _SMALLEST_LEVEL_PX:
            level += 1
            rows, cols = (math.ceil(n / 2) for n in prev.shape[1:])
            arr = overview.create_array(
                str(level),
                shape=(3, rows, cols),
                chunks=(3, _CHUNK, _CHUNK),
                dtype="uint8",
                fill_value=0,
                overwrite=True,
            )
            for r, band in _bands(prev):
                arr[:, r // 2 : r // 2 + math.ceil(band.shape[1] / 2)] = _halve(band)
            prev = arr
        _write_multiscales(overview, self.mosaic, levels=level + 1)
        return level + 1

    def overview_image(self, max_side: int = 2048) -> tuple[np.ndarray, float]:
        """The finest overview level no larger than `max_side`, as H×W×3, and its µm per px."""
        overview = self.group["overview"]
        level = 0
        while str(level + 1) in overview and max(overview[str(level)].shape[1:]) > max_side:
            level += 1
        image = np.moveaxis(overview[str(level)][:], 0, -1)
        return image, self.mosaic.um_per_px * 2**level

    def done_fields(self) -> np.ndarray:
        return np.flatnonzero(self.field_status[:] == DONE)


def _bands(arr: zarr.Array, rows: int = 2 * _CHUNK) -> Iterator[tuple[int, np.ndarray]]:
    """Row bands of a (3, H, W) array: a whole 1 cm chip's mosaic never sits in memory."""
    for r in range(0, arr.shape[1], rows):
        yield r, arr[:, r : r + rows]


def _halve(band: np.ndarray) -> np.ndarray:
    _, h, w = band.shape
    padded = np.pad(band, ((0, 0), (0, h % 2), (0, w % 2)), mode="edge").astype(np.uint16)
    s = (
        padded[:, 0::2, 0::2]
        + padded[:, 1::2, 0::2]
        + padded[:, 0::2, 1::2]
        + padded[:, 1::2, 1::2]
    )
    return ((s + 2) // 4).astype(np.uint8)


def _write_multiscales(overview: zarr.Group, mosaic: MosaicGrid, levels: int) -> None:
    datasets = []
    for level in range(levels):
        s = mosaic.um_per_px * 2**level
        datasets.append(
            {
                "path": str(level),
                "coordinateTransformations": [
                    {"type": "scale", "scale": [1.0, s, s]},
                    # OME-NGFF places a pixel's centre at its coordinate
                    {
                        "type": "translation",
                        "translation": [0.0, mosaic.y0_um + s / 2, mosaic.x0_um + s / 2],
                    },
                ],
            }
        )
    overview.attrs["ome"] = {
        "version": "0.5",
        "multiscales": [
            {
                "name": "overview",
                "axes": [
                    {"name": "c", "type": "channel"},
                    {"name": "y", "type": "space", "unit": "micrometer"},
                    {"name": "x", "type": "space", "unit": "micrometer"},
                ],
                "datasets": datasets,
            }
        ],
        "omero": {
            "channels": [
                {
                    "label": name,
                    "color": color,
                    "window": {"start": 0, "end": 255, "min": 0, "max": 255},
                }
                for name, color in (("red", "FF0000"), ("green", "00FF00"), ("blue", "0000FF"))
            ],
            "rdefs": {"model": "color"},
        },
    }
