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


@pytest.mark.parametrize(
    "own", [np.zeros((2, 3)), np.full((2, 3), np.nan), np.ones(3)], ids=["zero", "nan", "1d"]
)
def test_bad_references_are_refused(own: np.ndarray) -> None:
    with pytest.raises(ValueError, match="positive colours"):
        ChipReference().choose(own)
