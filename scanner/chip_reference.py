"""The chip's oxide colour, as the contrast reference for tiles that show no oxide.

The model reads each tile as optical contrast against the bare oxide, and finds that oxide in
the tile itself (``model/unet/reference.py``). A tile that a CVD film (or a thick flake) fills
has no oxide in view: its own reference is the film, every pixel's contrast is ~0, and the film
reads as bare substrate. In a scan the oxide's colour is known from the tiles around it. So a
tile whose own reference differs from the chip's by about a film's contrast is read against the
chip's instead; every other tile keeps its own, which follows slow changes of oxide thickness
and lamp across the chip more closely. A tile that differs by far more shows neither oxide nor a
thin film (the stage beyond the chip's edge, a bulk crystal) and keeps its own too: against the
oxide, the stage's black would read as strong contrast.
"""

from __future__ import annotations

from collections import deque

import numpy as np
import structlog

log = structlog.get_logger("flakescan.chip_reference")


class ChipReference:
    """Running estimate of the oxide's colour from the tiles whose own reference agrees with it.

    ``tolerance``: largest relative difference, in any channel, between a tile's own reference
    and the chip's for the tile to keep its own (and to count towards the estimate). A monolayer
    on 90-300 nm oxide differs from it by 10-40 % in some channel; 6 nm of oxide drift across a
    chip by ~3 %. ``memory``: tiles the estimate is the median of, latest first, so it follows
    drift. ``warmup``: tiles the estimate needs before it is trusted: from ``seed`` (the scanner
    seeds it from the flat-field frames), or else the scan's first tiles, taken as they come
    (their median is still right when fewer than half of them are filled by a film).
    ``beyond``: a difference larger than this is no film on the oxide (the dark stage off the
    chip: ~70 %), and the tile keeps its own reference without counting towards the estimate.
    """

    def __init__(
        self, tolerance: float = 0.06, memory: int = 64, warmup: int = 8, beyond: float = 0.5
    ) -> None:
        if not 0 < tolerance < beyond:
            raise ValueError(f"need 0 < tolerance < beyond, got {tolerance} and {beyond}")
        if warmup < 1 or memory < warmup:
            raise ValueError(f"need 1 <= warmup <= memory, got warmup {warmup}, memory {memory}")
        self.tolerance, self.beyond = tolerance, beyond
        self.warmup = warmup
        self._accepted: deque[np.ndarray] = deque(maxlen=memory)
        #: own references of the tiles replaced in a row, latest last
        self._run: deque[np.ndarray] = deque(maxlen=memory)
        #: tiles read against the chip's reference so far
        self.replaced = 0

    @property
    def colour(self) -> np.ndarray | None:
        """The chip's oxide colour (per channel), or None until ``warmup`` tiles have agreed."""
        if len(self._accepted) < self.warmup:
            return None
        return np.median(np.stack(self._accepted), axis=0)

    def seed(self, own: np.ndarray) -> int:
        """Start the estimate from tiles spread over the chip before the scan (the flat-field
        frames), so the first tiles of the scan are judged too. Tiles that disagree with the
        seeds' median are left out. Returns how many were taken."""
        own = _checked(own)
        own = own[_usable(own)]
        if not len(own):
            return 0
        agree = own[np.abs(own / np.median(own, axis=0) - 1).max(axis=1) <= self.tolerance]
        # Evenly over all of them when there are more than the memory holds (a large camera
        # gives many tiles a frame): the seed stands for the whole chip, not its last frames.
        keep = np.linspace(0, len(agree) - 1, min(len(agree), self._accepted.maxlen or 1))
        self._accepted.extend(agree[np.round(keep).astype(int)] if len(agree) else [])
        return len(agree)

    def start_from(self, colour: np.ndarray | list[float]) -> None:
        """Start from a colour found before (a resumed scan's, from its journal)."""
        colour = _checked(np.asarray(colour, dtype=np.float32)[None])
        if not _usable(colour).all():
            raise ValueError(f"not a colour to start from: {colour[0].tolist()}")
        self._accepted.extend([colour[0]] * self.warmup)

    def choose(self, own: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For N×C own references (in scan order): the references to read the tiles against,
        and which of them are the chip's.

        A tile with a black channel (a dead camera channel, a black corner) keeps its own and
        does not count. After ``memory`` tiles in a row that were replaced and agree with each
        other, their colour becomes the chip's: the lamp or exposure changed (a film that
        large is rarer than that), and the scan must not read the rest of the chip against a
        colour that is gone.
        """
        own = _checked(own)
        usable = _usable(own)
        chosen = own.copy()
        replaced = np.zeros(len(own), bool)
        for i, ref in enumerate(own):
            if not usable[i]:
                continue
            chip = self.colour
            off = 0.0 if chip is None else float(np.abs(ref / chip - 1).max())
            if off <= self.tolerance:
                self._accepted.append(ref)
                self._run.clear()
            elif off <= self.beyond:
                chosen[i] = chip
                replaced[i] = True
                self._run.append(ref)
                self._reanchor_if_changed()
        self.replaced += int(replaced.sum())
        return chosen, replaced

    def _reanchor_if_changed(self) -> None:
        if len(self._run) < self._run.maxlen:
            return
        run = np.stack(self._run)
        centre = np.median(run, axis=0)
        if np.abs(run / centre - 1).max() <= self.tolerance:
            log.warning(
                "chip_reference.reanchored",
                tiles=len(run),
                old=[round(float(c), 4) for c in self.colour],
                new=[round(float(c), 4) for c in centre],
                why="every recent tile differed from the oxide colour alike: lamp or exposure "
                "changed, or a film covers this part of the chip",
            )
            self._accepted.clear()
            self._accepted.extend(run)
        self._run.clear()


def _checked(own: np.ndarray) -> np.ndarray:
    own = np.asarray(own, dtype=np.float32)
    if own.ndim != 2:
        raise ValueError(f"own references must be N×C colours, got shape {own.shape}")
    return own


def _usable(refs: np.ndarray) -> np.ndarray:
    """Which rows can be compared: finite, no channel black."""
    return np.isfinite(refs).all(axis=1) & (refs > 1e-3).all(axis=1)


__all__ = ["ChipReference"]
