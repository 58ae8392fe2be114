"""Augmentations: geometry moves tile and mask together; colour changes touch the tile only."""

from __future__ import annotations

import numpy as np
import pytest

from model.augment import (
    AUGMENT_SETS,
    Augmenter,
    augment_set,
    grayscale,
    layer_colour,
    random_crop,
)


def _pair(h: int = 40, w: int = 60) -> tuple[np.ndarray, np.ndarray]:
    """A tile whose red channel encodes the mask, so alignment can be checked after any move."""
    rng = np.random.default_rng(0)
    mask = rng.integers(0, 3, size=(h, w)).astype(np.uint8)
    image = np.zeros((h, w, 3), dtype=np.uint8)
    image[..., 0] = mask * 100
    image[..., 1] = rng.integers(0, 255, size=(h, w))
    return image, mask


@pytest.mark.parametrize("seed", range(6))
def test_geometry_keeps_tile_and_mask_aligned(seed: int) -> None:
    image, mask = _pair()
    aug = Augmenter(crop=32, rng=np.random.default_rng(seed))
    out, out_mask = aug(image, mask)
    assert out.shape == (32, 32, 3) and out.dtype == np.float32
    assert out_mask.shape == (32, 32) and out_mask.dtype == np.uint8
    assert np.array_equal(np.round(out[..., 0] * 255 / 100).astype(np.uint8), out_mask)


def test_small_images_are_padded_up_to_the_crop() -> None:
    image, mask = _pair(20, 30)
    crop_img, crop_mask = random_crop(image, mask, 48, np.random.default_rng(1))
    assert crop_img.shape == (48, 48, 3) and crop_mask.shape == (48, 48)
    assert np.array_equal(crop_img[..., 0] // 100, crop_mask)


def test_paper_table_sets_exist_and_unknown_is_refused() -> None:
    assert {"none", "grayscale", "contrast", "grayscale+contrast"} <= AUGMENT_SETS.keys()
    with pytest.raises(ValueError, match="unknown augmentation set"):
        augment_set("sepia")


def test_photometric_changes_leave_the_mask_alone() -> None:
    image, mask = _pair(64, 64)
    plain = Augmenter(crop=64, rng=np.random.default_rng(3))
    full = Augmenter(crop=64, photometric=augment_set("full"), p=1.0, rng=np.random.default_rng(3))
    a, ma = plain(image, mask)
    b, mb = full(image, mask)
    assert np.array_equal(ma, mb)
    assert not np.allclose(a, b)
    assert b.min() >= 0 and b.max() <= 1


def test_grayscale_makes_channels_equal() -> None:
    img = np.random.default_rng(0).random((8, 8, 3)).astype(np.float32)
    g = grayscale(img, np.random.default_rng(0))
    assert np.allclose(g[..., 0], g[..., 1]) and np.allclose(g[..., 1], g[..., 2])


def test_look_set_keeps_the_optical_contrast_of_a_flake() -> None:
    """Gains keep flake / substrate per channel; `full`'s contrast stretch does not."""
    image = np.full((64, 64, 3), (120, 100, 160), np.uint8)
    image[16:48, 16:48] = (108, 95, 150)  # a flake ~10 % darker in red than its substrate
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 1

    def red_contrast(photometric: tuple, seed: int) -> float:
        aug = Augmenter(crop=64, photometric=photometric, p=1.0, rng=np.random.default_rng(seed))
        out, m = aug(image, mask)
        # no blur or noise here: they smear edges and add spread but keep the means
        return float(out[m == 1, 0].mean() / out[m == 0, 0].mean() - 1)

    truth = 108 / 120 - 1
    for seed in range(5):
        assert red_contrast(("color", "brightness"), seed) == pytest.approx(truth, abs=1e-3)
    stretched = [red_contrast(("contrast",), seed) for seed in range(5)]
    assert max(abs(c - truth) for c in stretched) > 0.01
    assert augment_set("look") == ("color", "brightness", "blur", "noise")


def _layers_tile() -> tuple[np.ndarray, np.ndarray]:
    """Substrate with a monolayer (red 10 % darker) holding a bilayer (red 20 % darker)."""
    image = np.full((64, 64, 3), (150, 140, 200), np.uint8)
    mask = np.zeros((64, 64), np.uint8)
    image[12:52, 12:52], mask[12:52, 12:52] = (135, 137, 190), 1
    image[24:40, 24:40], mask[24:40, 24:40] = (120, 141, 184), 2
    return image, mask


def test_layer_colour_redraws_layers_and_keeps_red_order_and_substrate() -> None:
    image, mask = _layers_tile()
    ref = image[0, 0].astype(np.float32) / 255

    def contrasts(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        aug = Augmenter(
            crop=64, photometric=("layer_colour",), p=1.0, rng=np.random.default_rng(seed)
        )
        out, m = aug(image, mask)
        far = out[m == 0][: 64 * 4]  # the first rows: substrate at least 4 px from any layer
        c = [np.median(out[m == k], axis=0) / ref - 1 for k in (1, 2)]
        return far, c[0], c[1]

    draws = [contrasts(seed) for seed in range(40)]
    for far, mono, bi in draws:
        assert np.allclose(far, ref, atol=1e-6)  # the substrate is the reference: untouched
        assert bi[0] < mono[0] < 0  # red: the bilayer stays darker than the monolayer
    mono_red = [mono[0] for _, mono, _ in draws]
    blue_order = [bi[2] < mono[2] for _, mono, bi in draws]
    assert max(mono_red) - min(mono_red) > 0.06  # the red contrast's scale is drawn
    assert 0 < sum(blue_order) < len(blue_order)  # blue's order between layers is not kept


def test_layer_colour_needs_substrate_in_view() -> None:
    image, mask = _layers_tile()
    full = np.ones_like(mask)
    x = image.astype(np.float32) / 255
    assert np.array_equal(layer_colour(x, full, np.random.default_rng(0)), x)
    assert augment_set("synthetic")[0] == "layer_colour"


def test_train_help_names_every_augmentation_set() -> None:
    # The CLI writes the names out so that `flakescan --help` need not import numpy and scipy;
    # this keeps that list and AUGMENT_SETS together.
    import re
    import typing

    from scanner import model_commands

    hints = typing.get_type_hints(model_commands.train, include_extras=True)
    help_text = hints["augment"].__metadata__[0].help
    assert set(re.findall(r"[a-z+]+", help_text)) - {"or"} == set(AUGMENT_SETS)
