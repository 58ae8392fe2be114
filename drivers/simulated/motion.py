"""The timing model of a motorised axis: trapezoidal velocity profile, then settle.

Moves never sleep here. A move records when (in wall time) it will be over; `busy()`
compares against the clock, just as a real controller reports "moving" until it has
arrived and settled. Wall time = simulated time × time_scale, so a time scale of 0 runs
tests as fast as the CPU allows while the simulated clock still counts every second the
real stage would have spent.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from .config import AxisTiming


def travel_time_s(distance_um: float, timing: AxisTiming) -> float:
    """Seconds to cover `distance_um` from rest to rest, settle not included."""
    d = abs(distance_um)
    if d == 0:
        return 0.0
    v, a = timing.velocity_um_s, timing.acceleration_um_s2
    if d < v * v / a:  # never reaches full speed: a triangle profile
        return 2.0 * math.sqrt(d / a)
    return d / v + v / a


def travelled_fraction(t_s: float, distance_um: float, timing: AxisTiming) -> float:
    """Fraction of the distance covered `t_s` seconds into a move (0..1)."""
    d = abs(distance_um)
    total = travel_time_s(d, timing)
    if d == 0 or t_s >= total:
        return 1.0
    if t_s <= 0:
        return 0.0
    v, a = timing.velocity_um_s, timing.acceleration_um_s2
    t_acc = min(v / a, total / 2)
    v_peak = a * t_acc
    if t_s <= t_acc:
        s = 0.5 * a * t_s**2
    elif t_s <= total - t_acc:
        s = 0.5 * a * t_acc**2 + v_peak * (t_s - t_acc)
    else:
        t_left = total - t_s
        s = d - 0.5 * a * t_left**2
    return min(max(s / d, 0.0), 1.0)


@dataclass
class SimClock:
    """Simulated seconds spent by the hardware, by kind, and the wall-time scale."""

    time_scale: float
    move_s: float = 0.0
    settle_s: float = 0.0
    exposure_s: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, *, move_s: float = 0.0, settle_s: float = 0.0, exposure_s: float = 0.0) -> None:
        with self._lock:
            self.move_s += move_s
            self.settle_s += settle_s
            self.exposure_s += exposure_s

    @property
    def total_s(self) -> float:
        return self.move_s + self.settle_s + self.exposure_s

    def wall_now(self) -> float:
        return time.perf_counter()

    def sleep(self, sim_s: float) -> None:
        if self.time_scale > 0 and sim_s > 0:
            time.sleep(sim_s * self.time_scale)


@dataclass
class AxisMove:
    """One move of a 1- or 2-axis stage, from `start` to `target` (µm)."""

    start: np.ndarray
    target: np.ndarray
    wall_start: float
    travel_s: float
    settle_s: float
    time_scale: float
    timing: AxisTiming

    @classmethod
    def begin(
        cls, start: np.ndarray, target: np.ndarray, timing: AxisTiming, clock: SimClock
    ) -> AxisMove:
        # Axes move at once, each with its own profile; the move lasts as long as the longest.
        travel = max(travel_time_s(float(d), timing) for d in np.atleast_1d(target - start))
        settle = timing.settle_ms / 1000 if travel > 0 else 0.0
        clock.add(move_s=travel, settle_s=settle)
        return cls(start, target, clock.wall_now(), travel, settle, clock.time_scale, timing)

    def sim_elapsed(self, wall_now: float) -> float:
        if self.time_scale == 0:
            return math.inf
        return (wall_now - self.wall_start) / self.time_scale

    def done(self, wall_now: float) -> bool:
        return self.sim_elapsed(wall_now) >= self.travel_s + self.settle_s

    def position(self, wall_now: float) -> np.ndarray:
        return self._position_at(self.sim_elapsed(wall_now))

    def path_during(self, wall_now: float, duration_s: float) -> tuple[np.ndarray, np.ndarray]:
        """Where the stage is at `wall_now` and `duration_s` simulated seconds later."""
        t = self.sim_elapsed(wall_now)
        return self._position_at(t), self._position_at(t + duration_s)

    def _position_at(self, t: float) -> np.ndarray:
        delta = self.target - self.start
        frac = np.array(
            [travelled_fraction(t, float(d), self.timing) for d in np.atleast_1d(delta)]
        )
        return self.start + delta * frac.reshape(np.shape(delta))
