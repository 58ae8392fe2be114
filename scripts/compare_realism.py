#!/usr/bin/env python
"""How real do the simulated tiles look? Colour statistics and a figure, sim against real.

    python scripts/compare_realism.py --synth /tmp/synth-check  # stats + figure
    python scripts/compare_realism.py --synth DIR --write-docs  # + docs/simulated_tiles.png
    python scripts/compare_realism.py --synth DIR --json /tmp/realism.json

Both inputs are dataset folders (images/, masks/, dataset.yaml with `label_values`). Per image
it measures the substrate colour, the optical contrast of each labelled class, edge sharpness,
noise, uneven illumination and clipping; then summarises each set (median and 10-90 % range
across images) beside the calibration target in shared/optics.md.

The real micrographs carry no license: the figure that shows them is written outside the
repository only (the script refuses a path inside it); docs/ gets the simulated-only figure.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType

import numpy as np
import yaml
from PIL import Image
from scipy import ndimage

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_REAL = REPO_ROOT.parent / "shared" / "data" / "mos2-2dtlk"
DEFAULT_OUT = Path("/tmp/flakescan-realism/sim_vs_real.png")
DEFAULT_SIM_ONLY_OUT = REPO_ROOT / "docs" / "simulated_tiles.png"

CHANNELS = ("R", "G", "B")
#: shared/optics.md, "Calibration target: real micrographs"
TARGET: dict[str, tuple[float, float, float]] = {
    "substrate": (182.0, 175.0, 226.0),
    "monolayer": (0.11, 0.02, 0.09),
    "bilayer": (0.17, 0.01, 0.07),
    "thicker": (0.19, -0.09, 0.02),
}
#: substrate pixels closer than this to any labelled pixel are not used for substrate statistics
SUBSTRATE_MARGIN_PX = 10
#: class pixels this close to another label are left out of the class colour (blur, sloppy masks)
CLASS_ERODE_PX = 2
#: fewest pixels a region needs before a statistic is computed from it
MIN_PIXELS = 50
#: a channel at or above this 8-bit value counts as saturated
SATURATED = 254
#: scales (px) of the two Gaussian-derivative filters whose ratio gives the edge width
EDGE_SCALES_PX = (1.0, 3.0)
#: how far (px) from a mask boundary the true edge is looked for (hand-drawn masks are off)
EDGE_BAND_PX = 4
#: sigma (px) of the smooth background removed before measuring noise
NOISE_SIGMA_PX = 2.0

MASK_COLOURS: dict[str, tuple[float, float, float]] = {
    "substrate": (0.80, 0.80, 0.80),
    "thicker": (0.45, 0.45, 0.45),  # further raw values mapped to `other` (real: raw 3)
    "monolayer": (0.12, 0.47, 0.85),
    "bilayer": (1.00, 0.55, 0.05),
}
_UNKNOWN_COLOUR = (0.9, 0.1, 0.9)


# ------------------------------------------------------------------------------------ datasets
@dataclass(frozen=True)
class Dataset:
    """A dataset folder: image/mask pairs and what the raw mask values mean."""

    root: Path
    pairs: tuple[tuple[Path, Path], ...]
    #: raw mask value(s) that are bare substrate
    substrate_values: tuple[int, ...]
    #: class name -> raw mask values; `thicker` collects further values mapped to `other`
    classes: dict[str, tuple[int, ...]]


def classes_from_label_values(
    label_values: dict[int, str],
) -> tuple[tuple[int, ...], dict[str, tuple[int, ...]]]:
    """Split a `label_values` mapping into substrate values and named classes.

    The lowest raw value named `other` is the substrate; any further `other` values (the real
    set's 3 = trilayer and thicker) form the class `thicker`.
    """
    others = sorted(v for v, name in label_values.items() if name == "other")
    if not others:
        raise ValueError(f"label_values names no 'other' (substrate) value: {label_values}")
    classes: dict[str, list[int]] = {}
    for value, name in sorted(label_values.items()):
        if value == others[0]:
            continue
        classes.setdefault("thicker" if name == "other" else name, []).append(value)
    return (others[0],), {k: tuple(v) for k, v in classes.items()}


def load_dataset(root: str | Path) -> Dataset:
    """Read a dataset folder; masks are matched to images by file stem."""
    root = Path(root)
    meta_path = root / "dataset.yaml"
    meta = yaml.safe_load(meta_path.read_text()) if meta_path.exists() else {}
    meta = meta or {}
    label_values = {int(k): str(v) for k, v in meta.get("label_values", {}).items()}
    label_values = label_values or {0: "other", 1: "monolayer", 2: "bilayer"}
    image_glob = meta.get("image_glob", "images/*")
    mask_glob = meta.get("mask_glob", "masks/*.png")
    masks = {p.stem: p for p in sorted(root.glob(mask_glob))}
    pairs = tuple(
        (p, masks[p.stem])
        for p in sorted(root.glob(image_glob))
        if p.suffix.lower() in {".jpg", ".jpeg", ".png", ".tif", ".tiff"} and p.stem in masks
    )
    if not pairs:
        raise FileNotFoundError(
            f"{root}: no image with a matching mask ({image_glob}, {mask_glob})"
        )
    substrate, classes = classes_from_label_values(label_values)
    return Dataset(root, pairs, substrate, classes)


def read_pair(image_path: Path, mask_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(H×W×3 uint8 RGB image, H×W uint8 mask)."""
    image = np.asarray(Image.open(image_path).convert("RGB"))
    mask = np.asarray(Image.open(mask_path))
    if mask.ndim == 3:
        mask = mask[..., 0]
    if mask.shape != image.shape[:2]:
        raise ValueError(f"{mask_path}: mask {mask.shape} does not match image {image.shape[:2]}")
    return image, mask.astype(np.uint8, copy=False)


# ---------------------------------------------------------------------------------- statistics
@dataclass
class ImageStats:
    """Everything measured on one image. None: not measurable (e.g. no substrate visible)."""

    name: str
    substrate_fraction: float
    #: median RGB (8-bit) of substrate pixels far from any flake
    substrate_rgb: list[float] | None
    #: class -> per-channel contrast (I_sub - I_class) / I_sub
    contrast: dict[str, list[float]] = field(default_factory=dict)
    #: class -> fraction of the image
    class_fraction: dict[str, float] = field(default_factory=dict)
    #: mean squared colour gradient ((8-bit levels / px)², summed over channels) at boundaries,
    #: each boundary pixel taking the peak within EDGE_BAND_PX
    boundary_msg: float | None = None
    #: Gaussian sigma (px) of the edge profile at label boundaries, from two-scale gradients
    edge_sigma_px: float | None = None
    #: per-channel std (8-bit) of substrate pixels minus a Gaussian-blurred copy
    noise: list[float] | None = None
    #: substrate brightness at the field's corners / at its centre (quadratic surface fit)
    corner_centre: float | None = None
    #: linear brightness change edge to edge across the field, as a fraction of the centre
    tilt: float | None = None
    #: per-channel fraction of pixels at or above SATURATED
    saturated: list[float] = field(default_factory=list)


def far_substrate(
    mask: np.ndarray, substrate_values: Sequence[int], margin_px: int = SUBSTRATE_MARGIN_PX
) -> np.ndarray:
    """Substrate pixels at least `margin_px` from any other label (less if that leaves too few).

    In a synthetic set `other` also covers thick debris, dust and tape residue (they are not
    labelled apart); they cover little of a tile, and every statistic taken here is a median.
    """
    sub = np.isin(mask, substrate_values)
    if sub.all() or not sub.any():
        return sub
    distance = ndimage.distance_transform_edt(sub)  # distance to the nearest non-substrate pixel
    for margin in (margin_px, margin_px // 2, 1):
        far = sub & (distance > margin)
        if far.sum() >= MIN_PIXELS:
            return far
    return sub


def median_rgb(image: np.ndarray, where: np.ndarray) -> list[float] | None:
    if where.sum() < MIN_PIXELS:
        return None
    return [float(np.median(image[..., k][where])) for k in range(3)]


def class_contrast(
    image: np.ndarray, region: np.ndarray, substrate_rgb: Sequence[float]
) -> list[float] | None:
    """Per-channel (I_sub - I_class) / I_sub of the region's median colour, edges left out."""
    core = ndimage.binary_erosion(region, iterations=CLASS_ERODE_PX)
    rgb = median_rgb(image, core if core.sum() >= MIN_PIXELS else region)
    if rgb is None:
        return None
    return [(s - c) / s if s > 0 else math.nan for s, c in zip(substrate_rgb, rgb, strict=True)]


def label_boundaries(mask: np.ndarray) -> np.ndarray:
    """Pixels whose right or lower neighbour has another label (both sides marked)."""
    edge = np.zeros(mask.shape, dtype=bool)
    dx = mask[:, 1:] != mask[:, :-1]
    dy = mask[1:, :] != mask[:-1, :]
    edge[:, 1:] |= dx
    edge[:, :-1] |= dx
    edge[1:, :] |= dy
    edge[:-1, :] |= dy
    return edge


def colour_gradient(image: np.ndarray, sigma: float | None = None) -> np.ndarray:
    """Squared colour gradient magnitude, summed over channels ((levels / px)²).

    Central differences when `sigma` is None, else Gaussian-derivative filters of that scale.
    """
    total = np.zeros(image.shape[:2], dtype=np.float64)
    for k in range(3):
        plane = image[..., k].astype(np.float32)
        if sigma is None:
            gy, gx = np.gradient(plane)
        else:
            gy = ndimage.gaussian_filter(plane, sigma, order=(1, 0))
            gx = ndimage.gaussian_filter(plane, sigma, order=(0, 1))
        total += gx.astype(np.float64) ** 2 + gy.astype(np.float64) ** 2
    return total


def edge_sigma_from_ratio(ratio: float, s1: float, s2: float) -> float | None:
    """Edge sigma σ from r = peak gradient at scale s1 / at s2 of a blurred step.

    A step blurred to σ has peak derivative-of-Gaussian response ∝ 1/sqrt(σ² + s²), so
    r² = (σ² + s2²) / (σ² + s1²).
    """
    r2 = ratio**2
    if not r2 > 1.0:
        return None  # flatter at the fine scale than at the coarse one: no edge to measure
    sigma2 = (s2**2 - r2 * s1**2) / (r2 - 1.0)
    return math.sqrt(max(sigma2, 0.0))


def sharpness(image: np.ndarray, mask: np.ndarray) -> tuple[float | None, float | None]:
    """(mean squared gradient at label boundaries, edge sigma in px) or Nones without edges.

    Each boundary pixel takes the largest gradient within EDGE_BAND_PX of it, so a hand-drawn
    mask a few pixels off the true edge still finds it. The edge sigma comes from the ratio of
    those local peaks at two Gaussian-derivative scales (median over the stronger half of the
    boundary), which does not depend on the contrast of the edge.
    """
    edge = label_boundaries(mask)
    if edge.sum() < MIN_PIXELS:
        return None, None
    size = 2 * EDGE_BAND_PX + 1
    msg = float(ndimage.maximum_filter(colour_gradient(image), size=size)[edge].mean())
    s1, s2 = EDGE_SCALES_PX
    g1 = np.sqrt(ndimage.maximum_filter(colour_gradient(image, s1), size=size)[edge])
    g2 = np.sqrt(ndimage.maximum_filter(colour_gradient(image, s2), size=size)[edge])
    strong = g2 >= max(float(np.median(g2)), 1e-6)
    if not strong.any():
        return msg, None
    ratio = float(np.median(g1[strong] / g2[strong]))
    return msg, edge_sigma_from_ratio(ratio, s1, s2)


def noise_level(image: np.ndarray, where: np.ndarray) -> list[float] | None:
    """Per-channel robust std (1.4826 × MAD) of image minus its Gaussian blur, over `where`."""
    if where.sum() < MIN_PIXELS:
        return None
    out = []
    for k in range(3):
        plane = image[..., k].astype(np.float32)
        residual = (plane - ndimage.gaussian_filter(plane, NOISE_SIGMA_PX))[where]
        out.append(float(1.4826 * np.median(np.abs(residual - np.median(residual)))))
    return out


def illumination(image: np.ndarray, where: np.ndarray) -> tuple[float | None, float | None]:
    """(corner/centre brightness ratio, edge-to-edge linear tilt) of the substrate.

    Fits I = a + bx + cy + dx² + exy + fy² to the substrate brightness (mean of R, G, B) on
    coordinates x, y in [-1, 1] across the field. Needs substrate in at least 5 % of each
    quadrant of the field: a quadratic extrapolated into an empty corner means nothing.
    """
    h, w = where.shape
    quadrants = [
        where[r, c]
        for r in (slice(0, h // 2), slice(h // 2, h))
        for c in (slice(0, w // 2), slice(w // 2, w))
    ]
    if where.sum() < MIN_PIXELS or min(q.mean() for q in quadrants) < 0.05:
        return None, None
    rows, cols = np.nonzero(where)
    step = max(1, rows.size // 20_000)
    rows, cols = rows[::step], cols[::step]
    y = 2 * rows / max(h - 1, 1) - 1
    x = 2 * cols / max(w - 1, 1) - 1
    lum = image[rows, cols].astype(np.float64).mean(axis=1)
    design = np.stack([np.ones_like(x), x, y, x * x, x * y, y * y], axis=1)
    coef, *_ = np.linalg.lstsq(design, lum, rcond=None)
    a, b, c, d, e, f = coef
    if a <= 0:
        return None, None
    corners = [a + b * sx + c * sy + d + e * sx * sy + f for sx in (-1, 1) for sy in (-1, 1)]
    return float(np.mean(corners) / a), float(2 * math.hypot(b, c) / a)


def saturated_fraction(image: np.ndarray, level: int = SATURATED) -> list[float]:
    return [float((image[..., k] >= level).mean()) for k in range(3)]


def image_stats(name: str, image: np.ndarray, mask: np.ndarray, ds: Dataset) -> ImageStats:
    """All statistics of one image under the dataset's label meanings."""
    far = far_substrate(mask, ds.substrate_values)
    sub_rgb = median_rgb(image, far)
    stats = ImageStats(
        name=name,
        substrate_fraction=float(np.isin(mask, ds.substrate_values).mean()),
        substrate_rgb=sub_rgb,
        saturated=saturated_fraction(image),
    )
    for cls, values in ds.classes.items():
        region = np.isin(mask, values)
        stats.class_fraction[cls] = float(region.mean())
        if sub_rgb is not None:
            c = class_contrast(image, region, sub_rgb)
            if c is not None:
                stats.contrast[cls] = c
    stats.boundary_msg, stats.edge_sigma_px = sharpness(image, mask)
    stats.noise = noise_level(image, far)
    stats.corner_centre, stats.tilt = illumination(image, far)
    return stats


def dataset_stats(ds: Dataset, limit: int | None = None) -> list[ImageStats]:
    pairs = ds.pairs if limit is None else ds.pairs[:limit]
    return [image_stats(img.stem, *read_pair(img, msk), ds) for img, msk in pairs]


# ----------------------------------------------------------------------------------- summaries
def metric_rows(s: ImageStats, classes: Iterable[str]) -> dict[str, float | None]:
    """Flat metric name -> value for one image (None where not measurable)."""
    row: dict[str, float | None] = {}
    sub = s.substrate_rgb
    for k, ch in enumerate(CHANNELS):
        row[f"substrate {ch}"] = sub[k] if sub else None
    # Colour cast independent of exposure: lavender 300 nm oxide reads B/R > 1.
    row["substrate G/R"] = sub[1] / sub[0] if sub and sub[0] > 0 else None
    row["substrate B/R"] = sub[2] / sub[0] if sub and sub[0] > 0 else None
    row["fraction substrate"] = s.substrate_fraction
    for cls in classes:
        row[f"fraction {cls}"] = s.class_fraction.get(cls)
    for cls in classes:
        c = s.contrast.get(cls)
        for k, ch in enumerate(CHANNELS):
            row[f"C {cls} {ch}"] = c[k] if c else None
    row["boundary msg"] = s.boundary_msg
    row["edge sigma px"] = s.edge_sigma_px
    for k, ch in enumerate(CHANNELS):
        row[f"noise {ch}"] = s.noise[k] if s.noise else None
    row["corner/centre"] = s.corner_centre
    row["tilt"] = s.tilt
    for k, ch in enumerate(CHANNELS):
        row[f"saturated {ch}"] = s.saturated[k]
    return row


def summarise(stats: Sequence[ImageStats], classes: Iterable[str]) -> dict[str, dict[str, float]]:
    """Metric -> {median, p10, p90, n} across images (images without the metric left out)."""
    classes = list(classes)
    rows = [metric_rows(s, classes) for s in stats]
    out: dict[str, dict[str, float]] = {}
    for key in rows[0] if rows else []:
        values = np.array([r[key] for r in rows if r[key] is not None], dtype=float)
        values = values[np.isfinite(values)]
        if values.size == 0:
            continue
        p10, med, p90 = np.percentile(values, [10, 50, 90])
        out[key] = {"median": float(med), "p10": float(p10), "p90": float(p90), "n": values.size}
    return out


def target_value(metric: str) -> float | None:
    """The optics.md calibration number for a metric name, if it has one."""
    parts = metric.split()
    if parts[0] == "substrate" and len(parts) == 2 and parts[1] in CHANNELS:
        return TARGET["substrate"][CHANNELS.index(parts[1])]
    if parts[0] == "C" and len(parts) == 3 and parts[1] in TARGET and parts[2] in CHANNELS:
        return TARGET[parts[1]][CHANNELS.index(parts[2])]
    return None


def _fmt(value: float | None, metric: str) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    if metric.startswith("substrate "):
        return f"{value:.2f}" if "/" in metric else f"{value:.0f}"
    if metric.startswith("fraction"):
        return f"{100 * value:.0f}%"
    if metric.startswith("C ") or metric in ("corner/centre", "tilt"):
        return f"{value:+.3f}" if metric.startswith("C ") else f"{value:.3f}"
    if metric.startswith("saturated"):
        return f"{100 * value:.1f}%"
    if metric == "boundary msg":
        return f"{value:.0f}"
    return f"{value:.2f}"


def _fmt_summary(summary: dict[str, dict[str, float]], metric: str) -> str:
    s = summary.get(metric)
    if s is None:
        return "-"
    return f"{_fmt(s['median'], metric)} [{_fmt(s['p10'], metric)}, {_fmt(s['p90'], metric)}]"


def format_per_image(stats: Sequence[ImageStats], classes: Sequence[str]) -> str:
    """One line per image: the main numbers, compactly."""

    def trio(v: Sequence[float] | None, fmt: str) -> str:
        return "/".join(format(x, fmt) for x in v) if v else "-"

    head = ["image", "sub RGB"] + [f"C {c}" for c in classes]
    head += ["msg", "edgeσ", "noise RGB", "crn/ctr", "tilt", "sat% RGB"]
    lines = [head]
    for s in stats:
        line = [s.name, trio(s.substrate_rgb, ".0f")]
        line += [trio(s.contrast.get(c), "+.2f") for c in classes]
        line += [
            _fmt(s.boundary_msg, "boundary msg"),
            _fmt(s.edge_sigma_px, "edge sigma px"),
            trio(s.noise, ".1f"),
            _fmt(s.corner_centre, "corner/centre"),
            _fmt(s.tilt, "tilt"),
            trio([100 * x for x in s.saturated], ".1f"),
        ]
        lines.append(line)
    return _columns(lines)


def format_summary(summaries: dict[str, dict[str, dict[str, float]]]) -> str:
    """Metric rows; a column per set (median [p10, p90]) and the optics.md target."""
    metrics: list[str] = []
    for summary in summaries.values():
        metrics += [m for m in summary if m not in metrics]
    lines = [["metric", *[f"{name} median [p10, p90]" for name in summaries], "optics.md"]]
    for m in metrics:
        t = target_value(m)
        lines.append([m, *[_fmt_summary(s, m) for s in summaries.values()], _fmt(t, m)])
    return _columns(lines)


def _columns(lines: Sequence[Sequence[str]]) -> str:
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )


def target_check(summary: dict[str, dict[str, float]], tolerance: dict[str, float]) -> list[str]:
    """Lines comparing a set's medians with the optics.md target: metric, value, target, off?"""
    out = []
    for metric, s in summary.items():
        t = target_value(metric)
        if t is None:
            continue
        tol = tolerance["substrate" if metric.startswith("substrate") else "contrast"]
        diff = s["median"] - t
        verdict = "ok" if abs(diff) <= tol else "OFF"
        out.append(
            f"{metric:<16} {_fmt(s['median'], metric):>7} vs {_fmt(t, metric):>7}  "
            f"diff {diff:+.3f}  {verdict}"
        )
    return out


# ------------------------------------------------------------------------------------- figures
@dataclass(frozen=True)
class Tile:
    name: str
    image: np.ndarray
    mask: np.ndarray


def colour_mask(mask: np.ndarray, ds: Dataset) -> np.ndarray:
    """H×W×3 float RGB: substrate light grey, thicker dark grey, monolayer blue, bilayer orange."""
    lut = np.tile(np.array(_UNKNOWN_COLOUR, dtype=np.float32), (256, 1))
    for v in ds.substrate_values:
        lut[v] = MASK_COLOURS["substrate"]
    for cls, values in ds.classes.items():
        for v in values:
            lut[v] = MASK_COLOURS.get(cls, _UNKNOWN_COLOUR)
    return lut[mask]


def pick_tiles(ds: Dataset, n: int, seed: int, prefer_labelled: bool = True) -> list[Tile]:
    """`n` random tiles; with `prefer_labelled`, tiles showing monolayer/bilayer come first."""
    rng = np.random.default_rng(seed)
    order = [int(i) for i in rng.permutation(len(ds.pairs))]
    if prefer_labelled:
        thin = tuple(v for c in ("monolayer", "bilayer") for v in ds.classes.get(c, ()))
        labelled = [i for i in order if np.isin(read_pair(*ds.pairs[i])[1], thin).any()]
        order = labelled + [i for i in order if i not in labelled]
    return [Tile(ds.pairs[i][0].stem, *read_pair(*ds.pairs[i])) for i in order[:n]]


def _plt() -> ModuleType:
    """matplotlib.pyplot, imported with the Agg backend on first use."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _legend_handles(names: Iterable[str]) -> list:
    from matplotlib.patches import Patch

    names = set(names)
    return [Patch(color=c, label=n) for n, c in MASK_COLOURS.items() if n in names]


def _legend_names(*datasets: Dataset) -> list[str]:
    return ["substrate", *(c for ds in datasets for c in ds.classes)]


def save_grid(
    panels: Sequence[Sequence[tuple[np.ndarray, str]]],
    out: Path,
    title: str,
    legend: Iterable[str] = MASK_COLOURS,
    panel_in: float = 2.4,
    dpi: int = 100,
    max_bytes: int | None = None,
) -> Path:
    """Rows of (image, caption) panels as a PNG; lowers the dpi until under `max_bytes`."""
    plt = _plt()
    handles = _legend_handles(legend)
    n_rows, n_cols = len(panels), max(len(r) for r in panels)
    out.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fig, axes = plt.subplots(
            n_rows, n_cols, figsize=(panel_in * n_cols, panel_in * n_rows + 0.7), squeeze=False
        )
        for ax_row, row in zip(axes, panels, strict=True):
            for ax, panel in zip(ax_row, [*row, *[None] * (n_cols - len(row))], strict=True):
                ax.axis("off")
                if panel is not None:
                    ax.imshow(panel[0], interpolation="antialiased")
                    ax.set_title(panel[1], fontsize=7)
        fig.suptitle(title, fontsize=10)
        fig.legend(handles=handles, loc="lower center", ncol=4, fontsize=7, frameon=False)
        fig.tight_layout(rect=(0, 0.03, 1, 0.97))
        fig.savefig(out, dpi=dpi)
        plt.close(fig)
        if max_bytes is None or out.stat().st_size <= max_bytes or dpi <= 40:
            return out
        dpi = int(dpi * 0.8)


def save_comparison_figure(
    sim: Sequence[Tile], sim_ds: Dataset, real: Sequence[Tile], real_ds: Dataset, out: Path
) -> Path:
    """Rows of: simulated tile | its mask | real tile | its mask. Never inside the repository."""
    refuse_repo_path(out)
    rows = []
    for i in range(max(len(sim), len(real))):
        row: list[tuple[np.ndarray, str]] = []
        for tiles, ds, kind in ((sim, sim_ds, "sim"), (real, real_ds, "real")):
            if i < len(tiles):
                t = tiles[i]
                row += [(t.image, f"{kind} {t.name}"), (colour_mask(t.mask, ds), "mask")]
        rows.append(row)
    title = "simulated (left) vs real (right), with ground-truth masks"
    return save_grid(rows, out, title, legend=_legend_names(sim_ds, real_ds))


def save_sim_only_figure(
    sim: Sequence[Tile], sim_ds: Dataset, out: Path, max_bytes: int = 1_400_000
) -> Path:
    """Simulated tiles beside their masks, two pairs per row."""
    panels = [p for t in sim for p in ((t.image, t.name), (colour_mask(t.mask, sim_ds), "mask"))]
    rows = [panels[i : i + 4] for i in range(0, len(panels), 4)]
    title = "simulated tiles and ground-truth masks"
    return save_grid(rows, out, title, legend=_legend_names(sim_ds), max_bytes=max_bytes)


def refuse_repo_path(path: Path) -> None:
    """Raise if `path` lies inside the repository (the real images may not go there)."""
    if path.resolve().is_relative_to(REPO_ROOT):
        raise ValueError(
            f"{path}: the figure with real micrographs must not be written inside the "
            f"repository ({REPO_ROOT}); they carry no license"
        )


# ----------------------------------------------------------------------------------------- CLI
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--synth", type=Path, required=True, help="synthetic dataset folder")
    p.add_argument("--real", type=Path, default=DEFAULT_REAL, help="real dataset folder")
    p.add_argument("--n", type=int, default=6, help="tiles per side in the figures")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="sim-vs-real figure (PNG)")
    p.add_argument("--sim-only-out", type=Path, default=None, help="simulated-only figure (PNG)")
    p.add_argument(
        "--write-docs",
        action="store_true",
        help=f"write the sim-only figure to {DEFAULT_SIM_ONLY_OUT}",
    )
    p.add_argument("--seed", type=int, default=0, help="which tiles the figures show")
    p.add_argument("--json", type=Path, default=None, help="dump all numbers here")
    p.add_argument("--limit", type=int, default=None, help="at most this many images per set")
    p.add_argument("--quiet", action="store_true", help="summary only, no per-image table")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    sets = {"sim": load_dataset(args.synth)}
    if args.real.exists():
        sets["real"] = load_dataset(args.real)
    else:
        print(f"no real set at {args.real}: simulated statistics only", file=sys.stderr)
    if args.out.resolve().is_relative_to(REPO_ROOT) and "real" in sets:
        refuse_repo_path(args.out)  # fail before the slow part

    results: dict[str, dict] = {}
    for name, ds in sets.items():
        classes = list(ds.classes)
        stats = dataset_stats(ds, args.limit)
        if not args.quiet:
            print(f"\n== {name}: {ds.root} ({len(stats)} images) ==")
            print(format_per_image(stats, classes))
        results[name] = {
            "root": str(ds.root),
            "images": [asdict(s) for s in stats],
            "summary": summarise(stats, classes),
        }
    print("\n== summary across images ==")
    print(format_summary({k: v["summary"] for k, v in results.items()}))
    if "real" in results:
        print("\n== real set vs optics.md calibration target (substrate ±8, contrast ±0.03) ==")
        for line in target_check(results["real"]["summary"], {"substrate": 8, "contrast": 0.03}):
            print(line)

    sim_tiles = pick_tiles(sets["sim"], args.n, args.seed)
    if "real" in sets:
        real_tiles = pick_tiles(sets["real"], args.n, args.seed, prefer_labelled=False)
        path = save_comparison_figure(sim_tiles, sets["sim"], real_tiles, sets["real"], args.out)
        print(f"\nwrote {path}")
    sim_only = args.sim_only_out or (DEFAULT_SIM_ONLY_OUT if args.write_docs else None)
    if sim_only is not None:
        path = save_sim_only_figure(sim_tiles, sets["sim"], sim_only)
        print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {"target": TARGET, **results}
        args.json.write_text(json.dumps(payload, indent=1, allow_nan=True))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
