"""The acquisition thread on the simulated rig: retries, failed fields, back-pressure, cancel."""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Callable

import numpy as np
import pytest
from conftest import small_rig_config

from drivers.simulated import SimulatedCore
from scanner.acquisition import (
    Acquisition,
    AcquisitionConfig,
    AcquisitionError,
    FieldResult,
    SafeMDAEngine,
    StageLimits,
)
from scanner.plan import ChipOutline, FieldOfView, plan_fields

#: a 100× field of the default camera; small chips keep plans at 9-20 fields
FOV_UM = (77.0, 77.0)
#: a tiny camera where the test is about control flow, not pixels: frames in a millisecond
TINY_CAMERA = {"sensor_shape": (32, 32)}
#: a scan that hangs fails the test instead of the run
HANG_S = 30.0


def _fields(side_um: float = 200.0) -> list[FieldOfView]:
    """A serpentine grid over a `side_um` square in the middle of the 1 mm chip (9 for 200)."""
    lo, hi = 400.0, 400.0 + side_um
    return plan_fields(ChipOutline(corners_um=((lo, lo), (hi, hi))), fov_um=FOV_UM, overlap=0.1)


def _rig(make_core, *, camera: dict | None = None, **faults: object) -> SimulatedCore:
    core = make_core(small_rig_config(camera=camera or TINY_CAMERA, faults=faults))
    core.setTimeoutMs(200)  # a stalled stage costs 0.2 s, not the rig's generous default
    return core


def _scan(acq: Acquisition) -> list[FieldResult]:
    async def collect() -> list[FieldResult]:
        return [r async for r in acq.results()]

    return asyncio.run(asyncio.wait_for(collect(), HANG_S))


def _record_frames(core: SimulatedCore) -> list[tuple[tuple[float, float], np.ndarray, object]]:
    """Every frame the runner emits: (where the camera truly looked, frame, event)."""
    emitted: list[tuple[tuple[float, float], np.ndarray, object]] = []

    def on_frame(img: np.ndarray, event: object, meta: object) -> None:
        # Emitted in the acquisition thread right after the snap: the stage has not moved on.
        x, y = core.simulation.xy_um()
        emitted.append(((float(x), float(y)), img, event))

    core.mda.events.frameReady.connect(on_frame)
    return emitted


def _focus(core: SimulatedCore) -> Callable[[float, float], float]:
    return core.simulation.world.focus_z_um


# ------------------------------------------------------------------ a clean scan


def test_clean_plan_gives_one_ok_result_per_field_in_order(make_core) -> None:
    core = _rig(make_core, camera={"sensor_shape": (512, 512)})
    fields = _fields()
    assert len(fields) == 9
    results = _scan(Acquisition(core, fields, queue_size=4))

    assert [r.index for r in results] == [f.index for f in fields]
    assert [r.name for r in results] == [f.name for f in fields]
    for r, f in zip(results, fields, strict=True):
        assert r.ok and r.error is None and r.attempts == 1
        assert r.frame is not None and r.frame.shape == (512, 512, 3)
        assert r.frame.mean() > 50  # the lit chip, not a dark frame
        assert r.stage_xy_um is not None
        assert math.dist(r.stage_xy_um, (f.x_um, f.y_um)) <= 1.0
    # The core's own engine is back for whoever runs an MDA next.
    assert not isinstance(core.mda.engine, SafeMDAEngine)


# ------------------------------------------------------------------ one fault, retried or not

#: fault -> the words the failed field's error must contain
FAULTS = {
    "stage_timeout": ("stage did not arrive", "timed out"),
    "stage_position_error": ("stage did not arrive", "tolerance"),
    "black_frame": ("black frame",),
    "camera_error": ("camera error",),
    "focus_error": ("focus drive error",),
}
#: the fault strikes the third operation of its kind: the third field's, when none came before
HIT = 2


@pytest.mark.parametrize("fault", list(FAULTS))
@pytest.mark.parametrize("retries", [2, 0])
def test_a_fault_is_retried_or_recorded_as_a_failed_field(make_core, fault: str, retries) -> None:
    core = _rig(make_core, **{fault: {"at": [HIT]}})
    fields = _fields()
    focus = _focus(core)
    acq = Acquisition(core, fields, z_um=focus, config=AcquisitionConfig(retries=retries))
    results = _scan(acq)

    assert core.simulation.faults.fired == [(fault, HIT)]
    assert [r.index for r in results] == [f.index for f in fields]  # the scan went on
    hit = results[HIT]
    if retries:
        assert hit.ok and hit.attempts == 2 and hit.frame is not None
    else:
        assert not hit.ok and hit.attempts == 1 and hit.frame is None
        assert hit.error is not None
        for words in FAULTS[fault]:
            assert words in hit.error
    others = [r for r in results if r is not hit]
    assert all(r.ok and r.attempts == 1 for r in others)
    for r in results:
        if r.ok:  # every frame was taken at its field, in focus
            assert math.dist(r.stage_xy_um, (r.x_um, r.y_um)) <= 1.0
            assert r.z_um == pytest.approx(focus(r.x_um, r.y_um), abs=0.01)


def test_a_persistent_camera_fault_fails_every_field_but_the_scan_completes(make_core) -> None:
    core = _rig(make_core, camera_error={"rate": 1.0})
    emitted = _record_frames(core)
    fields = _fields()
    results = _scan(Acquisition(core, fields, config=AcquisitionConfig(retries=1)))

    assert [r.name for r in results] == [f.name for f in fields]
    assert all(not r.ok and r.frame is None and r.attempts == 2 for r in results)
    assert all(r.error is not None and r.error.startswith("camera error") for r in results)
    assert emitted == []  # not one frame left the engine


# ------------------------------------------------------------ never a frame of the wrong place


def test_no_frame_is_ever_delivered_for_another_place(make_core) -> None:
    core = _rig(
        make_core,
        seed=3,
        stage_position_error={"rate": 0.3},
        stage_timeout={"rate": 0.15},
        black_frame={"rate": 0.1},
    )
    emitted = _record_frames(core)
    fields = _fields(250.0)
    assert 12 <= len(fields) <= 20
    results = _scan(Acquisition(core, fields, config=AcquisitionConfig(retries=1)))

    fired = {kind for kind, _ in core.simulation.faults.fired}
    assert fired == {"stage_position_error", "stage_timeout", "black_frame"}
    assert [r.name for r in results] == [f.name for f in fields]
    ok = [r for r in results if r.ok]
    assert any(r.attempts > 1 for r in ok)  # some faults were overcome, some not...
    assert len(ok) < len(results)
    # ...and each emitted frame is one ok field's frame, taken where the camera truly looked.
    assert len(emitted) == len(ok)
    for (true_xy, img, event), r in zip(emitted, ok, strict=True):
        assert event.pos_name == r.name
        assert math.dist(true_xy, (r.x_um, r.y_um)) <= 1.0
        assert np.array_equal(img, r.frame)
        assert img.mean() > 2.0


def test_a_field_beyond_the_soft_limits_is_refused_once_and_recorded(make_core) -> None:
    core = _rig(make_core)
    good = _fields()[:3]
    # x 13 mm: beyond the stage's 12 mm soft limit
    beyond = FieldOfView(index=3, row=1, col=0, x_um=13_000.0, y_um=500.0)
    last = FieldOfView(index=4, row=1, col=1, x_um=good[0].x_um, y_um=good[0].y_um - 70)
    results = _scan(Acquisition(core, [*good, beyond, last]))

    assert [r.ok for r in results] == [True, True, True, False, True]
    refused = results[3]
    assert refused.attempts == 1  # a refusal would only be refused again
    assert refused.error is not None and "stage" in refused.error
    assert "soft limits" in refused.error
    assert "did not arrive" not in refused.error  # it was refused, it never moved
    assert refused.stage_xy_um is not None  # where the stage stayed, for the record


def test_a_plan_outside_the_rig_limits_is_refused_before_anything_moves(make_core) -> None:
    core = _rig(make_core)
    cfg = core.simulation.cfg
    limits = StageLimits(
        x_limits_um=cfg.xy_stage.x_limits_um,
        y_limits_um=cfg.xy_stage.y_limits_um,
        safe_z_um=cfg.focus_drive.safe_z_um,
        lower_z_um=cfg.focus_drive.lower_limit_um,
    )
    start = core.getXYPosition()
    beyond = FieldOfView(index=9, row=3, col=0, x_um=13_000.0, y_um=500.0)
    with pytest.raises(ValueError, match="outside"):
        Acquisition(core, [*_fields(), beyond], limits=limits)
    with pytest.raises(ValueError, match="safe"):
        Acquisition(core, _fields(), z_um=lambda x, y: cfg.focus_drive.safe_z_um + 5, limits=limits)
    assert core.getXYPosition() == pytest.approx(start)
    ok = Acquisition(core, _fields(), z_um=_focus(core), limits=limits)
    assert all(r.ok for r in _scan(ok))


def test_a_closed_lamp_shutter_frame_counts_as_black(make_core) -> None:
    core = _rig(make_core)
    core.setAutoShutter(False)
    core.setShutterOpen(False)  # the lamp's shutter stuck closed: read noise only
    results = _scan(Acquisition(core, _fields()[:2], config=AcquisitionConfig(retries=0)))
    assert [r.ok for r in results] == [False, False]
    assert all("black frame" in (r.error or "") for r in results)


# ------------------------------------------------------------------ the thread and the queue


def test_back_pressure_holds_the_acquisition_to_the_queue(make_core) -> None:
    core = _rig(make_core)
    queue_size = 2
    acq = Acquisition(core, _fields(), queue_size=queue_size)

    async def slow_consumer() -> list[int]:
        consumed, gaps = 0, []
        async for _ in acq.results():
            consumed += 1
            await asyncio.sleep(0.05)  # inference falling behind
            gaps.append(acq.produced - consumed)
        return gaps

    gaps = asyncio.run(asyncio.wait_for(slow_consumer(), HANG_S))
    assert len(gaps) == 9
    # the queue full, plus one result in the acquisition thread's hands; never more
    assert max(gaps) == queue_size + 1


def test_cancel_stops_the_scan_and_ends_the_iterator(make_core) -> None:
    core = _rig(make_core)
    fields = _fields(250.0)
    acq = Acquisition(core, fields, queue_size=2)

    async def cancel_after_three() -> tuple[list[FieldResult], float]:
        got: list[FieldResult] = []
        cancelled_at = 0.0
        async for r in acq.results():
            got.append(r)
            if len(got) == 3:
                acq.cancel()
                cancelled_at = time.perf_counter()
            await asyncio.sleep(0.02)
        return got, time.perf_counter() - cancelled_at

    got, after_cancel_s = asyncio.run(asyncio.wait_for(cancel_after_three(), HANG_S))
    # what was already acquired still arrives (queue + one in hand + one in progress), no more
    assert 3 <= len(got) <= 3 + 2 + 1 + 1 < len(fields)
    assert [r.name for r in got] == [f.name for f in fields[: len(got)]]
    assert after_cancel_s < 2.0
    assert acq.thread is not None and not acq.thread.is_alive()
    assert not core.mda.is_running()


def test_cancel_before_the_scan_starts_yields_nothing(make_core) -> None:
    core = _rig(make_core)
    acq = Acquisition(core, _fields())
    acq.cancel()
    assert _scan(acq) == []


def test_leaving_the_loop_early_frees_the_blocked_thread(make_core) -> None:
    core = _rig(make_core)
    acq = Acquisition(core, _fields(), queue_size=1)

    async def take_one() -> FieldResult:
        async with contextlib.aclosing(acq.results()) as results:
            async for r in results:
                await asyncio.sleep(0.1)  # let the thread fill the queue and block
                return r
        raise AssertionError("no result")

    first = asyncio.run(asyncio.wait_for(take_one(), HANG_S))
    assert first.index == 0
    assert acq.thread is not None and not acq.thread.is_alive()
    assert acq.produced <= 3  # it stopped when the consumer left
    assert not isinstance(core.mda.engine, SafeMDAEngine)


def test_a_failure_of_the_thread_itself_reaches_asyncio(make_core, monkeypatch) -> None:
    core = _rig(make_core)
    acq = Acquisition(core, _fields())
    calls = 0
    real = acq.engine.get_frame_metadata

    def broken_on_third(*args: object, **kwargs: object) -> object:
        nonlocal calls
        calls += 1
        if calls == 3:  # a bug, not a hardware error: no field result can describe it
            raise KeyError("metadata")
        return real(*args, **kwargs)

    monkeypatch.setattr(acq.engine, "get_frame_metadata", broken_on_third)
    got: list[FieldResult] = []

    async def consume() -> None:
        async for r in acq.results():
            got.append(r)

    with pytest.raises(AcquisitionError, match="KeyError"):
        asyncio.run(asyncio.wait_for(consume(), HANG_S))
    # the third field's result was handed over before its frame's metadata failed
    assert [r.index for r in got] == [0, 1, 2]
    assert acq.thread is not None and not acq.thread.is_alive()
