"""`flakescan train`, `evaluate` and `cv`: the model's commands, with rich progress."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .console import console, fail

if TYPE_CHECKING:  # torch loads only when a model command runs
    from model.train import TrainConfig
    from model.unet import UNetConfig


SPLIT_OTHER = typer.Option(
    "--split-other/--no-split-other",
    help="Learn each raw mask value mapped to `other` (substrate, thick flakes) as an output of "
    "its own, summed back at inference (default: off; README, cross-validated results).",
)

TRAIN_ILLUMINATION = typer.Option(
    "--illumination",
    help="plane: level every image by a plane through its substrate before training, and "
    "score it levelled (model/illumination.py); none: as they are (the recipe's default).",
)

TRAIN_SUBSTRATE = typer.Option(
    "--substrate",
    help="auto: train (and score) each image `auto` finds on a transparent substrate read "
    "mirrored onto the oxide's contrast, as the Segmenter reads it; oxide: every image as it is "
    "(default: the recipe's; auto for lab and lab-gpu).",
)


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        console=console,
    )


def _load(path: Path):
    from model.data import DatasetError, load_dataset

    try:
        return load_dataset(path)
    except (DatasetError, FileNotFoundError) as e:
        raise fail(str(e)) from None


def _train_config(recipe: str, **overrides: object) -> TrainConfig:
    """The recipe's TrainConfig with the options given on the command line laid over it."""
    from model.train import RECIPES, TrainConfig

    if recipe not in RECIPES:
        raise fail(f"unknown recipe {recipe!r}; choose from {sorted(RECIPES)}")
    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        return TrainConfig.model_validate({**RECIPES[recipe].model_dump(), **given})
    except ValueError as e:
        raise fail(str(e)) from None


def _substrate_for(cfg: TrainConfig, net: UNetConfig, given: str | None) -> TrainConfig:
    """``cfg`` with a substrate rule the net can take: the mirror (`auto`) reads the optical
    contrast of RGB images, so a recipe's `auto` falls back to `oxide` for other nets; asked
    for by name, it is refused."""
    if cfg.substrate == "oxide" or net.reads_rgb_contrast:
        return cfg
    if given is not None:
        raise fail(
            f"--substrate {given} reads the optical contrast of RGB images; this net does not "
            "take it: use --substrate oxide"
        )
    console.print(
        "this net does not take the optical contrast of RGB images: no image is trained "
        "mirrored (substrate oxide)"
    )
    return cfg.model_copy(update={"substrate": "oxide"})


#: GFLOP a 512² tile above which training on a CPU takes hours (lab-wide 110, paper 437;
#: the CPU presets ~7)
SLOW_ON_CPU_GFLOP = 50.0


def _warn_if_slow_on_cpu(cfg: TrainConfig) -> None:
    """Say so before a net meant for a GPU starts hours of training on the CPU."""
    from model.train import resolve_device
    from model.unet import PRESETS, gflops_per_tile

    if resolve_device(cfg.device).type != "cpu" or cfg.preset not in PRESETS:
        return
    gflop = gflops_per_tile(cfg.preset)
    if gflop > SLOW_ON_CPU_GFLOP:
        console.print(
            f"[yellow]the {cfg.preset} net ({gflop:.0f} GFLOP a 512² tile) is training on the "
            "CPU: expect hours, where --recipe lab (small-lab, 7 GFLOP) takes ~10 min on 2 "
            "cores; it is meant for a GPU[/]"
        )


def train(
    data: Annotated[list[Path], typer.Option(help="Dataset folder(s); repeat to combine.")],
    out: Annotated[Path, typer.Option(help="Checkpoint file to write (.pt).")],
    recipe: Annotated[
        str, typer.Option(help="Defaults to start from: cpu, lab, lab-gpu or paper.")
    ] = "cpu",
    preset: Annotated[
        str | None, typer.Option(help="Network: paper, small, small-lab, lab-wide or tiny.")
    ] = None,
    epochs: Annotated[int | None, typer.Option(min=1)] = None,
    samples_per_epoch: Annotated[int | None, typer.Option(min=1)] = None,
    crop: Annotated[int | None, typer.Option(min=32, help="Training crop size, px.")] = None,
    batch_size: Annotated[int | None, typer.Option(min=1)] = None,
    lr: Annotated[float | None, typer.Option(help="Adam learning rate.")] = None,
    lr_schedule: Annotated[
        str | None, typer.Option(help="constant, or cosine (falls to zero by the last epoch).")
    ] = None,
    loss: Annotated[str | None, typer.Option(help="ce or weighted.")] = None,
    augment: Annotated[
        str | None,
        typer.Option(
            help="none, grayscale, contrast, grayscale+contrast, full, look or synthetic."
        ),
    ] = None,
    seed: Annotated[int | None, typer.Option()] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda, cuda:1 ...")] = None,
    init: Annotated[Path | None, typer.Option(help="Checkpoint to fine-tune from.")] = None,
    val: Annotated[Path | None, typer.Option(help="Dataset folder scored every epoch.")] = None,
    split_other: Annotated[bool | None, SPLIT_OTHER] = None,
    illumination: Annotated[str | None, TRAIN_ILLUMINATION] = None,
    substrate: Annotated[str | None, TRAIN_SUBSTRATE] = None,
) -> None:
    """Train the U-Net on dataset folders and write a checkpoint with its config."""
    from model.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
    from model.data import preload
    from model.evaluate import evaluate, reading_for
    from model.segmenter import READ_AS
    from model.train import TrainConfig
    from model.train import train as run_training
    from model.unet import PRESETS

    cfg = _train_config(
        recipe,
        preset=preset,
        epochs=epochs,
        samples_per_epoch=samples_per_epoch,
        crop=crop,
        batch_size=batch_size,
        lr=lr,
        lr_schedule=lr_schedule,
        loss=loss,
        augment=augment,
        seed=seed,
        device=device,
        split_other=split_other,
        illumination=illumination,
        substrate=substrate,
    )
    if out.exists():
        raise fail(f"{out} exists; choose a new checkpoint path (nothing is overwritten)")
    datasets = [_load(d) for d in data]
    model, init_values = None, None
    if init is not None:
        try:
            model, init_meta = load_checkpoint(init)
        except CheckpointError as e:
            raise fail(str(e)) from None
        # Fine-tuning keeps the checkpoint's net, whatever the recipe's preset; say which.
        # What training learnt about the data (outputs for `other`, the oxide's colour) is not
        # part of which net it is.
        base_net = model.config.model_copy(update={"other_outputs": 1, "oxide_colour": None})
        net = next((name for name, c in PRESETS.items() if c == base_net), "from --init")
        if preset is not None and preset != net:
            raise fail(
                f"--preset {preset} does not match the net in {init} ({net}); fine-tuning keeps "
                "that net, so leave --preset out"
            )
        # Its outputs are fixed too: split `other` only where the checkpoint's net does.
        split = model.config.other_outputs > 1
        if split_other is not None and split_other != split:
            raise fail(
                f"the net in {init} has {model.config.other_outputs} output(s) for `other`; "
                f"fine-tuning keeps that, so leave --split-other/--no-split-other out"
            )
        cfg = cfg.model_copy(update={"preset": net, "split_other": split})
        # It also keeps how it read its images, unless told otherwise: a net trained mirrored
        # or levelled and fine-tuned without would be read one way and trained another.
        init_cfg = init_meta.training.get("config") or {}
        kept = {
            key: init_cfg[key]
            for key, given in (("substrate", substrate), ("illumination", illumination))
            if given is None and key in init_cfg
        }
        try:  # a checkpoint's values are checked as the command line's are
            cfg = TrainConfig.model_validate({**cfg.model_dump(), **kept})
        except ValueError as e:
            raise fail(f"{init}: {e}") from None
        init_values = init_meta.training.get("other_values")
        # Train against the reference the net will be read with (the Segmenter's READ_AS):
        # fine-tuned on 25 real images, the shipped net scored 0.748 / 0.660 on two splits
        # this way against 0.721 / 0.600 with its crops read against `bright`.
        trained = model.config.contrast_reference
        if model.config.input_contrast and trained in READ_AS:
            model.config = model.config.model_copy(update={"contrast_reference": READ_AS[trained]})
            console.print(
                f"fine-tuning against the `{READ_AS[trained]}` contrast reference, which the net "
                f"(trained with `{trained}`) is read with"
            )
    net_config = model.config if model is not None else PRESETS.get(cfg.preset)
    if net_config is not None:  # an unknown preset is refused by training itself
        cfg = _substrate_for(cfg, net_config, substrate)
    _warn_if_slow_on_cpu(cfg)
    other_values = None
    if cfg.split_other:
        other_values = _same_other_values(datasets, init, init_values)
        # Data with one raw value for `other` has nothing to split: record what was done.
        cfg = cfg.model_copy(update={"split_other": len(other_values) > 1})
    level = cfg.illumination == "plane"
    pairs = [p for ds in datasets for p in preload(ds, split_other=cfg.split_other, level=level)]
    other_outputs = len(other_values) if cfg.split_other and other_values else 1
    if model is not None and other_outputs > 1 and other_outputs != model.config.other_outputs:
        raise fail(
            f"the data map {other_outputs} raw value(s) to `other` but the net in {init} learnt "
            f"{model.config.other_outputs}; fine-tune it on data labelled the same way"
        )
    val_set = _load(val) if val else None

    def validate(m):
        # read as evaluate will read the checkpoint (model/evaluate.py `reading_for`)
        segmenter, val_level = reading_for(m, cfg, batch_size=1)
        scores = evaluate(segmenter, val_set, level=val_level)
        return {
            "val_mpa": round(scores.mean_pixel_accuracy, 4),
            "val_region": round(scores.regions.accuracy, 4),
        }

    with _progress() as bar:
        task = bar.add_task("train", total=cfg.epochs * cfg.steps_per_epoch, status="")
        model, reports, weights = run_training(
            pairs,
            cfg,
            model=model,
            other_outputs=other_outputs,
            validate=validate if val_set else None,
            on_step=lambda _s, loss_value: bar.update(
                task, advance=1, status=f"loss {loss_value:.3f}"
            ),
            on_epoch=lambda r: bar.update(
                task,
                status=f"epoch {r.epoch} loss {r.train_loss:.3f}"
                + "".join(f" {k} {v}" for k, v in r.val.items()),
            ),
        )
    provenance = {
        "datasets": [
            {
                "path": str(ds.root),
                "images": len(ds),
                "source": ds.config.model_extra.get("source", ""),
            }
            for ds in datasets
        ],
        "recipe": recipe,
        "config": cfg.model_dump(),
        "init": str(init) if init else None,
        "class_weights": None if weights is None else [float(w) for w in weights],
        # the raw mask values behind output 0 and the outputs after the three classes
        "other_values": other_values if cfg.split_other else None,
        "history": [{"epoch": r.epoch, "loss": r.train_loss, **r.val} for r in reports],
    }
    save_checkpoint(out, model, model.config, training=provenance)
    console.print(f"wrote [bold]{out}[/]")


def _same_other_values(datasets, init: Path | None, init_values: list[int] | None) -> list[int]:
    """The raw values every dataset (and the --init net, where it recorded them) maps to
    `other`: a split net's outputs stand for those values, so they must mean the same in all."""
    found = {tuple(ds.config.other_values) for ds in datasets}
    if len(found) > 1:
        listed = "; ".join(f"{ds.root}: {ds.config.other_values}" for ds in datasets)
        raise fail(
            f"the --data folders map different raw values to `other` ({listed}); a net that "
            "learns each apart needs them labelled alike: relabel, or pass --no-split-other"
        )
    values = list(found.pop())
    # Data with one raw value for `other` has only targets every net has (0, 1, 2).
    if init_values is not None and len(values) > 1 and list(init_values) != values:
        raise fail(
            f"the net in {init} learnt `other` as raw values {list(init_values)}, the data map "
            f"{values} to it; fine-tune it on data labelled the same way"
        )
    return values


def evaluate(
    data: Annotated[Path, typer.Option(help="Dataset folder with masks.")],
    checkpoint: Annotated[
        Path | None,
        typer.Option(help="Model checkpoint (.pt); default: the shipped model/weights/default.pt."),
    ] = None,
    pred_out: Annotated[Path | None, typer.Option(help="Write predicted masks here.")] = None,
    plots: Annotated[Path | None, typer.Option(help="Write ROC and PR plots here.")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write scores as JSON.")] = None,
    device: Annotated[str, typer.Option()] = "auto",
    batch_size: Annotated[int, typer.Option(min=1)] = 2,
    plain_posterior: Annotated[
        bool,
        typer.Option(
            "--plain-posterior",
            help="Divide out the training loss's class weights, as `flakescan scan` does "
            "(default: the labels as trained, the paper's way).",
        ),
    ] = False,
    worst: Annotated[
        int,
        typer.Option(
            min=0, help="List the images that cost the mean per-class accuracy most (0: none)."
        ),
    ] = 5,
    reference: Annotated[
        str | None,
        typer.Option(
            help="Contrast reference rule to read with: mean, median, bright or hue (default: "
            "the net's own; `bright` nets are read with `hue`, model/unet/reference.py)."
        ),
    ] = None,
    substrate: Annotated[
        str | None,
        typer.Option(
            help="What the flakes lie on: oxide, transparent (quartz, sapphire: layers brighter "
            "than the substrate) or auto, per image (default: auto for nets read with `hue`, "
            "such as the shipped one, and nets trained with --substrate auto; oxide for others)."
        ),
    ] = None,
    illumination: Annotated[
        str | None,
        typer.Option(
            help="Level each image's illumination first: plane (a plane through its substrate "
            "divided out, model/illumination.py) or none (default: plane for nets read with "
            "`hue`, such as the shipped one, and nets trained with --illumination plane; none "
            "for others, which trained on images as they are)."
        ),
    ] = None,
) -> None:
    """Score a checkpoint on a dataset folder: pixel accuracy, IoU, region accuracy, ROC/PR."""
    from model.checkpoint import DEFAULT_CHECKPOINT
    from model.evaluate import Reading, levels_by_default
    from model.evaluate import evaluate as run_evaluation
    from model.segmenter import Segmenter
    from model.train import resolve_device

    dataset = _load(data)
    if checkpoint is None:
        checkpoint = DEFAULT_CHECKPOINT
        console.print(f"checkpoint: the shipped default model, {checkpoint}")
    try:
        segmenter = Segmenter.from_checkpoint(
            checkpoint,
            device=resolve_device(device),
            batch_size=batch_size,
            plain_posterior=plain_posterior,
            reference=reference,
            substrate=substrate,
        )
    except (ValueError, FileNotFoundError) as e:  # a bad checkpoint (CheckpointError) or option
        raise fail(str(e)) from None
    if segmenter.reference_overridden:
        trained = segmenter.config.contrast_reference
        console.print(f"contrast reference: {segmenter.reference} (the net trained with {trained})")
    if illumination is None:
        illumination = "plane" if levels_by_default(segmenter) else "none"
    if illumination not in ("plane", "none"):
        raise fail(f"--illumination {illumination!r}: choose plane or none")
    reading = Reading()
    with _progress() as bar:
        task = bar.add_task("evaluate", total=len(dataset), status="")
        scores = run_evaluation(
            segmenter,
            dataset,
            pred_out=pred_out,
            plots=plots,
            on_image=lambda stem: bar.update(task, advance=1, status=stem),
            level=illumination == "plane",
            reading=reading,
        )
    if illumination == "plane":
        console.print(
            f"illumination: levelled {len(reading.levelled)} of {len(dataset)} image(s) by a "
            "plane through the substrate (--illumination none: as they are)"
        )
    transparent = reading.transparent
    if segmenter.substrate != "oxide":
        shown = ", ".join(transparent[:8]) + (", ..." if len(transparent) > 8 else "")
        console.print(
            f"substrate {segmenter.substrate}: {len(transparent)} of {len(dataset)} image(s) "
            f"read as on a transparent substrate" + (f" ({shown})" if transparent else ""),
            markup=False,
        )
    console.print(scores.format_table())
    if worst:
        console.print("\nworst images (their share of the lost mean per-class accuracy):")
        # Stems are the user's file names: print them as they are, unwrapped.
        table = scores.format_worst(worst)
        console.print(table, markup=False, emoji=False, highlight=False, soft_wrap=True)
    if json_out:
        doc = {
            **scores.as_dict(),
            "illumination": illumination,
            "levelled": reading.levelled,
            "read_as_transparent_substrate": transparent,
        }
        json_out.write_text(json.dumps(doc, indent=2))


def cv(
    data: Annotated[Path, typer.Option(help="Dataset folder with masks.")],
    folds: Annotated[int, typer.Option(min=2)] = 3,
    augment: Annotated[list[str] | None, typer.Option(help="Augmentation set(s).")] = None,
    loss: Annotated[list[str] | None, typer.Option(help="ce and/or weighted.")] = None,
    table1: Annotated[bool, typer.Option(help="The paper's Table 1 grid.")] = False,
    subset: Annotated[int | None, typer.Option(help="Use only ~N images (paper: 24).")] = None,
    recipe: Annotated[str, typer.Option()] = "cpu",
    preset: Annotated[str | None, typer.Option()] = None,
    epochs: Annotated[int | None, typer.Option(min=1)] = None,
    lr_schedule: Annotated[str | None, typer.Option(help="constant or cosine.")] = None,
    seed: Annotated[int, typer.Option()] = 0,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write results as JSON.")] = None,
    split_other: Annotated[bool | None, SPLIT_OTHER] = None,
    illumination: Annotated[str | None, TRAIN_ILLUMINATION] = None,
    substrate: Annotated[str | None, TRAIN_SUBSTRATE] = None,
) -> None:
    """k-fold cross-validation split by sample; --table1 runs the paper's grid."""
    from model.cv import TABLE1_AUGMENTS, TABLE1_LOSSES, cross_validate
    from model.unet import PRESETS

    base = _train_config(
        recipe,
        preset=preset,
        epochs=epochs,
        lr_schedule=lr_schedule,
        seed=seed,
        split_other=split_other,
        illumination=illumination,
        substrate=substrate,
    )
    if base.preset in PRESETS:
        base = _substrate_for(base, PRESETS[base.preset], substrate)
    augments = TABLE1_AUGMENTS if table1 else tuple(augment or (base.augment,))
    losses = TABLE1_LOSSES if table1 else tuple(loss or (base.loss,))
    dataset = _load(data)
    with _progress() as bar:
        task = bar.add_task("cv", total=len(augments) * len(losses) * folds, status="")
        results = cross_validate(
            dataset,
            base,
            augments=augments,
            losses=losses,
            folds=folds,
            subset=subset,
            on_fold=lambda r, k, s: bar.update(
                task,
                advance=1,
                status=f"{r.augment}/{r.loss} fold {k}: mpa {s.mean_pixel_accuracy:.3f}",
            ),
        )
    table = Table(title=f"{folds}-fold cross-validation by sample: {data}")
    for col in ("augment", "loss", "mean pixel acc", "region acc", "mean IoU", "minutes"):
        table.add_column(col)
    for r in results:
        row = [r.mean(m) for m in ("mean_pixel_accuracy", "region_accuracy", "mean_iou")]
        table.add_row(
            r.augment, r.loss, *(f"{m:.3f} ± {s:.3f}" for m, s in row), f"{r.seconds / 60:.1f}"
        )
    console.print(table)
    if json_out:
        json_out.write_text(
            json.dumps(
                [
                    {
                        "augment": r.augment,
                        "loss": r.loss,
                        "seconds": r.seconds,
                        "folds": [s.as_dict() for s in r.folds],
                    }
                    for r in results
                ],
                indent=2,
            )
        )
