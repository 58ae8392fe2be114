"""Scan efficiency and memory of a whole scan on the simulated rig in real time.

    python scripts/bench_scan.py [--config configs/simulated-small.yaml] [--chip-mm 1.0]

Runs `flakescan scan`'s pipeline with the simulated stage and camera taking their real time
(time_scale 1) and prints:
- scan efficiency: the hardware's own time (stage moves, settling, exposures, summed by the
  simulated devices) over the wall time of the whole scan, focus survey included. 1.0 means
  the stage never waited for the software; the target is at least 0.9.
- the rates: stage fields/s against the inference rate measured alone on the same tiles;
- peak resident memory, and resident memory as the scan went (flat = bounded).
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from drivers.configfile import read_rig_mapping
from drivers.simulated import SimulatedRigConfig, create_simulated_core
from drivers.unicore import closing_core
from model.checkpoint import DEFAULT_CHECKPOINT
from model.segmenter import Segmenter
from scanner.plan import ChipOutline
from scanner.scan_command import rig_limits, run_scan
from scanner.scan_config import load_scan_config


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--config", default="configs/simulated-small.yaml")
    ap.add_argument("--chip-mm", type=float, default=1.0, help="scan a square this big (mm)")
    ap.add_argument("--time-scale", type=float, default=1.0)
    ap.add_argument("--batch-size", type=int, default=None)
    args = ap.parse_args()

    raw = read_rig_mapping(args.config)
    raw["time_scale"] = args.time_scale
    rig = SimulatedRigConfig.model_validate(raw)
    cfg = load_scan_config(args.config)
    x0, y0 = rig.chip.origin_um
    side = args.chip_mm * 1000
    update: dict = {"chip": ChipOutline(corners_um=((x0, y0), (x0 + side, y0 + side)))}
    if args.batch_size:
        update["model"] = cfg.model.model_copy(update={"batch_size": args.batch_size})
    cfg = cfg.model_copy(update=update)

    samples: list[tuple[float, int, float]] = []
    progress = {"done": 0, "phase": ""}
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.5):
            samples.append((time.perf_counter(), progress["done"], rss_mib()))

    def on_progress(p) -> None:
        progress["done"] = p.fields_done + p.fields_failed
        progress["phase"] = p.phase

    with tempfile.TemporaryDirectory() as tmp, closing_core(create_simulated_core(rig)) as core:
        clock = core.simulation.clock
        threading.Thread(target=sample, daemon=True).start()
        rss0 = rss_mib()
        t0 = time.perf_counter()
        hw0 = clock.total_s
        result = run_scan(
            core,
            cfg,
            Path(tmp) / "scan",
            limits=rig_limits(Path(args.config), core),
            on_progress=on_progress,
        )
        wall = time.perf_counter() - t0
        stop.set()
        hardware = clock.total_s - hw0
        # inference alone on the scan's own tiles, same batch size
        import zarr

        tiles = zarr.open_group(Path(tmp) / "scan" / "scan.zarr", mode="r")["tiles"]
        batch = np.asarray(tiles[: min(32, tiles.shape[0])])
        seg = Segmenter.from_checkpoint(
            cfg.model.checkpoint or DEFAULT_CHECKPOINT, batch_size=cfg.model.batch_size
        )
        chip_reference = cfg.model.chip_reference and seg.config.input_contrast

        def infer(tiles: np.ndarray) -> None:
            # as the scan does: each tile's own reference first, for the chip reference
            if chip_reference:
                seg.predict(tiles, *seg.substrate_references(tiles))
            else:
                seg.predict(tiles)

        infer(batch[:2])
        t = time.perf_counter()
        infer(batch)
        infer_rate = len(batch) / (time.perf_counter() - t)

    p = result.progress
    print(
        f"chip {args.chip_mm:g} × {args.chip_mm:g} mm, {p.fields_total} fields, "
        f"time scale {args.time_scale:g}, batch {cfg.model.batch_size}"
    )
    print(f"wall time of the whole scan      {wall:8.1f} s")
    print(
        f"hardware time (move+settle+exp)  {hardware:8.1f} s  "
        f"(move {clock.move_s:.1f}, settle {clock.settle_s:.1f}, exposure {clock.exposure_s:.1f})"
    )
    print(f"scan efficiency                  {hardware / wall:8.3f}   (target >= 0.9)")
    print(f"stage rate                       {p.fields_total / hardware:8.2f} fields/s (hardware)")
    print(f"inference alone                  {infer_rate:8.2f} tiles/s")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak resident memory             {peak:8.0f} MiB (at start {rss0:.0f} MiB)")
    if samples:
        quarter = [samples[int(q * (len(samples) - 1))] for q in (0.25, 0.5, 0.75, 1.0)]
        print(
            "resident memory as the scan went: "
            + ", ".join(f"{d} fields {m:.0f} MiB" for _, d, m in quarter)
        )
    score = result.score
    if score is not None:
        print(score.format_table())


if __name__ == "__main__":
    main()
