"""Fixtures that build the simulated rig, as pymmcore-plus's own tests build a core."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from pathlib import Path

import pytest

from drivers.simulated import SimulatedCore, SimulatedRigConfig, create_simulated_core
from drivers.unicore import dispose_core


@pytest.fixture(autouse=True, scope="session")
def _loggers_stay_capturable() -> Iterator[None]:
    """The CLI configures structlog to cache each logger on first use, after which
    `structlog.testing.capture_logs` no longer sees it: a test that ran a command would hide
    the logs of every later test. Tests configure it without the cache."""
    import structlog

    configure = structlog.configure

    def uncached(**kwargs: object) -> None:
        configure(**{**kwargs, "cache_logger_on_first_use": False})

    structlog.configure = uncached  # type: ignore[assignment]
    yield
    structlog.configure = configure


def fresh_tiles(out: Path, count: int, seed: int, **kwargs: object) -> Path:
    """A dataset folder of synthetic tiles from configs/simulated.yaml, as `flakescan synth`
    writes them (``kwargs``: `write_synthetic_dataset`'s); pick seeds training never used."""
    from drivers.simulated.config import load_simulated_config
    from drivers.simulated.synth import write_synthetic_dataset

    base = load_simulated_config("configs/simulated.yaml")
    return write_synthetic_dataset(base, out, count=count, seed=seed, **kwargs)  # type: ignore[arg-type]


def small_rig_config(**overrides: object) -> SimulatedRigConfig:
    """A 1 × 1 mm chip with enough thin flakes to find some in a few fields of view."""
    base: dict = {
        "seed": 11,
        "chip": {"width_um": 1000, "height_um": 1000, "origin_um": (0, 0)},
        "flakes": {"thin_flakes_per_mm2": 12, "bulk_pieces_per_mm2": 10},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    return SimulatedRigConfig.model_validate(base)


@pytest.fixture
def rig_config() -> SimulatedRigConfig:
    return small_rig_config()


@pytest.fixture
def make_core() -> Iterator:
    """Build simulated cores from configs; all are disposed of after the test."""
    made: list[SimulatedCore] = []

    def _make(cfg: SimulatedRigConfig) -> SimulatedCore:
        core = create_simulated_core(cfg)
        made.append(core)
        return core

    yield _make
    while made:
        dispose_core(made.pop())


@pytest.fixture
def core(make_core, rig_config: SimulatedRigConfig) -> SimulatedCore:
    return make_core(rig_config)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    # A CMMCore still alive at interpreter exit can abort the process; collect any stragglers.
    gc.collect()
