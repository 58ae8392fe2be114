"""Training: augmented crops from dataset folders, Adam, (weighted) cross entropy, checkpoints.

Each epoch draws `samples_per_epoch` random augmented crops from the training images; the
paper's recipe (960 augmented samples of 24 images, batch 1, lr 1e-5, 100 epochs) is the
`paper` recipe, and faster defaults suit a CPU.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Literal

import numpy as np
import structlog
import torch
from pydantic import BaseModel, ConfigDict, Field

from .augment import Augmenter, augment_set
from .data import CLASS_NAMES
from .losses import make_loss, median_frequency_weights
from .unet import PRESETS, UNet, build_unet
from .unet.reference import (
    ContrastReference,
    image_input,
    is_mirrored,
    mirrored_references,
    substrate_reference,
)

log = structlog.get_logger("flakescan.train")

Pair = tuple[np.ndarray, np.ndarray]


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    preset: str = "small"
    epochs: Annotated[int, Field(ge=1)] = 30
    samples_per_epoch: Annotated[int, Field(ge=1)] = 192
    crop: Annotated[int, Field(ge=32)] = 256
    batch_size: Annotated[int, Field(ge=1)] = 4
    lr: Annotated[float, Field(gt=0)] = 1e-3
    #: cosine: the rate falls to zero over the run, so the last epochs settle instead of jumping
    lr_schedule: Literal["constant", "cosine"] = "constant"
    loss: Literal["ce", "weighted"] = "weighted"
    augment: str = "contrast"
    seed: int = 0
    device: str = "auto"
    #: bf16/fp16 autocast on CUDA; ignored on CPU
    amp: bool = True
    #: learn each raw mask value a dataset maps to `other` as an output of its own (substrate,
    #: thick flakes, ...), summed back into `other` at inference (UNetConfig.other_outputs)
    split_other: bool = False
    #: plane: every image levelled by a plane through its substrate before training
    #: (model/illumination.py), and so read when scored; for the caller, who loads the images
    #: (``preload(level=...)``), and recorded in the checkpoint
    illumination: Literal["none", "plane"] = "none"
    #: auto: each image `auto` finds on a transparent substrate (quartz: layers brighter than
    #: it; model/unet/reference.py) is trained read mirrored onto the oxide's contrast, as the
    #: Segmenter reads it with substrate `auto`; oxide: every image as it is
    substrate: Literal["oxide", "auto"] = "oxide"

    @property
    def steps_per_epoch(self) -> int:
        """Optimiser steps in one epoch: whole batches of the epoch's samples, at least one."""
        return max(self.samples_per_epoch // self.batch_size, 1)


RECIPES: dict[str, TrainConfig] = {
    # Saito et al.: 24 images augmented to 960, batch 1, Adam lr 1e-5, 100 epochs, weighted CE.
    "paper": TrainConfig(
        preset="paper",
        epochs=100,
        samples_per_epoch=960,
        crop=512,
        batch_size=1,
        lr=1e-5,
        loss="weighted",
        augment="contrast",
    ),
    "cpu": TrainConfig(),
    # A lab's own labelled images on a CPU: raw colour beside contrast, and a cosine rate so
    # the last epochs settle (constant 1e-3 swung a fold by +-0.05 from epoch to epoch).
    # 40 epochs, not 25: +0.03-0.04 mean per-class accuracy on each real-set fold (~8 min a
    # fold of 73 images on a 2-core CPU). split_other stays off: on the real set it made
    # `other` right more often (0.84-0.87 -> 0.87-0.96 per fold) and raised mean IoU, but cost
    # bilayer in some folds, and over three seeds it lowered mean per-class and region accuracy
    # (README, "Cross-validated results").
    # substrate auto: images on a transparent substrate are trained and read mirrored onto the
    # oxide's contrast, their raw planes as the oxide would look; in 3-fold CV on the real set
    # over seeds 0-2 0.839 (CPU) -> 0.857 (H100) mean per-class accuracy for `lab` (region
    # 0.853 -> 0.866), on the H100 0.859 -> 0.865 (0.866 -> 0.877) for `lab-gpu`: a fold whose
    # training holds none of the dark images reads them through the oxide's (README,
    # "Cross-validated results").
    "lab": TrainConfig(preset="small-lab", epochs=40, lr_schedule="cosine", substrate="auto"),
    # The same on a GPU with the four-times-wider net: ~1 min a fold of 73 images on an H100.
    "lab-gpu": TrainConfig(preset="lab-wide", epochs=40, lr_schedule="cosine", substrate="auto"),
}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass
class EpochReport:
    epoch: int
    train_loss: float
    seconds: float
    val: dict[str, float] = field(default_factory=dict)


def train(
    pairs: Sequence[Pair],
    config: TrainConfig,
    *,
    model: UNet | None = None,
    validate: Callable[[UNet], dict[str, float]] | None = None,
    on_step: Callable[[int, float], None] | None = None,
    on_epoch: Callable[[EpochReport], None] | None = None,
    other_outputs: int = 1,
) -> tuple[UNet, list[EpochReport], np.ndarray | None]:
    """Train on (image uint8 H×W×3, mask of class indices) pairs; returns the model, reports,
    and the class weights (one per network output).

    Pass `model` to fine-tune (e.g. from `--init`); otherwise a fresh `config.preset` U-Net
    with `other_outputs` outputs for `other` (masks from ``preload(..., split_other=True)``).
    ``config.split_other`` is for the caller, who builds those masks and `other_outputs` from
    its datasets (``DatasetConfig.other_outputs``); this function reads only `other_outputs`.
    """
    if not pairs:
        raise ValueError("no training images")
    if config.preset not in PRESETS and model is None:
        raise ValueError(f"unknown preset {config.preset!r}; choose from {sorted(PRESETS)}")
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    device = resolve_device(config.device)
    if model is None:
        model = build_unet(
            PRESETS[config.preset].model_copy(update={"other_outputs": other_outputs})
        )
    model = model.to(device)
    outputs = model.config.outputs
    top = max((int(m.max()) for _, m in pairs if m.size), default=0)
    if top >= outputs:
        raise ValueError(
            f"masks hold class index {top} but the net has {outputs} outputs: masks with `other` "
            f"split by raw value need a net with other_outputs set (train split_other)"
        )
    weights = None
    if config.loss == "weighted":
        weights = median_frequency_weights((m for _, m in pairs), n_classes=outputs)
        names = [*CLASS_NAMES, *(f"other_{k}" for k in range(2, outputs - 1))]
        log.info("train.class_weights", **dict(zip(names, map(float, weights), strict=False)))
    loss_fn = make_loss(config.loss, weights).to(device)
    optimiser = torch.optim.Adam(model.parameters(), lr=config.lr)
    steps = config.steps_per_epoch
    schedule = (
        torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=config.epochs * steps)
        if config.lr_schedule == "cosine"
        else None
    )
    transparent = _transparent_images(pairs, model, config.substrate)
    augmenter = Augmenter(crop=config.crop, photometric=augment_set(config.augment), rng=rng)
    use_amp = config.amp and device.type == "cuda"
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
    reports: list[EpochReport] = []
    # One crop size all run: let cuDNN time its algorithms once (the paper recipe on an H100:
    # 23 -> 35 steps/s). Process-wide and not deterministic, so put back afterwards.
    benchmark = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = benchmark or device.type == "cuda"
    try:
        for epoch in range(1, config.epochs + 1):
            model.train()
            start, total = time.perf_counter(), 0.0
            for step in range(steps):
                x, y, mirrored = _batch(
                    pairs, augmenter, rng, config.batch_size, device, transparent
                )
                references = _mirrored_references(x, mirrored, model.config.contrast_reference)
                optimiser.zero_grad(set_to_none=True)
                with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                    loss = loss_fn(model(x, *references), y)
                scaler.scale(loss).backward()
                scaler.step(optimiser)
                scaler.update()
                if schedule is not None:
                    schedule.step()
                total += float(loss.detach())
                if on_step:
                    on_step(step, float(loss.detach()))
            report = EpochReport(epoch, total / steps, time.perf_counter() - start)
            if validate is not None:
                report.val = validate(model)
            log.info("train.epoch", epoch=epoch, loss=round(report.train_loss, 4), **report.val)
            reports.append(report)
            if on_epoch:
                on_epoch(report)
    finally:
        torch.backends.cudnn.benchmark = benchmark
    return model, reports, weights


def _transparent_images(pairs: Sequence[Pair], model: UNet, substrate: str) -> np.ndarray:
    """Per training image, whether it is trained mirrored (``TrainConfig.substrate``): decided
    on the whole image, as the Segmenter decides for a tile."""
    flags = np.zeros(len(pairs), bool)
    if substrate == "oxide":
        return flags
    config = model.config
    if not config.reads_rgb_contrast:
        raise ValueError(
            f"substrate {substrate!r} reads the optical contrast of RGB images; this net does not "
            "take it"
        )
    colours = []
    with torch.inference_mode():
        for i, (image, _) in enumerate(pairs):
            colour, scale = substrate_reference(
                image_input(image), config.contrast_reference, "auto"
            )
            flags[i] = scale is not None and bool(is_mirrored(scale)[0])
            colours.append(colour.flatten().numpy())
    # A fine-tuned net keeps its own; with no image on oxide there is no colour to learn.
    if config.input_raw and config.oxide_colour is None and not flags.all():
        median = [round(float(c), 4) for c in np.median(np.array(colours)[~flags], axis=0)]
        model.config = config.model_copy(update={"oxide_colour": median})
    log.info(
        "train.transparent_substrate",
        images=int(flags.sum()),
        of=len(pairs),
        oxide_colour=model.config.oxide_colour,
    )
    return flags


def _mirrored_references(
    x: torch.Tensor, mirrored: np.ndarray, rule: ContrastReference
) -> tuple[torch.Tensor, torch.Tensor | None] | tuple[()]:
    """``model``'s extra arguments for a batch: each crop's own reference, mirrored for the
    crops of transparent-substrate images; none where no crop is (the net's own reading).
    ``mirrored`` stays on the host: most batches have none, and need no look at the GPU."""
    if not mirrored.any():
        return ()
    return mirrored_references(x, rule, torch.from_numpy(mirrored).to(x.device))


def _batch(
    pairs: Sequence[Pair],
    augmenter: Augmenter,
    rng: np.random.Generator,
    batch_size: int,
    device: torch.device,
    transparent: np.ndarray | None = None,
) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Augmented crops, their masks, and which of them are read mirrored (``transparent``
    marks the images to)."""
    images, masks = [], []
    chosen = rng.integers(len(pairs), size=batch_size)
    for i in chosen:
        img, mask = augmenter(*pairs[int(i)])
        images.append(img.transpose(2, 0, 1))
        masks.append(mask)
    x = torch.from_numpy(np.stack(images)).to(device, memory_format=torch.channels_last)
    y = torch.from_numpy(np.stack(masks).astype(np.int64)).to(device)
    flags = np.zeros(len(chosen), bool) if transparent is None else transparent[chosen]
    return x, y, flags
