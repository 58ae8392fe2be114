#!/usr/bin/env python
"""A figure of a model's predictions: image, true mask and predicted mask for a few tiles.

    python scripts/draw_predictions.py --data /tmp/heldout --out docs/predictions_synthetic.png
    python scripts/draw_predictions.py --data ../shared/data/mos2-2dtlk \
        --out /tmp/flakescan-predictions/real.png

--checkpoint defaults to the shipped model (model/weights/default.pt). Only synthetic data
(dataset.yaml `source: flakescan synth`) may be drawn into the repository: the real micrographs
carry no license, so for any other data the script refuses an output path inside the repo.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from model.checkpoint import DEFAULT_CHECKPOINT  # noqa: E402
from model.data import load_dataset  # noqa: E402
from model.evaluate import levels_by_default, read_image  # noqa: E402
from model.metrics import confusion_matrix, mean_pixel_accuracy  # noqa: E402
from model.segmenter import Segmenter  # noqa: E402

#: other, monolayer, bilayer
COLOURS = np.array([(0.85, 0.85, 0.85), (0.12, 0.47, 0.95), (1.0, 0.55, 0.1)], dtype=np.float32)
NAMES = ("other", "monolayer", "bilayer")


def inside_repo(path: Path) -> bool:
    return path.resolve().is_relative_to(REPO_ROOT)


def pick(ds, n: int, seed: int) -> list[int]:
    """`n` images, those with monolayer or bilayer first, in a seeded random order."""
    order = [int(i) for i in np.random.default_rng(seed).permutation(len(ds))]
    thin = [i for i in order if (ds.read_mask(ds.samples[i]) > 0).mean() > 0.02]
    return (thin + [i for i in order if i not in thin])[:n]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="dataset folder with masks")
    ap.add_argument("--out", type=Path, required=True, help="PNG to write")
    ap.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    ap.add_argument("-n", type=int, default=6, help="number of images (rows)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    ds = load_dataset(args.data)
    synthetic = ds.config.model_extra.get("source", "") == "flakescan synth"
    if inside_repo(args.out) and not synthetic:
        print(
            f"refusing to write {args.out}: {args.data} is not synthetic (dataset.yaml source "
            "is not 'flakescan synth'); real micrographs must stay outside the repository",
            file=sys.stderr,
        )
        return 2
    seg = Segmenter.from_checkpoint(args.checkpoint, batch_size=1)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    rows = pick(ds, args.n, args.seed)
    fig, axes = plt.subplots(len(rows), 3, figsize=(7.2, 2.4 * len(rows) + 0.6), squeeze=False)
    for ax_row, i in zip(axes, rows, strict=True):
        sample = ds.samples[i]
        image, truth = ds.read_pair(sample)
        # read as `flakescan evaluate` reads it by default
        _, pred = read_image(seg, image, level=levels_by_default(seg))
        mpa = mean_pixel_accuracy(confusion_matrix(truth, pred))
        panels = [
            (image, sample.stem),
            (COLOURS[truth], "truth"),
            (COLOURS[pred], f"prediction (mean class acc {mpa:.2f})"),
        ]
        for ax, (img, caption) in zip(ax_row, panels, strict=True):
            ax.imshow(img)
            ax.set_title(caption, fontsize=7)
            ax.axis("off")
    fig.suptitle(f"{args.checkpoint.name} on {args.data.name}", fontsize=9)
    fig.legend(
        handles=[Patch(color=c, label=n) for n, c in zip(NAMES, COLOURS, strict=True)],
        loc="lower center",
        ncol=3,
        fontsize=7,
        frameon=False,
    )
    fig.tight_layout(rect=(0, 0.03, 1, 0.97))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=80)
    plt.close(fig)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
