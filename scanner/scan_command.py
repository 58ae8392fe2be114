"""`flakescan scan`: one chip in the foreground, with a progress bar and a summary."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Annotated, Any

import typer
from pymmcore_plus import CMMCorePlus
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from model.segmenter import Segmenter

from .acquisition import StageLimits
from .console import console, fail
from .plan import ChipOutline
from .scan import Scan, ScanError, ScanProgress, ScanResult
from .scan_config import ModelConfig, ScanConfig
from .truth import simulated_truth


def rig_limits(config: Path, core: CMMCorePlus) -> StageLimits:
    """The soft limits and safe Z the rig YAML gives (simulated or real)."""
    scope = getattr(core, "simulation", None)
    if scope is not None:
        c = scope.cfg
        return StageLimits(
            x_limits_um=c.xy_stage.x_limits_um,
            y_limits_um=c.xy_stage.y_limits_um,
            safe_z_um=c.focus_drive.safe_z_um,
            lower_z_um=c.focus_drive.lower_limit_um,
        )
    from drivers.micromanager import load_rig_config

    rc = load_rig_config(config)
    return StageLimits(rc.x_limits_um, rc.y_limits_um, rc.safe_z_um)


def with_rig_defaults(cfg: ScanConfig, core: CMMCorePlus) -> ScanConfig:
    """Fill in what the simulated rig knows: where its chip lies."""
    scope = getattr(core, "simulation", None)
    if cfg.chip is not None or scope is None:
        return cfg
    x0, y0, x1, y1 = scope.world.outline.bounds
    return cfg.model_copy(update={"chip": ChipOutline(corners_um=((x0, y0), (x1, y1)))})


def default_out(config: Path) -> Path:
    """runs/<config name>-<local date>-<time>: a new folder for every scan."""
    import datetime as dt

    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{config.stem}-{stamp}"


def checkpoint_path(model: ModelConfig) -> Path:
    """The checkpoint `scan.model` names, or the shipped model when it names none."""
    from model.checkpoint import DEFAULT_CHECKPOINT

    return Path(model.checkpoint or DEFAULT_CHECKPOINT)


def load_segmenter(model: ModelConfig) -> Segmenter:
    """The scan's segmenter, as `scan.model` says (the shipped model when no checkpoint)."""
    from model.train import resolve_device

    checkpoint = checkpoint_path(model)
    if not checkpoint.is_file():
        raise ScanError(f"no model checkpoint at {checkpoint} (scan.model.checkpoint)")
    return Segmenter.from_checkpoint(
        checkpoint,
        device=resolve_device(model.device),
        batch_size=model.batch_size,
        plain_posterior=model.plain_posterior,
        substrate=model.substrate,
    )


def run_scan(
    core: CMMCorePlus,
    cfg: ScanConfig,
    out: Path,
    *,
    limits: StageLimits,
    resume: bool = False,
    on_progress: Any = None,
    rig_info: dict[str, Any] | None = None,
    stop_on_sigint: bool = False,
) -> ScanResult:
    """Load the model and run one scan to the end (the CLI's and the benchmark's way in)."""
    cfg = with_rig_defaults(cfg, core)
    segmenter = load_segmenter(cfg.model)
    assert cfg.chip is not None
    origin = cfg.chip_origin_um or cfg.chip.bounds[:2]
    scan = Scan(
        core,
        cfg,
        out,
        segmenter=segmenter,
        limits=limits,
        resume=resume,
        truth=simulated_truth(core, cfg.chip, origin),
        on_progress=on_progress,
        rig_info={**(rig_info or {}), "model": str(checkpoint_path(cfg.model))},
    )

    async def main() -> ScanResult:
        if stop_on_sigint:
            # First Ctrl-C: finish the field in hand, save, and say how to resume; a second
            # one interrupts at once (the journal still lets the scan resume).
            loop = asyncio.get_running_loop()

            def first_interrupt() -> None:
                console.print("[yellow]stopping after the field in hand (Ctrl-C again to abort)[/]")
                loop.remove_signal_handler(signal.SIGINT)
                scan.stop()

            loop.add_signal_handler(signal.SIGINT, first_interrupt)
        return await scan.run()

    return asyncio.run(main())


def scan(
    config: Annotated[Path, typer.Argument(help="Rig YAML, with an optional scan: section.")],
    out: Annotated[
        Path | None, typer.Option(help="New folder for the results (default: scan.out).")
    ] = None,
    resume: Annotated[
        Path | None, typer.Option(help="Finish a stopped or killed scan in this folder.")
    ] = None,
    checkpoint: Annotated[
        Path | None, typer.Option(help="Model checkpoint (default: the shipped model).")
    ] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda, cuda:1 ...")] = None,
) -> None:
    """Scan a whole chip: find every monolayer and bilayer flake and write the flake map."""
    from drivers.configfile import ConfigError
    from drivers.micromanager import RigCheckError
    from drivers.rigs import open_rig

    from .journal import JournalError
    from .scan_config import load_scan_config

    if out is not None and resume is not None:
        raise fail("give --out for a new scan or --resume for a stopped one, not both")
    try:
        cfg = load_scan_config(config)
    except ConfigError as e:
        raise fail(str(e)) from None
    model_update: dict[str, Any] = {}
    if checkpoint is not None:
        model_update["checkpoint"] = checkpoint
    if device is not None:
        model_update["device"] = device
    if model_update:
        cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update=model_update)})
    folder = resume or out or cfg.out or default_out(config)

    bar = Progress(
        TextColumn("[bold]{task.fields[phase]:<9}"),
        BarColumn(bar_width=24),
        MofNCompleteColumn(),
        TextColumn("fields {task.fields[rate]} {task.fields[flakes]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
    )
    task = bar.add_task("scan", total=None, phase="opening rig", flakes="", rate="")
    clock: dict[str, float] = {}

    def on_progress(p: ScanProgress) -> None:
        import time

        now = time.monotonic()
        scanned = p.fields_done + p.fields_failed - p.fields_resumed
        clock.setdefault("t0", now)
        if p.phase != "scanning" or scanned == 0:
            clock["t0"] = now if scanned == 0 else clock["t0"]
        rate = scanned / (now - clock["t0"]) if now > clock["t0"] and scanned else 0.0
        failed = f" [red]{p.fields_failed} failed[/]" if p.fields_failed else ""
        bar.update(
            task,
            total=p.fields_total,
            completed=p.fields_done + p.fields_failed,
            phase=p.phase,
            # pieces per tile until the merge at the end: a flake over two tiles counts twice
            flakes=f"1L {p.monolayers} 2L {p.bilayers}{failed}",
            rate=f"{rate:.1f}/s",
        )

    try:
        with bar, open_rig(config) as core:
            result = run_scan(
                core,
                cfg,
                folder,
                limits=rig_limits(config, core),
                resume=resume is not None,
                on_progress=on_progress,
                rig_info={"rig": str(config), "objective": _objective(core)},
                stop_on_sigint=True,
            )
    except (ConfigError, RigCheckError, ScanError, JournalError, FileNotFoundError) as e:
        raise fail(str(e)) from None
    except RuntimeError as e:  # a device failed to start, or the .cfg would not load
        raise fail(str(e)) from None
    _print_summary(result, config)


def _objective(core: CMMCorePlus) -> str:
    return core.getCurrentPixelSizeConfig() or ""


def _print_summary(result: ScanResult, config: Path) -> None:
    p = result.progress
    counts = {"monolayer": 0, "bilayer": 0}
    for r in result.flakes:
        counts[r["layer_class"]] += 1
    table = Table(title=f"scan: {result.out}", show_header=False)
    table.add_row("fields", f"{p.fields_done} done, {p.fields_failed} failed of {p.fields_total}")
    table.add_row("flakes", f"{counts['monolayer']} monolayer, {counts['bilayer']} bilayer")
    table.add_row("time", f"{result.wall_s:.1f} s")
    out = result.out
    if p.phase == "stopped":
        table.add_row("stopped", f"resume with: flakescan scan {config} --resume {out}")
    else:
        table.add_row("flake map", str(out / "flakes.json"))
        table.add_row("overview", str(out / "overview.png"))
        table.add_row("tiles, masks", str(out / "scan.zarr"))
    console.print(table)
    for f in result.failed_fields:
        console.print(
            f"[red]failed field[/] {f['name']} at ({f['x_um']:.1f}, {f['y_um']:.1f}) µm: "
            f"{f['error']}"
        )
    if result.score is not None:
        console.print("[bold]score against the simulated world's truth[/] (truth.json):")
        console.print(result.score.format_table())
