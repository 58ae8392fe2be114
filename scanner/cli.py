"""The `flakescan` command line (typer + rich)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from . import model_commands, scan_command
from .console import console, fail
from .logs import configure_logging

app = typer.Typer(
    help="Find monolayer and bilayer flakes on a chip with a motorised microscope and a U-Net.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)


@app.callback()
def main(
    log_level: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING or ERROR.")] = "INFO",
    log_json: Annotated[
        Path | None, typer.Option(help="Also write logs as JSON lines to this file.")
    ] = None,
) -> None:
    try:
        configure_logging(log_level, log_json)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--log-level") from None


@app.command()
def synth(
    config: Annotated[Path, typer.Option(help="Simulated-rig YAML (e.g. configs/simulated.yaml).")],
    out: Annotated[Path, typer.Option(help="New dataset folder to write (must not hold files).")],
    count: Annotated[int, typer.Option(min=1, help="Number of 512×512 tiles.")],
    seed: Annotated[int, typer.Option(help="Seed: the same seed writes the same dataset.")] = 0,
    tiles_per_chip: Annotated[
        int, typer.Option(min=1, help="Tiles taken on each randomised chip before a new one.")
    ] = 8,
    rig_look: Annotated[
        bool,
        typer.Option(
            "--rig-look",
            help="Keep the config's own lamp, optics and camera on every chip instead of "
            "randomising them: tiles that look like a scan of that rig.",
        ),
    ] = False,
    cvd_share: Annotated[
        float,
        typer.Option(
            min=0.0,
            max=1.0,
            help="Share of randomised chips grown by CVD (triangles merging into films) "
            "instead of exfoliated.",
        ),
    ] = 0.0,
    transparent_share: Annotated[
        float,
        typer.Option(
            min=0.0,
            max=1.0,
            help="Share of randomised chips that are CVD MoS2 on quartz or sapphire (dark "
            "background, layers brighter than it) instead of on SiO2/Si.",
        ),
    ] = 0.0,
    glare_max: Annotated[
        float,
        typer.Option(
            min=0.0,
            max=1.0,
            help="Veiling glare of randomised chips, uniform up to this fraction of the mean "
            "light (0.4 matches the real set's layer contrasts); 0: none.",
        ),
    ] = 0.0,
) -> None:
    """Write a synthetic dataset folder (images/, masks/, dataset.yaml) from the simulated rig."""
    from drivers.configfile import ConfigError
    from drivers.simulated.config import load_simulated_config
    from drivers.simulated.synth import write_synthetic_dataset

    try:
        cfg = load_simulated_config(config)
    except ConfigError as e:
        raise fail(str(e)) from None
    if out.exists() and any(out.iterdir()):
        raise fail(f"{out} already exists and is not empty; choose a new folder")
    if rig_look and (cvd_share or transparent_share or glare_max):
        raise fail(
            "--cvd-share, --transparent-share and --glare-max make randomised chips; --rig-look "
            "keeps the rig's own chip and optics"
        )
    with Progress(
        TextColumn("[bold]synth"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("tiles"),
        TimeRemainingColumn(),
        console=console,
    ) as bar:
        task = bar.add_task("synth", total=count)
        write_synthetic_dataset(
            cfg,
            out,
            count,
            seed,
            tiles_per_chip=tiles_per_chip,
            progress=lambda n: bar.advance(task, n),
            randomise=not rig_look,
            cvd_share=cvd_share,
            transparent_share=transparent_share,
            glare_max=glare_max,
        )
    look = " in the rig's own look" if rig_look else ""
    console.print(f"wrote {count} tiles{look} to [bold]{out}[/]")


@app.command()
def check(
    config: Annotated[Path, typer.Argument(help="Rig YAML: simulated or micromanager.")],
) -> None:
    """Open the rig, check it has everything a scan needs, and print what it found."""
    from drivers.configfile import ConfigError
    from drivers.micromanager import RigCheckError
    from drivers.rigs import open_rig

    try:
        with open_rig(config) as core:
            table = Table(title=f"rig: {config}")
            table.add_column("role")
            table.add_column("device")
            table.add_column("state")
            x, y = core.getXYPosition()
            table.add_row("XY stage", core.getXYStageDevice(), f"x {x:.1f} µm, y {y:.1f} µm")
            table.add_row("focus drive", core.getFocusDevice(), f"z {core.getPosition():.2f} µm")
            cam = core.getCameraDevice()
            table.add_row(
                "camera",
                cam,
                f"{core.getImageWidth()}×{core.getImageHeight()}, "
                f"{core.getNumberOfComponents()} components, {core.getExposure():g} ms",
            )
            table.add_row(
                "shutter", core.getShutterDevice(), "auto" if core.getAutoShutter() else ""
            )
            table.add_row(
                "pixel size", core.getCurrentPixelSizeConfig(), f"{core.getPixelSizeUm():.4f} µm"
            )
            console.print(table)
    except (ConfigError, RigCheckError, FileNotFoundError, RuntimeError) as e:
        # RuntimeError: a device failed to start (RigStartError) or the .cfg would not load
        raise fail(str(e)) from None
    console.print("[green]rig ready[/]")


app.command()(scan_command.scan)
app.command()(model_commands.train)
app.command()(model_commands.evaluate)
app.command()(model_commands.cv)


if __name__ == "__main__":
    app()
