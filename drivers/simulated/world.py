"""The synthetic chip: substrate, exfoliated or CVD-grown flakes, tape residue and dust, with
ground truth.

Everything is in stage micrometres. A piece is a polygon of one material (a terrace of N
layers, residue, dust). Pieces are painted in a fixed order (residue, then thinner under
thicker, dust last), and both the camera's material raster and the ground truth follow that
order, so what the truth calls a monolayer is exactly what the camera shows as one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import shapely
from PIL import Image, ImageDraw
from shapely.geometry import Polygon, box
from shapely.geometry.base import BaseGeometry

from .config import SimulatedRigConfig
from .optics import DUST_CODE, RESIDUE_CODE, THICK_LAYERS, material_code

LAYER_CLASSES = {1: "monolayer", 2: "bilayer"}
#: material raster value for pixels off the chip (the stage insert around it)
OFF_CHIP_CODE = 255
#: paint order of residue and dust relative to flakes (layer counts sort in between)
_RESIDUE_ORDER, _DUST_ORDER = -1, 10_000


@dataclass(frozen=True)
class Piece:
    """One polygon of one material, as painted."""

    polygon: Polygon
    code: int
    layers: int  # 0 for residue and dust
    order: int


@dataclass(frozen=True)
class TruthFlake:
    """A visible region of one layer count: what a perfect scan would report."""

    id: int
    layers: int
    polygon: Polygon

    @property
    def layer_class(self) -> str:
        return LAYER_CLASSES.get(self.layers, "thick")

    def to_record(self, chip_origin_um: tuple[float, float]) -> dict:
        c = self.polygon.centroid
        return {
            "id": self.id,
            "layer_class": self.layer_class,
            "layers": self.layers,
            "confidence": 1.0,
            "centroid_stage_um": [round(c.x, 3), round(c.y, 3)],
            "centroid_chip_um": [
                round(c.x - chip_origin_um[0], 3),
                round(c.y - chip_origin_um[1], 3),
            ],
            "polygon_stage_um": [
                [round(x, 3), round(y, 3)] for x, y in self.polygon.exterior.coords
            ],
            "area_um2": round(self.polygon.area, 3),
        }


def cleaved_polygon(
    rng: np.random.Generator, center: np.ndarray, radius: float, theta0: float
) -> Polygon:
    """A convex polygon whose edges lie along the crystal's 60° cleavage directions."""
    # Six half-planes with normals 60° apart; uneven offsets give triangles, trapezoids
    # and hexagons with 120° and 60° corners, as cleaved MoS2 shows.
    triangle_like = rng.random() < 0.5
    poly: Polygon = box(-3 * radius, -3 * radius, 3 * radius, 3 * radius)
    for k in range(6):
        a = theta0 + k * np.pi / 3
        far = radius * (
            rng.uniform(0.9, 1.4) if (triangle_like and k % 2) else rng.uniform(0.45, 1.0)
        )
        n = np.array([np.cos(a), np.sin(a)])
        poly = poly.intersection(_half_plane(np.zeros(2), n, far, 10 * radius))
    return shapely.affinity.translate(poly, center[0], center[1])


def grown_triangle(
    rng: np.random.Generator, center: np.ndarray, size: float, theta0: float
) -> BaseGeometry:
    """A CVD crystal: an equilateral triangle of side `size`, half the time corner-cut."""
    r = size / np.sqrt(3)  # circumradius
    normals = [np.array([np.cos(a), np.sin(a)]) for a in theta0 + np.arange(3) * 2 * np.pi / 3]
    tri = Polygon([center + r * n for n in normals])
    if rng.random() < 0.5:
        # Cut each corner by the half-plane (p - c)·n <= far, far 0.7-0.95 r: real crystals
        # grown slowly blunt their tips, and at >= 0.7 r two cuts never meet on an edge
        # (1.73 r long), so the result is always one hexagon.
        for n in normals:
            tri = tri.intersection(_half_plane(center, n, r * rng.uniform(0.7, 0.95), 4 * r))
    return tri


def _half_plane(origin: np.ndarray, n: np.ndarray, far: float, big: float) -> Polygon:
    """{p: (p - origin)·n <= far} as a quadrilateral `big` wide and deep: enough to clip a
    shape smaller than `big` around origin with one polygon intersection."""
    t = np.array([-n[1], n[0]])
    return Polygon(
        [
            origin + far * n + big * t,
            origin + far * n - big * t,
            origin + far * n - big * t - big * n,
            origin + far * n + big * t - big * n,
        ]
    )


class ChipWorld:
    """A whole chip, reproducible from `cfg.seed`."""

    def __init__(self, cfg: SimulatedRigConfig) -> None:
        self.cfg = cfg
        chip = cfg.chip
        x0, y0 = chip.origin_um
        self.outline = box(x0, y0, x0 + chip.width_um, y0 + chip.height_um)
        self.rng = np.random.default_rng(cfg.seed)
        self._oxide_waves = self.rng.normal(size=(3, 4))
        self._warp_phase = self.rng.uniform(0, 2 * np.pi, size=2)
        pieces = self._populate()
        pieces.sort(key=lambda p: p.order)
        self.pieces = pieces
        self._coords = [np.asarray(p.polygon.exterior.coords, dtype=np.float64) for p in pieces]
        self._codes = np.array([p.code for p in pieces], dtype=np.uint8)
        b = np.array([p.polygon.bounds for p in pieces]).reshape(-1, 4)
        self._bounds = b
        self.flakes = self._truth()

    # ---------------------------------------------------------------- building
    def _populate(self) -> list[Piece]:
        cfg, rng = self.cfg.flakes, self.rng
        area_mm2 = self.outline.area / 1e6
        pieces: list[Piece] = []
        grow = self._grown_crystal if cfg.growth == "cvd" else self._thin_flake
        for _ in range(rng.poisson(cfg.thin_flakes_per_mm2 * area_mm2)):
            pieces += grow(self._random_point())
        for _ in range(rng.poisson(cfg.bulk_pieces_per_mm2 * area_mm2)):
            c = self._random_point()
            layers = int(rng.choice((*THICK_LAYERS, 4, 5, 6, 8)))
            poly = cleaved_polygon(rng, c, rng.lognormal(np.log(4.0), 0.7), rng.uniform(0, np.pi))
            pieces.append(self._piece(poly, layers))
        for _ in range(rng.poisson(cfg.residue_per_mm2 * area_mm2)):
            c = self._random_point()
            blobs = [
                shapely.affinity.scale(
                    shapely.Point(c + rng.normal(0, 6, 2)).buffer(1.0, 16),
                    rng.uniform(3, 15),
                    rng.uniform(3, 15),
                )
                for _ in range(rng.integers(2, 6))
            ]
            residue = shapely.union_all(blobs)
            for part in getattr(residue, "geoms", [residue]):
                pieces.append(Piece(part, RESIDUE_CODE, 0, _RESIDUE_ORDER))
        for _ in range(rng.poisson(cfg.dust_per_mm2 * area_mm2)):
            dust = shapely.Point(self._random_point()).buffer(rng.lognormal(np.log(0.6), 0.5), 8)
            pieces.append(Piece(dust, DUST_CODE, 0, _DUST_ORDER))
        return [p for p in pieces if not p.polygon.is_empty]

    def _random_point(self) -> np.ndarray:
        x0, y0, x1, y1 = self.outline.bounds
        return np.array([self.rng.uniform(x0, x1), self.rng.uniform(y0, y1)])

    def _piece(self, poly: Polygon, layers: int) -> Piece:
        return Piece(poly, material_code(layers), layers, layers)

    def _thin_flake(self, c: np.ndarray) -> list[Piece]:
        """A monolayer terrace with a bilayer step and a thicker terrace attached."""
        rng, cfg = self.rng, self.cfg.flakes
        theta0 = rng.uniform(0, np.pi / 3)  # the crystal axes, shared by every terrace
        lo, hi = cfg.monolayer_size_um
        size = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
        toward = rng.uniform(0, 2 * np.pi)
        step = np.array([np.cos(toward), np.sin(toward)])
        out = []
        if rng.random() < cfg.monolayer_fraction:
            out.append(self._piece(cleaved_polygon(rng, c, size / 2, theta0), 1))
        r2 = size * rng.uniform(0.2, 0.45)
        c2 = c + step * size * rng.uniform(0.3, 0.55)
        out.append(self._piece(cleaved_polygon(rng, c2, r2, theta0), 2))
        if rng.random() < 0.85:
            r3 = size * rng.uniform(0.2, 0.6)
            c3 = c2 + step * (r2 + r3 * rng.uniform(0.3, 0.8))
            layers = int(rng.choice((3, 4, 6, 10, *THICK_LAYERS)))
            out.append(self._piece(cleaved_polygon(rng, c3, r3, theta0), layers))
        return out

    def _grown_crystal(self, c: np.ndarray) -> list[Piece]:
        """A CVD triangle: monolayer, often a bilayer triangle and a thick nucleus at its centre.

        Neighbouring crystals overlap and merge into one monolayer film, as dense growth does.
        """
        rng, cfg = self.rng, self.cfg.flakes
        lo, hi = cfg.monolayer_size_um
        size = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
        theta = rng.uniform(0, 2 * np.pi / 3)
        out = [self._piece(grown_triangle(rng, c, size, theta), 1)]
        if rng.random() < 0.5:  # a second layer grown from the nucleus, same orientation
            c2 = c + rng.normal(0, 0.03 * size, 2)
            side = size * rng.uniform(0.1, 0.45)
            out.append(self._piece(grown_triangle(rng, c2, side, theta), 2))
        if rng.random() < 0.6:
            # at least ~0.6 µm across: smaller would vanish in the camera's blur
            nucleus = shapely.Point(c).buffer(size * rng.uniform(0.01, 0.04) + 0.3, 12)
            out.append(self._piece(nucleus, int(rng.choice((3, 4, 6, 10, 14, 20)))))
        return out

    def _truth(self) -> list[TruthFlake]:
        """Visible monolayer and bilayer regions: each layer count minus all painted over it.

        Overlapping terraces of the same layer count merge, as they do in the image.
        """
        flakes: list[TruthFlake] = []
        for layers in LAYER_CLASSES:
            same = [p.polygon for p in self.pieces if p.layers == layers and p.order == layers]
            if not same:
                continue
            region = shapely.union_all(same)
            above = [p.polygon for p in self.pieces if p.order > layers]
            tree = shapely.STRtree(above)
            hits = tree.query(region, predicate="intersects")
            if len(hits):
                region = region.difference(shapely.union_all([above[j] for j in hits]))
            region = region.intersection(self.outline)
            for part in getattr(region, "geoms", [region]):
                if isinstance(part, Polygon) and part.area > 0.05:
                    flakes.append(TruthFlake(len(flakes), layers, part))
        return flakes

    # ---------------------------------------------------------------- queries
    def oxide_nm(self, x: float, y: float) -> float:
        """Oxide thickness: nominal plus a slow drift across the chip (peak-to-peak as set)."""
        chip = self.cfg.chip
        u = (x - chip.origin_um[0]) / chip.width_um
        v = (y - chip.origin_um[1]) / chip.height_um
        w = self._oxide_waves
        field = np.tanh(w[0, 0] * u + w[0, 1] * v + 0.3 * np.sin(3 * u * w[1, 0] + 3 * v * w[1, 1]))
        return float(chip.oxide_nm + 0.5 * chip.oxide_drift_nm * field)

    def oxide_range_nm(self) -> tuple[float, float]:
        chip = self.cfg.chip
        return chip.oxide_nm - 0.5 * chip.oxide_drift_nm, chip.oxide_nm + 0.5 * chip.oxide_drift_nm

    def focus_z_um(self, x: float, y: float) -> float:
        """Focus-drive Z at which the chip surface at (x, y) is in focus: tilt plus a bow."""
        fs, chip = self.cfg.focus_surface, self.cfg.chip
        cx = chip.origin_um[0] + chip.width_um / 2
        cy = chip.origin_um[1] + chip.height_um / 2
        u = (x - cx) / max(chip.width_um, chip.height_um)
        v = (y - cy) / max(chip.width_um, chip.height_um)
        bow = np.cos(np.pi * u + self._warp_phase[0]) * np.cos(np.pi * v + self._warp_phase[1])
        return float(
            fs.z_um
            + fs.tilt_x_um_per_mm * (x - cx) / 1000
            + fs.tilt_y_um_per_mm * (y - cy) / 1000
            + fs.warp_um * bow
        )

    def material_raster(
        self,
        center_um: tuple[float, float],
        shape: tuple[int, int],
        pixel_size_um: float,
        rotation_deg: float = 0.0,
    ) -> np.ndarray:
        """Material codes (uint8, rows × cols) seen in a field of view centred on `center_um`.

        Column index grows with stage x and row index with stage y (rotated by
        `rotation_deg`), pixel centres on a grid of `pixel_size_um`.
        """
        h, w = shape
        cx, cy = center_um
        cos, sin = np.cos(np.radians(rotation_deg)), np.sin(np.radians(rotation_deg))
        half = 0.5 * pixel_size_um * np.hypot(h, w)
        img = Image.new("L", (w, h), 0)
        draw = ImageDraw.Draw(img)
        b = self._bounds
        hit = np.nonzero(
            (b[:, 0] < cx + half)
            & (b[:, 2] > cx - half)
            & (b[:, 1] < cy + half)
            & (b[:, 3] > cy - half)
        )[0]
        for i in hit:
            xy = self._coords[i]
            dx, dy = xy[:, 0] - cx, xy[:, 1] - cy
            # +0.5: PIL's pixel i spans [i, i+1), so its centre sits at i + 0.5
            col = (cos * dx + sin * dy) / pixel_size_um + (w - 1) / 2 + 0.5
            row = (-sin * dx + cos * dy) / pixel_size_um + (h - 1) / 2 + 0.5
            draw.polygon(
                list(zip(col.tolist(), row.tolist(), strict=True)), fill=int(self._codes[i])
            )
        codes = np.asarray(img)
        if not self.outline.contains(box(cx - half, cy - half, cx + half, cy + half)):
            codes = np.where(
                self._on_chip(center_um, shape, pixel_size_um, cos, sin), codes, OFF_CHIP_CODE
            )
        return codes.astype(np.uint8, copy=False)

    def _on_chip(self, center_um, shape, px, cos, sin) -> np.ndarray:
        h, w = shape
        r = (np.arange(h) - (h - 1) / 2)[:, None] * px
        c = (np.arange(w) - (w - 1) / 2)[None, :] * px
        x = center_um[0] + cos * c - sin * r
        y = center_um[1] + sin * c + cos * r
        x0, y0, x1, y1 = self.outline.bounds
        return (x >= x0) & (x <= x1) & (y >= y0) & (y <= y1)

    def label_raster(
        self,
        center_um: tuple[float, float],
        shape: tuple[int, int],
        pixel_size_um: float,
        rotation_deg: float = 0.0,
    ) -> np.ndarray:
        """Ground-truth layer classes for a field of view: 0 other, 1 monolayer, 2 bilayer."""
        codes = self.material_raster(center_um, shape, pixel_size_um, rotation_deg)
        return labels_from_codes(codes)

    def flakes_in(self, x0: float, y0: float, x1: float, y1: float) -> list[TruthFlake]:
        fov = box(x0, y0, x1, y1)
        return [f for f in self.flakes if f.polygon.intersects(fov)]

    def memory_bytes(self) -> int:
        """Approximate memory held by the world's geometry (for benchmarks)."""
        coords = sum(c.nbytes for c in self._coords)
        # shapely keeps its own copy of every polygon; count it once more
        return 2 * coords + self._bounds.nbytes + self._codes.nbytes


def labels_from_codes(codes: np.ndarray) -> np.ndarray:
    lut = np.zeros(256, dtype=np.uint8)
    for layers, cls in ((1, 1), (2, 2)):
        lut[material_code(layers)] = cls
    return lut[codes]
