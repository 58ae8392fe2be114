"""Dataset folders: reading, label mapping, clear errors, sample ids and folds split by sample."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from model.data import (
    CLASS_NAMES,
    DatasetError,
    Sample,
    kfold_by_sample,
    load_dataset,
    preload,
    read_image,
    sample_id,
)

REAL = Path("/work/shared/data/mos2-2dtlk")
REAL_LABELS = {0: "other", 1: "monolayer", 2: "bilayer", 3: "other"}


def write_folder(
    root: Path,
    masks: dict[str, np.ndarray],
    label_values: dict | None = None,
    extra_images: tuple[str, ...] = (),
    **yaml_keys: object,
) -> Path:
    """A dataset folder with a random JPEG per mask (and image-only stems in `extra_images`)."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    for stem, mask in masks.items():
        image = rng.integers(0, 256, (*mask.shape, 3), dtype=np.uint8)
        Image.fromarray(image).save(root / "images" / f"{stem}.jpg")
        Image.fromarray(mask.astype(np.uint8)).save(root / "masks" / f"{stem}.png")
    for stem in extra_images:
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(root / "images" / f"{stem}.png")
    meta = {"label_values": REAL_LABELS if label_values is None else label_values, **yaml_keys}
    (root / "dataset.yaml").write_text(yaml.safe_dump(meta))
    return root


def raw_mask() -> np.ndarray:
    return np.array([[0, 1, 2, 3], [3, 2, 1, 0], [0, 0, 1, 1]], dtype=np.uint8)


def test_reads_images_and_maps_label_values(tmp_path: Path) -> None:
    ds = write_folder(tmp_path / "ds", {"train-4_3": raw_mask(), "val-9_1": raw_mask()})
    data = load_dataset(ds)
    assert [s.stem for s in data.samples] == ["train-4_3", "val-9_1"]
    assert [s.sample_id for s in data.samples] == ["4", "9"]
    image, mask = data.read_pair(data[0])
    assert image.shape == (3, 4, 3) and image.dtype == np.uint8
    assert mask.dtype == np.uint8
    # 3 (thicker) is "other" in label_values, so it reads as class 0.
    np.testing.assert_array_equal(mask, [[0, 1, 2, 0], [0, 2, 1, 0], [0, 0, 1, 1]])
    assert len(preload(data)) == 2
    assert CLASS_NAMES == ("other", "monolayer", "bilayer")


def test_globs_from_dataset_yaml_and_grey_png_images(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    (root / "pictures").mkdir(parents=True)
    (root / "labels").mkdir()
    Image.fromarray(np.full((5, 6), 40, np.uint8)).save(root / "pictures" / "a_1.png")
    Image.fromarray(np.ones((5, 6), np.uint8) * 7).save(root / "labels" / "a_1.png")
    (root / "dataset.yaml").write_text(
        yaml.safe_dump(
            {
                "image_glob": "pictures/*.png",
                "mask_glob": "labels/*.png",
                "label_values": {7: "bilayer"},
            }
        )
    )
    data = load_dataset(root)
    image, mask = data.read_pair(data[0])
    assert image.shape == (5, 6, 3) and (image == 40).all()
    assert (mask == 2).all()
    assert read_image(data[0].image_path).shape == (5, 6, 3)


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_dataset(tmp_path / "nowhere")


def test_missing_dataset_yaml(tmp_path: Path) -> None:
    ds = write_folder(tmp_path / "ds", {"a": raw_mask()})
    (ds / "dataset.yaml").unlink()
    with pytest.raises(FileNotFoundError, match=r"no dataset\.yaml"):
        load_dataset(ds)


def test_image_without_mask_is_named(tmp_path: Path) -> None:
    ds = write_folder(tmp_path / "ds", {"a": raw_mask()}, extra_images=("lonely_3",))
    with pytest.raises(DatasetError, match=r"without a mask.*lonely_3"):
        load_dataset(ds)


def test_empty_dataset(tmp_path: Path) -> None:
    ds = write_folder(tmp_path / "ds", {})
    with pytest.raises(DatasetError, match="no images"):
        load_dataset(ds)


def test_label_values_naming_unknown_class(tmp_path: Path) -> None:
    ds = write_folder(tmp_path / "ds", {"a": raw_mask()}, {0: "other", 1: "trilayer"})
    with pytest.raises(DatasetError, match="unknown class 'trilayer'"):
        load_dataset(ds)


def test_label_values_required(tmp_path: Path) -> None:
    ds = write_folder(tmp_path / "ds", {"a": raw_mask()})
    (ds / "dataset.yaml").write_text("material: MoS2\n")
    with pytest.raises(DatasetError, match="label_values"):
        load_dataset(ds)


def test_unmapped_mask_value_names_file_and_value(tmp_path: Path) -> None:
    ds = write_folder(
        tmp_path / "ds", {"odd": raw_mask()}, {0: "other", 1: "monolayer", 2: "bilayer"}
    )
    data = load_dataset(ds)
    with pytest.raises(DatasetError, match=r"odd\.png.*\[3\]"):
        data.read_mask(data[0])


def test_rgb_mask_and_size_mismatch_are_refused(tmp_path: Path) -> None:
    ds = write_folder(tmp_path / "ds", {"a": raw_mask(), "b": raw_mask()})
    Image.fromarray(np.zeros((3, 4, 3), np.uint8)).save(ds / "masks" / "a.png")
    Image.fromarray(np.zeros((2, 2), np.uint8)).save(ds / "masks" / "b.png")
    data = load_dataset(ds)
    with pytest.raises(DatasetError, match="8-bit single-channel"):
        data.read_mask(data[0])
    with pytest.raises(DatasetError, match=r"b: image is 4×3 px but its mask b\.png is 2×2 px"):
        data.read_pair(data[1])


@pytest.mark.parametrize(
    ("stem", "expected"),
    [
        ("train-18_10", "18"),
        ("test-image_81_11", "image_81"),
        ("train-1", "1"),
        ("val-100", "100"),
        ("train-image_76_3", "image_76"),
        ("synth-00012", "synth-00012"),
    ],
)
def test_sample_id(stem: str, expected: str) -> None:
    assert sample_id(stem) == expected


def samples_from(stems: list[str]) -> list[Sample]:
    return [Sample(s, Path(f"{s}.jpg"), Path(f"{s}.png"), sample_id(s)) for s in stems]


def check_folds(samples: list[Sample], k: int, seed: int) -> list[tuple[list[int], list[int]]]:
    folds = kfold_by_sample(samples, k=k, seed=seed)
    assert len(folds) == k
    validated = Counter(i for _, val in folds for i in val)
    assert validated == Counter(range(len(samples)))  # every image validated exactly once
    for train, val in folds:
        assert sorted(train + val) == list(range(len(samples)))
        train_ids = {samples[i].sample_id for i in train}
        assert not train_ids & {samples[i].sample_id for i in val}  # no sample on both sides
    sizes = [len(val) for _, val in folds]
    biggest = max(Counter(s.sample_id for s in samples).values())
    assert max(sizes) - min(sizes) <= biggest  # greedy balance is within one group
    return folds


def test_kfold_keeps_samples_together_and_is_deterministic() -> None:
    rng = np.random.default_rng(3)
    stems = [
        f"{rng.choice(['train', 'val', 'test'])}-{g}_{f}"
        for g in range(20)
        for f in range(int(rng.integers(1, 7)))
    ]
    samples = samples_from(stems)
    folds = check_folds(samples, k=3, seed=0)
    assert folds == kfold_by_sample(samples, k=3, seed=0)
    assert any(check_folds(samples, 3, s) != folds for s in range(1, 6))


def test_kfold_needs_enough_samples() -> None:
    with pytest.raises(DatasetError, match="2 distinct sample"):
        kfold_by_sample(samples_from(["a_1", "a_2", "b_1"]), k=3)


@pytest.mark.skipif(not REAL.is_dir(), reason="real MoS2 set not present")
def test_real_set_stems_and_folds() -> None:
    data = load_dataset(REAL)
    assert len(data) == 109
    ids = {s.sample_id for s in data.samples}
    assert {"18", "image_81", "1", "100"} <= ids
    # test-100 and val-100 name the same sample and must land in the same fold.
    folds = check_folds(data.samples, k=3, seed=0)
    for _, val in folds:
        assert 30 <= len(val) <= 42  # 109 images / 3, within one sample (≤ 6)
    mask = data.read_mask(data.samples[0])
    assert mask.max() <= 2


def test_split_other_gives_each_raw_value_of_other_its_own_target(tmp_path: Path) -> None:
    labels = {0: "other", 1: "monolayer", 2: "bilayer", 3: "other", 7: "other"}
    raw = np.array([[0, 1, 2, 3], [7, 3, 0, 1]], np.uint8)
    data = load_dataset(write_folder(tmp_path / "ds", {"a-1_1": raw}, label_values=labels))
    assert data.config.other_values == [0, 3, 7] and data.config.other_outputs == 3
    ((_, plain),) = preload(data)
    ((_, split),) = preload(data, split_other=True)
    np.testing.assert_array_equal(plain, [[0, 1, 2, 0], [0, 0, 0, 1]])
    # the lowest raw value of `other` stays 0; the next ones follow the three classes
    np.testing.assert_array_equal(split, [[0, 1, 2, 3], [4, 3, 0, 1]])
    three = load_dataset(
        write_folder(
            tmp_path / "three", {"b-1_1": raw % 3}, label_values=dict(enumerate(CLASS_NAMES))
        )
    )
    assert three.config.other_outputs == 1
    np.testing.assert_array_equal(preload(three, split_other=True)[0][1], raw % 3)
