"""Reading YAML config files with errors that name the file and the field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError


class ConfigError(ValueError):
    """A config file that cannot be used, with a message naming the file and the field."""


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """The top-level mapping of a YAML file (an empty file is an empty mapping)."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    return raw


#: the top-level section of a rig YAML that belongs to the scanner, not to the rig
SCAN_SECTION = "scan"


def read_rig_mapping(path: str | Path) -> dict[str, Any]:
    """A rig YAML's mapping without its `scan:` section (how to scan is not the rig's business).

    One file can then describe both the microscope and how to scan a chip on it, which is what
    `flakescan scan CONFIG` reads.
    """
    raw = read_yaml_mapping(path)
    raw.pop(SCAN_SECTION, None)
    return raw


def format_validation_error(e: ValidationError) -> str:
    """One line per problem, each naming the field path, e.g. `camera.exposure_ms: ...`."""
    lines = []
    for err in e.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        lines.append(f"{where}: {err['msg']}")
    return "invalid config:\n  " + "\n  ".join(lines)
