"""Open whichever rig a YAML config describes: `rig: simulated` or `rig: micromanager`."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pymmcore_plus import CMMCorePlus

from .configfile import ConfigError, read_yaml_mapping
from .simulated.config import load_simulated_config
from .unicore import closing_core

RIG_KINDS = ("simulated", "micromanager")


def rig_kind(path: str | Path) -> str:
    raw = read_yaml_mapping(path)
    kind = raw.get("rig", "simulated")
    if kind not in RIG_KINDS:
        raise ConfigError(f"{path}: rig must be one of {', '.join(RIG_KINDS)}, got {kind!r}")
    return kind


@contextmanager
def open_rig(path: str | Path) -> Iterator[CMMCorePlus]:
    """A ready, checked core for the config at `path`; always disposed of on exit."""
    if rig_kind(path) == "simulated":
        from .simulated.rig import create_simulated_core

        core: CMMCorePlus = create_simulated_core(load_simulated_config(path))
    else:
        from .micromanager import load_rig_config, open_micromanager_rig

        core = open_micromanager_rig(load_rig_config(path))
    with closing_core(core) as ready:
        yield ready
