"""Training speed of the recipes, fp32 against mixed precision on CUDA, and what a whole
cross-validation at that speed costs.

    python scripts/bench_training.py [--recipes paper lab] [--steps 60] [--device auto]

Per recipe: optimiser steps/s of ``model.train.train`` at the recipe's preset, crop and batch
size on random 772×688 images (the real set's size) with the recipe's augmentations, so the
figure includes the CPU-side augmentation the way a real run pays for it. On CUDA it runs
both fp32 and autocast (bf16 where supported). Then the projected wall time of one training
run of the recipe, and of the paper's Table 1 grid (4 augmentation sets × 2 losses × 3 folds)
at that recipe, evaluation not counted.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from model.train import RECIPES, TrainConfig, resolve_device, train

TABLE1_RUNS = 4 * 2 * 3


def random_pairs(n: int, rng: np.random.Generator) -> list[tuple[np.ndarray, np.ndarray]]:
    """Images of the real set's size with random labels: speed does not depend on content."""
    return [
        (
            rng.integers(0, 256, (772, 688, 3), dtype=np.uint8),
            rng.integers(0, 3, (772, 688), dtype=np.uint8),
        )
        for _ in range(n)
    ]


def steps_per_second(
    pairs: list[tuple[np.ndarray, np.ndarray]], cfg: TrainConfig, steps: int
) -> float:
    run = cfg.model_copy(update={"epochs": 1, "samples_per_epoch": steps * cfg.batch_size})
    warm = cfg.model_copy(update={"epochs": 1, "samples_per_epoch": 3 * cfg.batch_size})
    train(pairs, warm)  # cuDNN autotuning and allocator warm-up stay out of the figure
    if run.device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    train(pairs, run)
    if run.device.startswith("cuda"):
        torch.cuda.synchronize()
    return steps / (time.perf_counter() - start)


def hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipes", nargs="+", default=["paper", "lab"], choices=sorted(RECIPES))
    ap.add_argument("--steps", type=int, default=60, help="optimiser steps timed per figure")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()

    torch.set_num_threads(os.cpu_count() or 1)
    device = resolve_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"torch {torch.__version__}; {device} ({name}); {torch.get_num_threads()} CPU threads")
    pairs = random_pairs(8, np.random.default_rng(0))
    print(
        "\nrecipe  preset     crop  batch  precision  steps/s  samples/s  one run     "
        "Table 1 (24 runs)"
    )
    for recipe in args.recipes:
        base = RECIPES[recipe].model_copy(update={"device": str(device)})
        precisions = [False, True] if device.type == "cuda" else [False]
        for amp in precisions:
            cfg = base.model_copy(update={"amp": amp})
            rate = steps_per_second(pairs, cfg, args.steps)
            one_run = cfg.epochs * cfg.steps_per_epoch / rate
            label = "fp32"
            if amp:
                label = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
            print(
                f"{recipe:7s} {cfg.preset:10s} {cfg.crop:4d}  {cfg.batch_size:5d}  {label:9s}  "
                f"{rate:7.2f}  {rate * cfg.batch_size:9.2f}  {hours(one_run):10s}  "
                f"{hours(one_run * TABLE1_RUNS)}",
                flush=True,
            )


if __name__ == "__main__":
    main()
