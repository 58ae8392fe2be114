"""Benchmark the simulated rig: frame render time on one core, and the memory of a chip.

    python scripts/bench_sim.py                 # 1 × 1 cm chip, 300 fields
    python scripts/bench_sim.py --fields 1000 --chip-mm 5

Target (issue 2): under 20 ms per 512×512 frame on one core, so a 20,000-tile chip
simulates in minutes.
"""

from __future__ import annotations

import os

# One core, one thread: the figure we promise is per core.
for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(var, "1")

import argparse  # noqa: E402
import time  # noqa: E402
import tracemalloc  # noqa: E402

import numpy as np  # noqa: E402

from drivers.simulated import ChipWorld, SimulatedRigConfig, simulated_rig  # noqa: E402
from drivers.simulated.render import Exposure, FrameRenderer  # noqa: E402


def _percentiles(ms: list[float]) -> str:
    a = np.asarray(ms)
    return f"mean {a.mean():6.2f}  p50 {np.median(a):6.2f}  p95 {np.percentile(a, 95):6.2f} ms"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--chip-mm", type=float, default=10.0, help="chip side in mm (default 10)")
    ap.add_argument("--fields", type=int, default=300, help="random fields of view to render")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})

    side = args.chip_mm * 1000
    cfg = SimulatedRigConfig.model_validate(
        {"seed": args.seed, "chip": {"width_um": side, "height_um": side}}
    )
    tracemalloc.start()
    t0 = time.perf_counter()
    world = ChipWorld(cfg)
    build_s = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    held, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(f"chip {args.chip_mm:g} × {args.chip_mm:g} mm, seed {args.seed}")
    print(
        f"  world built in {build_s:.2f} s: {len(world.pieces)} pieces, "
        f"{len(world.flakes)} truth flakes (1L/2L)"
    )
    print(
        f"  world memory: {held / 2**20:.1f} MiB of Python objects held after build "
        f"(peak {peak / 2**20:.1f} MiB while building); its geometry, counting GEOS's "
        f"own copies, ≈ {world.memory_bytes() / 2**20:.1f} MiB"
    )

    renderer = FrameRenderer(world, cfg, seed=1)
    obj = cfg.objective_config("100x")
    rng = np.random.default_rng(args.seed)
    fov_um = renderer.pixel_size_um(obj) * np.array(renderer.shape[::-1])
    renderer.render(Exposure((side / 2, side / 2), obj, 0.0, 40.0))  # colour table, warm-up

    def timed(centres) -> list[float]:
        out = np.empty((*renderer.shape, 3), dtype=np.uint8)
        times = []
        for x, y in centres:
            dz = float(rng.normal(0, 0.3))
            t = time.perf_counter()
            renderer.render(Exposure((float(x), float(y)), obj, dz, 40.0), out=out)
            times.append((time.perf_counter() - t) * 1000)
        return times

    random_fields = rng.uniform(fov_um, side - fov_um, size=(args.fields, 2))
    on_flakes = [f.polygon.centroid for f in world.flakes[: args.fields]]
    t_random = timed(random_fields)
    t_flakes = timed([(c.x, c.y) for c in on_flakes])
    print("render 512×512 at 100× on one core (target < 20 ms):")
    print(f"  random fields ({len(t_random)}, mostly bare): {_percentiles(t_random)}")
    print(f"  fields centred on flakes ({len(t_flakes)}):    {_percentiles(t_flakes)}")
    n_fields = int(np.ceil(side / fov_um[0]) * np.ceil(side / fov_um[1]))
    minutes = n_fields * np.mean(t_random) / 1000 / 60
    print(f"  a whole chip ({n_fields} fields without overlap) renders in ~{minutes:.1f} min")

    small = cfg.model_copy(
        update={"chip": cfg.chip.model_copy(update={"width_um": 2000.0, "height_um": 2000.0})}
    )
    with simulated_rig(small) as core:
        core.snapImage()
        times = []
        for x, y in rng.uniform(100, 1900, size=(100, 2)):
            core.setXYPosition(float(x), float(y))
            core.waitForDevice("XYStage")
            t = time.perf_counter()
            core.snapImage()
            core.getImage()
            times.append((time.perf_counter() - t) * 1000)
    print(f"snapImage + getImage through the Micro-Manager core: {_percentiles(times)}")


if __name__ == "__main__":
    main()
