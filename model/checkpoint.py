"""One ``.pt`` file per trained model: the weights plus everything needed to rebuild and trust them.

The file is ``torch.save`` of ``{"format_version": int, "meta": {...}, "state_dict": {...}}``.
``meta`` holds only JSON types so it loads under ``torch.load(weights_only=True)``, which never runs
pickled code: a checkpoint from a colleague or the internet cannot execute anything.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import PydanticSerializationError

from model.data import CLASS_NAMES
from model.unet import UNet, UNetConfig, build_unet

FORMAT_VERSION = 1
NORMALISATION: dict[str, float] = {"scale": 1 / 255}
#: The shipped default model (trained on synthetic micrographs only; docs/model_card.md).
DEFAULT_CHECKPOINT: Path = Path(__file__).resolve().parent / "weights" / "default.pt"


class CheckpointError(ValueError):
    """The file exists but is not a checkpoint this version of flakescan can load."""


class Checkpoint(BaseModel):
    """The metadata saved beside the weights."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format_version: int = FORMAT_VERSION
    architecture: Literal["unet"] = "unet"
    config: UNetConfig
    class_names: tuple[str, ...] = CLASS_NAMES
    normalisation: dict[str, float] = Field(
        default_factory=lambda: dict(NORMALISATION),
        description="uint8 pixel × scale = network input",
    )
    training: dict[str, Any] = Field(
        default_factory=dict,
        description="provenance: dataset paths and sources, counts, seed, epochs, metrics",
    )
    created: datetime = Field(default_factory=lambda: datetime.now(UTC))
    torch_version: str = torch.__version__

    @model_validator(mode="after")
    def _one_name_per_class(self) -> Checkpoint:
        if len(self.class_names) != self.config.classes:
            raise ValueError(
                f"{len(self.class_names)} class names {self.class_names} for a model with "
                f"{self.config.classes} classes"
            )
        return self


def save_checkpoint(
    path: str | os.PathLike[str],
    model: torch.nn.Module,
    config: UNetConfig,
    *,
    class_names: Sequence[str] = CLASS_NAMES,
    normalisation: Mapping[str, float] = NORMALISATION,
    training: Mapping[str, Any] | None = None,
) -> Checkpoint:
    """Write the model's weights and metadata to ``path``, atomically; return the metadata."""
    model = getattr(model, "_orig_mod", model)  # a torch.compile wrapper prefixes every key
    if isinstance(model, UNet) and model.config != config:
        raise ValueError(f"model was built from {model.config!r}, not the given {config!r}")
    meta = Checkpoint(
        config=config,
        class_names=tuple(class_names),
        normalisation=dict(normalisation),
        training=dict(training or {}),
    )
    try:
        # JSON types only, so that weights_only loading accepts them (numpy scalars would not be).
        meta_json = meta.model_dump(mode="json")
    except PydanticSerializationError as exc:
        raise ValueError(f"checkpoint metadata is not JSON-able: {exc}") from exc
    state_dict = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    _check_state_dict(state_dict, config, source="the model")
    payload = {"format_version": FORMAT_VERSION, "meta": meta_json, "state_dict": state_dict}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A reader (the scanner picking up a new model) never sees half a file.
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return Checkpoint.model_validate(meta_json)  # as a later load will see it


def load_checkpoint(
    path: str | os.PathLike[str], device: str | torch.device = "cpu"
) -> tuple[UNet, Checkpoint]:
    """The model (in eval mode, on ``device``) and its metadata."""
    meta, state_dict = read_checkpoint(path)
    model = build_unet(meta.config)
    model.load_state_dict(state_dict)
    return model.to(device).eval(), meta


def read_checkpoint(path: str | os.PathLike[str]) -> tuple[Checkpoint, dict[str, torch.Tensor]]:
    """Metadata and raw state dict, checked against each other, without building a model."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path} is not a flakescan checkpoint (torch.load: {exc})") from exc
    if not isinstance(payload, dict) or not {"format_version", "meta", "state_dict"} <= set(
        payload
    ):
        raise CheckpointError(
            f"{path} is not a flakescan checkpoint: expected a dict with format_version, meta "
            f"and state_dict"
        )
    version = payload["format_version"]
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format version {version!r}; this flakescan reads version "
            f"{FORMAT_VERSION}"
        )
    try:
        meta = Checkpoint.model_validate(payload["meta"])
    except ValidationError as exc:
        raise CheckpointError(f"{path} has invalid metadata: {exc}") from exc
    state_dict = payload["state_dict"]
    _check_state_dict(state_dict, meta.config, source=str(path))
    return meta, state_dict


def _check_state_dict(state_dict: Mapping[str, Any], config: UNetConfig, *, source: str) -> None:
    # Built on the meta device: the expected shapes without allocating the paper net's 124 MB.
    with torch.device("meta"):
        expected = build_unet(config).state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong = [
        f"{k}: {tuple(state_dict[k].shape)} instead of {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {_few(missing)}")
        if unexpected:
            parts.append(f"unexpected {_few(unexpected)}")
        if wrong:
            parts.append(f"wrong shapes {_few(wrong)}")
        raise CheckpointError(f"weights from {source} do not match {config!r}: " + "; ".join(parts))


def _few(items: list[str], n: int = 5) -> str:
    more = f" and {len(items) - n} more" if len(items) > n else ""
    return ", ".join(items[:n]) + more


__all__ = [
    "CLASS_NAMES",
    "DEFAULT_CHECKPOINT",
    "FORMAT_VERSION",
    "NORMALISATION",
    "Checkpoint",
    "CheckpointError",
    "load_checkpoint",
    "read_checkpoint",
    "save_checkpoint",
]
