"""Dataset folders (`images/`, `masks/`, `dataset.yaml`), read alike for real and synthetic data.

`dataset.yaml` maps raw mask values to the three classes the model knows (`label_values`), so a
set that labels thicker flakes 3 (the real MoS2 set) and one that never does (synthetic tiles) are
read alike. Folds are split by *sample*, not by image: several images of the real set are frames
of one sample, and putting them on both sides of a split leaks the answer into the score.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

CLASS_NAMES: tuple[str, str, str] = ("other", "monolayer", "bilayer")
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png"})
# 255 marks "not in label_values" in the lookup table; it can never be a class index.
_UNMAPPED = 255
_SPLIT_PREFIX = re.compile(r"^(train|val|test)-")
_FRAME_SUFFIX = re.compile(r"_\d+$")


class DatasetError(ValueError):
    """A dataset folder that exists but cannot be used as it is."""


class DatasetConfig(BaseModel):
    """The parts of `dataset.yaml` the model reads; other keys (provenance, notes) are kept."""

    model_config = ConfigDict(extra="allow", frozen=True)

    image_glob: str = "images/*"
    mask_glob: str = "masks/*.png"
    label_values: dict[int, str] = Field(min_length=1)

    @field_validator("label_values")
    @classmethod
    def _known_classes(cls, value: dict[int, str]) -> dict[int, str]:
        for raw, name in value.items():
            if not 0 <= raw <= 255:
                raise ValueError(f"raw mask value {raw} is not 8-bit (0..255)")
            if name not in CLASS_NAMES:
                raise ValueError(f"value {raw} names unknown class {name!r}; use {CLASS_NAMES}")
        return value

    def label_lut(self, split_other: bool = False) -> np.ndarray:
        """256-entry table: raw mask value -> class index, 255 where the value is not mapped.

        ``split_other``: the training targets of a net whose `other` is split (see
        ``other_outputs``): the lowest raw value mapped to `other` stays 0, the next ones
        become 3, 4, ... in raw-value order.
        """
        lut = np.full(256, _UNMAPPED, dtype=np.uint8)
        extra = len(CLASS_NAMES)
        for raw, name in self.label_values.items():
            lut[raw] = CLASS_NAMES.index(name)
        if split_other:
            for raw in self.other_values[1:]:
                lut[raw] = extra
                extra += 1
        return lut

    @property
    def other_values(self) -> list[int]:
        """The raw mask values mapped to `other`, lowest first."""
        return sorted(raw for raw, name in self.label_values.items() if name == "other")

    @property
    def other_outputs(self) -> int:
        """Outputs a net learning each raw value of `other` apart needs for it (at least 1).

        `other` is usually a mix: the real set maps bare substrate (0) and trilayer-and-thicker
        flakes (3) to it. Learnt as one class, thick flakes weigh as little as substrate in a
        class-weighted loss and come out as bilayer; learnt apart and summed at inference,
        they stay `other`.
        """
        return max(len(self.other_values), 1)


@dataclass(frozen=True)
class Sample:
    """One image and its mask; `sample_id` groups frames of the same physical sample."""

    stem: str
    image_path: Path
    mask_path: Path
    sample_id: str


@dataclass(frozen=True)
class Dataset:
    """A read dataset folder: its config and samples sorted by stem."""

    root: Path
    config: DatasetConfig
    samples: list[Sample]
    lut: np.ndarray = field(repr=False)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Sample:
        return self.samples[index]

    def read_mask(self, sample: Sample) -> np.ndarray:
        return read_mask(sample, self.lut)

    def read_pair(
        self, sample: Sample, lut: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Image (H×W×3 uint8) and class mask (H×W uint8, through ``lut``, default the
        dataset's), checked to be the same size."""
        image = read_image(sample)
        mask = read_mask(sample, self.lut if lut is None else lut)
        if image.shape[:2] != mask.shape:
            raise DatasetError(
                f"{sample.stem}: image is {image.shape[1]}×{image.shape[0]} px but its mask "
                f"{sample.mask_path.name} is {mask.shape[1]}×{mask.shape[0]} px"
            )
        return image, mask


def sample_id(stem: str) -> str:
    """The physical sample an image shows: `train-18_10` -> `18`, `test-image_81_11` -> `image_81`.

    The real set's rule: drop the split prefix, then the last `_N` frame number if there is one.
    """
    core = _SPLIT_PREFIX.sub("", stem)
    return _FRAME_SUFFIX.sub("", core) or core


def load_dataset(path: str | Path) -> Dataset:
    """Read a dataset folder's config and pair every image with its mask by stem."""
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder {root} does not exist")
    config = _read_config(root)
    images = _by_stem(root, config.image_glob, IMAGE_SUFFIXES, "image")
    masks = _by_stem(root, config.mask_glob, {".png"}, "mask")
    if not images:
        raise DatasetError(f"{root}: no images match {config.image_glob!r} (jpg or png)")
    orphans = sorted(set(images) - set(masks))
    if orphans:
        shown = ", ".join(orphans[:10]) + (
            f" and {len(orphans) - 10} more" if len(orphans) > 10 else ""
        )
        raise DatasetError(
            f"{root}: {len(orphans)} image(s) without a mask matching {config.mask_glob!r}: {shown}"
        )
    samples = [Sample(s, images[s], masks[s], sample_id(s)) for s in sorted(images)]
    return Dataset(root=root, config=config, samples=samples, lut=config.label_lut())


def read_image(sample: Sample | Path) -> np.ndarray:
    """H×W×3 uint8 RGB, whatever the file's mode (grey, palette, RGBA)."""
    path = sample.image_path if isinstance(sample, Sample) else Path(sample)
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def read_mask(sample: Sample, lut: np.ndarray) -> np.ndarray:
    """H×W uint8 class indices (0..2, more with `other` split), from raw values through `lut`."""
    with Image.open(sample.mask_path) as im:
        # Converting an RGB or 16-bit mask to 8-bit would silently invent label values.
        if im.mode not in ("L", "P"):
            raise DatasetError(
                f"{sample.mask_path}: mask must be 8-bit single-channel, not {im.mode}"
            )
        raw = np.asarray(im)
    mask = lut[raw]
    if (mask == _UNMAPPED).any():
        bad = sorted(int(v) for v in np.unique(raw[mask == _UNMAPPED]))
        raise DatasetError(
            f"{sample.mask_path}: raw value(s) {bad} are not in dataset.yaml label_values"
        )
    return mask


def preload(
    dataset: Dataset,
    indices: Sequence[int] | None = None,
    *,
    split_other: bool = False,
    level: bool = False,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Every (image, mask) pair in memory: the real set is ~110 images, ~170 MB decoded.

    ``split_other``: masks hold training targets with `other` split by raw value
    (``DatasetConfig.label_lut``), for a net with ``other_outputs`` > 1.
    ``level``: each image levelled by a plane through its substrate (`level_image`; left as
    it is where none can be fitted), as `evaluate` levels them for a net trained so.
    """
    chosen = range(len(dataset)) if indices is None else indices
    lut = dataset.config.label_lut(split_other=split_other)
    pairs = [dataset.read_pair(dataset.samples[i], lut) for i in chosen]
    if level:
        pairs = [(_levelled(image), mask) for image, mask in pairs]
    return pairs


def _levelled(image: np.ndarray) -> np.ndarray:
    from .illumination import level_image  # torch: only where levelling is asked for

    levelled = level_image(image)
    return image if levelled is None else levelled


def kfold_by_sample(
    samples: Sequence[Sample], k: int = 3, seed: int = 0
) -> list[tuple[list[int], list[int]]]:
    """`k` (train, val) index lists; a sample's images are all on one side of every split.

    Samples are shuffled by `seed`, then placed largest first into the fold with the fewest
    images so far, which balances folds by image count. Each image is validated exactly once.
    """
    if k < 2:
        raise ValueError(f"k must be at least 2, got {k}")
    groups: dict[str, list[int]] = defaultdict(list)
    for i, s in enumerate(samples):
        groups[s.sample_id].append(i)
    if len(groups) < k:
        raise DatasetError(f"{len(groups)} distinct sample(s) cannot fill {k} folds")
    # Sorting first makes the shuffle independent of input order and of string hashing.
    ids = sorted(groups)
    order = [ids[i] for i in np.random.default_rng(seed).permutation(len(ids))]
    order.sort(key=lambda g: len(groups[g]), reverse=True)  # stable: ties keep shuffled order
    folds: list[list[int]] = [[] for _ in range(k)]
    for g in order:
        smallest = min(range(k), key=lambda f: len(folds[f]))
        folds[smallest].extend(groups[g])
    every = range(len(samples))
    return [(sorted(set(every) - set(fold)), sorted(fold)) for fold in folds]


def _read_config(root: Path) -> DatasetConfig:
    meta_path = root / "dataset.yaml"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{root}: no dataset.yaml (it maps mask values to classes)")
    meta = yaml.safe_load(meta_path.read_text()) or {}
    if not isinstance(meta, dict):
        raise DatasetError(f"{meta_path}: expected a mapping, got {type(meta).__name__}")
    try:
        return DatasetConfig.model_validate(meta)
    except ValidationError as exc:
        raise DatasetError(f"{meta_path}: {exc}") from exc


def _by_stem(
    root: Path, pattern: str, suffixes: set[str] | frozenset[str], what: str
) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for p in sorted(root.glob(pattern)):
        if not p.is_file() or p.suffix.lower() not in suffixes:
            continue
        if p.stem in found:
            raise DatasetError(
                f"{root}: two {what} files share the stem {p.stem!r}: "
                f"{found[p.stem].name}, {p.name}"
            )
        found[p.stem] = p
    return found
