#!/usr/bin/env python
"""Synthetic tiles in a rig's own look: its lamp, optics and camera unchanged on every chip.

    python scripts/synth_rig_look.py --config configs/simulated.yaml --out /tmp/rig-look --count 96

`flakescan synth` randomises the look per chip (that is what a model should train on); this
writes the held-out set that shows how a model does on tiles a scan of the rig itself takes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from drivers.simulated.config import load_simulated_config
from drivers.simulated.synth import write_synthetic_dataset


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--config", type=Path, required=True, help="simulated-rig YAML")
    ap.add_argument("--out", type=Path, required=True, help="new dataset folder")
    ap.add_argument("--count", type=int, default=96)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tiles-per-chip", type=int, default=8)
    args = ap.parse_args(argv)
    out = write_synthetic_dataset(
        load_simulated_config(args.config),
        args.out,
        args.count,
        seed=args.seed,
        tiles_per_chip=args.tiles_per_chip,
        randomise=False,
    )
    print(f"wrote {args.count} tiles in the rig's own look to {out}")


if __name__ == "__main__":
    main()
