#!/usr/bin/env python
"""Measure the fine-tuning recipe: fine-tune a model on ~24 real images, score it on the rest.

    python scripts/finetune_experiment.py --data ../shared/data/mos2-2dtlk --work /tmp/ft24

Picks whole samples (model.cv.subset_by_sample, then any sample with an image in the training
subset is dropped from the test side, so no sample is on both), writes the two halves as
dataset folders of symlinks under --work (outside the repository: the real images must not be
copied into it), then runs exactly the documented commands

    flakescan train --init <checkpoint> --data WORK/train --out WORK/finetuned.pt ...
    flakescan evaluate --data WORK/test --checkpoint WORK/finetuned.pt --json ...

and, for comparison, evaluates the starting checkpoint on the same test images. With --scratch
it also trains the same recipe from random weights. Results go to WORK/summary.json.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from model.checkpoint import DEFAULT_CHECKPOINT  # noqa: E402
from model.cv import subset_by_sample  # noqa: E402
from model.data import load_dataset  # noqa: E402

#: the fine-tuning recipe documented in docs/model_card.md
FINETUNE_ARGS = [
    "--epochs", "25", "--samples-per-epoch", "192", "--lr", "3e-4",
    "--crop", "256", "--batch-size", "4", "--augment", "full", "--loss", "weighted",
    "--device", "cpu",
]  # fmt: skip


def link_folder(ds, indices: list[int], out: Path) -> Path:
    """A dataset folder of symlinks to the chosen images and masks, with the same config."""
    (out / "images").mkdir(parents=True)
    (out / "masks").mkdir()
    shutil.copy(ds.root / "dataset.yaml", out / "dataset.yaml")
    for i in indices:
        s = ds.samples[i]
        (out / "images" / s.image_path.name).symlink_to(s.image_path.resolve())
        (out / "masks" / s.mask_path.name).symlink_to(s.mask_path.resolve())
    return out


def flakescan(*args: str) -> float:
    exe = Path(sys.executable).with_name("flakescan")
    t = time.monotonic()
    subprocess.run([str(exe), *args], check=True)
    return time.monotonic() - t


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--work", type=Path, required=True, help="new folder outside the repo")
    ap.add_argument("--init", type=Path, default=DEFAULT_CHECKPOINT)
    ap.add_argument("-n", type=int, default=24, help="training images (whole samples)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scratch", action="store_true", help="also train from random weights")
    ap.add_argument(
        "--init-scores", type=Path, help="scores JSON of --init on the same split (skips that run)"
    )
    ap.add_argument(
        "--train-extra",
        default="",
        help="more `flakescan train` options, after the recipe's (the last value wins), e.g. "
        "'--lr 1e-4 --epochs 15': to try a variant of the recipe",
    )
    args = ap.parse_args(argv)
    if args.work.resolve().is_relative_to(REPO_ROOT):
        print("--work must be outside the repository (real images are linked there)")
        return 2
    if args.work.exists():
        print(f"{args.work} exists; choose a new folder")
        return 2
    ds = load_dataset(args.data)
    train = subset_by_sample(ds, args.n, seed=args.seed)
    train_ids = {ds.samples[i].sample_id for i in train}
    test = [i for i in range(len(ds)) if ds.samples[i].sample_id not in train_ids]
    link_folder(ds, train, args.work / "train")
    link_folder(ds, test, args.work / "test")
    print(f"train {len(train)} images ({len(train_ids)} samples), test {len(test)} images")

    w = args.work
    summary: dict = {"train_images": len(train), "test_images": len(test), "seed": args.seed}
    train_args = [*FINETUNE_ARGS, *shlex.split(args.train_extra)]
    summary["train_args"] = train_args
    if args.init_scores:
        shutil.copy(args.init_scores, w / "init.json")
    else:
        summary["init_eval_s"] = flakescan(
            "evaluate", "--data", str(w / "test"), "--checkpoint", str(args.init),
            "--json", str(w / "init.json"),
        )  # fmt: skip
    runs = [("finetuned", ["--init", str(args.init)])]
    if args.scratch:
        runs.append(("scratch", []))
    for name, extra in runs:
        summary[f"{name}_train_s"] = flakescan(
            "train", "--data", str(w / "train"), "--out", str(w / f"{name}.pt"),
            "--seed", str(args.seed), *train_args, *extra,
        )  # fmt: skip
        flakescan(
            "evaluate", "--data", str(w / "test"), "--checkpoint", str(w / f"{name}.pt"),
            "--json", str(w / f"{name}.json"),
        )  # fmt: skip
    for name in ["init", *(r[0] for r in runs)]:
        summary[name] = json.loads((w / f"{name}.json").read_text())
    (w / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: v for k, v in summary.items() if not isinstance(v, dict)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
