"""ChipReference: which tiles are read against the chip's oxide colour instead of their own."""

from __future__ import annotations

import numpy as np
import pytest

from scanner.chip_reference import ChipReference

OXIDE = np.array([0.68, 0.59, 0.72], np.float32)
FILM = OXIDE * np.array([0.88, 0.90, 1.02], np.float32)  # a monolayer: -12 % in red
STAGE = np.array([0.23, 0.23, 0.23], np.float32)  # the insert beyond the chip's edge


def _oxide_tiles(n: int, seed: int = 0) -> np.ndarray:
    """Oxide references with ±1 % of tile-to-tile scatter."""
    return OXIDE * (1 + np.random.default_rng(seed).uniform(-0.01, 0.01, (n, 3))).astype(np.float32)


def test_film_tiles_take_the_chips_oxide_and_the_rest_keep_their_own() -> None:
    chip = ChipReference(warmup=4)
    own = np.vstack([_oxide_tiles(6), FILM, _oxide_tiles(1, seed=1), STAGE])
    chosen, replaced = chip.choose(own)
    assert replaced.tolist() == [False] * 6 + [True, False, False]
    np.testing.assert_array_equal(chosen[~replaced], own[~replaced])  # bit for bit
    np.testing.assert_allclose(chosen[6], np.median(own[:6], axis=0), rtol=1e-6)
    assert chip.replaced == 1
    # neither the film nor the stage moved the estimate
    np.testing.assert_allclose(chip.colour, np.median(own[[0, 1, 2, 3, 4, 5, 7]], axis=0))


def test_before_warmup_every_tile_keeps_its_own() -> None:
    chip = ChipReference(warmup=8)
    _, replaced = chip.choose(np.vstack([FILM, _oxide_tiles(3)]))
    assert not replaced.any() and chip.colour is None


def test_seeds_give_an_estimate_before_the_first_tile_and_drop_films() -> None:
    chip = ChipReference(warmup=8)
    taken = chip.seed(np.vstack([_oxide_tiles(12), FILM, FILM, STAGE]))
    assert taken == 12
    _, replaced = chip.choose(np.vstack([FILM, _oxide_tiles(1)]))
    assert replaced.tolist() == [True, False]  # the scan's very first tile is judged


def test_a_large_seed_is_sampled_over_all_of_it() -> None:
    # 4 frames' worth of tiles, each frame a little brighter: a memory of 8 keeps tiles from
    # every frame, so the estimate is the chip's middle, not the last frame's colour.
    chip = ChipReference(warmup=4, memory=8)
    frames = np.repeat(np.float32([0.98, 0.99, 1.01, 1.02]), 16)[:, None] * OXIDE
    assert chip.seed(frames) == 64
    np.testing.assert_allclose(chip.colour, OXIDE, rtol=0.011)
    assert chip.colour[0] < OXIDE[0] * 1.015  # not the last frame's 1.02


def test_slow_drift_is_followed() -> None:
    # 10 % across the scan, 0.1 % a tile: every step is within the tolerance of the recent
    # median, so no tile is replaced and the estimate ends near the last colour.
    chip = ChipReference(warmup=4, memory=16)
    drift = OXIDE * np.linspace(1.0, 1.1, 100, dtype=np.float32)[:, None]
    _, replaced = chip.choose(drift)
    assert not replaced.any()
    np.testing.assert_allclose(chip.colour, drift[-8:].mean(axis=0), rtol=0.01)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tolerance": 0.0}, "tolerance"),
        ({"tolerance": 0.6, "beyond": 0.5}, "tolerance < beyond"),
        ({"warmup": 0}, "warmup"),
        ({"warmup": 9, "memory": 8}, "warmup <= memory"),
    ],
)
def test_bad_settings_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ChipReference(**kwargs)


def test_a_black_tile_keeps_its_own_and_does_not_count() -> None:
    # A dead channel or a black corner gives a 0 (or, from a broken frame, NaN) reference:
    # the scan must go on, and the estimate must not move.
    chip = ChipReference(warmup=2)
    chip.seed(_oxide_tiles(4))
    before = chip.colour
    dead = np.array([[0.0, 0.59, 0.72], [np.nan, np.nan, np.nan]], np.float32)
    chosen, replaced = chip.choose(dead)
    assert not replaced.any()
    np.testing.assert_array_equal(chosen, dead)
    np.testing.assert_array_equal(chip.colour, before)


def test_a_lasting_change_of_lamp_or_exposure_is_taken_over() -> None:
    # Exposure 10 % up for good: the next `memory` tiles are read against the old colour (they
    # could be a film), then their colour becomes the chip's and no tile is replaced after.
    chip = ChipReference(warmup=4, memory=16)
    chip.seed(_oxide_tiles(8))
    brighter = _oxide_tiles(40, seed=3) * np.float32(1.1)
    _, replaced = chip.choose(brighter)
    assert replaced[:16].all() and not replaced[16:].any()
    np.testing.assert_allclose(chip.colour, OXIDE * 1.1, rtol=0.01)


def test_a_film_is_not_taken_for_a_lamp_change_unless_it_fills_memory() -> None:
    chip = ChipReference(warmup=4, memory=16)
    chip.seed(_oxide_tiles(8))
    _, replaced = chip.choose(np.vstack([np.tile(FILM, (15, 1)), _oxide_tiles(1), FILM[None]]))
    assert replaced.tolist() == [True] * 15 + [False, True]  # the oxide tile broke the run


def test_a_resumed_scan_starts_from_the_journalled_colour() -> None:
    chip = ChipReference(warmup=8)
    chip.start_from(OXIDE.tolist())
    np.testing.assert_allclose(chip.colour, OXIDE)
    assert chip.choose(FILM[None])[1].tolist() == [True]


def test_references_must_be_a_table() -> None:
    with pytest.raises(ValueError, match="N×C"):
        ChipReference().choose(np.ones(3))
