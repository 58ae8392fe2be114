"""The simulated world's flakes as flake records: the truth a scan is scored against."""

from __future__ import annotations

from pymmcore_plus import CMMCorePlus

from .plan import ChipOutline


def simulated_truth(
    core: CMMCorePlus, outline: ChipOutline, chip_origin_um: tuple[float, float]
) -> list[dict] | None:
    """The simulated world's monolayers and bilayers inside the scanned outline, as flake
    records (most of a flake's area inside, as the scan counts its own); None on a real rig."""
    scope = getattr(core, "simulation", None)
    if scope is None:
        return None
    scanned = outline.shape()
    records = []
    for f in scope.world.flakes:
        if f.layer_class not in ("monolayer", "bilayer"):
            continue
        if f.polygon.intersection(scanned).area < 0.5 * f.polygon.area:
            continue
        r = f.to_record(chip_origin_um)
        r["bbox_stage_um"] = [round(v, 3) for v in f.polygon.bounds]
        r["tiles"] = []
        records.append(r)
    return records
