"""Deterministic fault injection: the n-th operation of a kind fails if the config says so.

Each kind of fault counts its own operations and draws from its own seeded generator, so
whether move 17 stalls does not depend on how many frames were taken before it.
"""

from __future__ import annotations

import threading
import zlib

import numpy as np

from .config import FaultConfig, FaultsConfig

FAULT_KINDS = (
    "stage_timeout",
    "stage_position_error",
    "black_frame",
    "camera_error",
    "focus_error",
)


class FaultInjector:
    def __init__(self, cfg: FaultsConfig) -> None:
        self.cfg = cfg
        self._counts = dict.fromkeys(FAULT_KINDS, 0)
        self._rngs = {
            k: np.random.default_rng([cfg.seed, zlib.crc32(k.encode())]) for k in FAULT_KINDS
        }
        self.fired: list[tuple[str, int]] = []
        self._lock = threading.Lock()

    def strikes(self, kind: str) -> bool:
        """Count one operation of `kind` and say whether it fails."""
        fault: FaultConfig = getattr(self.cfg, kind)
        with self._lock:
            n = self._counts[kind]
            self._counts[kind] = n + 1
            # Draw on every call so the random sequence does not depend on the `at` list.
            hit = bool(self._rngs[kind].random() < fault.rate) or n in fault.at
            if hit:
                self.fired.append((kind, n))
            return hit

    def direction(self, kind: str) -> np.ndarray:
        """A unit vector for a position error, from the same deterministic stream."""
        with self._lock:
            angle = self._rngs[kind].uniform(0, 2 * np.pi)
        return np.array([np.cos(angle), np.sin(angle)])
