"""Hardware-in-the-loop tests: the simulated rig driven only through the Micro-Manager core API."""

from __future__ import annotations

import time

import numpy as np
import pytest
import useq
from conftest import small_rig_config

from drivers.simulated.motion import travel_time_s


def _move(core, x: float, y: float) -> tuple[float, float]:
    core.setXYPosition(x, y)
    core.waitForDevice(core.getXYStageDevice())
    return core.getXYPosition()


def test_rig_has_every_device_and_a_ready_pixel_size(core) -> None:
    assert core.getXYStageDevice() == "XYStage"
    assert core.getFocusDevice() == "FocusDrive"
    assert core.getCameraDevice() == "Camera"
    assert core.getShutterDevice() == "LampShutter"
    assert core.getProperty("Objective", "Label") == "100x"
    assert core.getPixelSizeUm() == pytest.approx(0.15)


def test_xy_moves_arrive_at_the_target(core) -> None:
    assert _move(core, 123.4, 567.8) == pytest.approx((123.4, 567.8))
    core.setRelativeXYPosition(10, -20)
    core.waitForDevice("XYStage")
    assert core.getXYPosition() == pytest.approx((133.4, 547.8))


def test_move_time_follows_the_trapezoid_profile_in_virtual_time(core, rig_config) -> None:
    timing = rig_config.xy_stage.timing
    _move(core, 0, 0)
    clock = core.simulation.clock
    before_move, before_settle = clock.move_s, clock.settle_s
    _move(core, 1000, 0)
    # 1 mm at 5 mm/s with 50 mm/s² reaches full speed: 1000/5000 + 5000/50000 = 0.3 s
    assert clock.move_s - before_move == pytest.approx(0.3)
    assert clock.settle_s - before_settle == pytest.approx(timing.settle_ms / 1000)
    # a short hop never reaches full speed: a triangle profile, 2·sqrt(d/a)
    assert travel_time_s(100, timing) == pytest.approx(2 * np.sqrt(100 / 50_000))


def test_stage_is_busy_while_moving_in_real_time(make_core) -> None:
    core = make_core(small_rig_config(time_scale=1.0))
    _move(core, 0, 0)
    t0 = time.perf_counter()
    core.setXYPosition(900, 0)  # 0.28 s of travel + 60 ms settle
    assert core.deviceBusy("XYStage")
    x_mid, _ = core.getXYPosition()
    assert 0 <= x_mid < 900
    core.waitForDevice("XYStage")
    elapsed = time.perf_counter() - t0
    assert not core.deviceBusy("XYStage")
    assert core.getXYPosition() == pytest.approx((900, 0))
    expected = travel_time_s(900, core.simulation.cfg.xy_stage.timing) + 0.06
    assert expected * 0.9 < elapsed < expected + 0.5


def test_soft_limits_refuse_a_move_and_the_stage_stays_put(core) -> None:
    _move(core, 200, 200)
    with pytest.raises(ValueError, match="soft limits"):
        core.setXYPosition(50_000, 200)
    assert core.getXYPosition() == pytest.approx((200, 200))


def test_focus_drive_never_passes_the_safe_z(core, rig_config) -> None:
    safe = rig_config.focus_drive.safe_z_um
    core.setPosition(safe - 10)
    core.waitForDevice("FocusDrive")
    with pytest.raises(ValueError, match="safe Z"):
        core.setPosition(safe + 0.1)
    assert core.getPosition() == pytest.approx(safe - 10)
    with pytest.raises(ValueError, match="lower limit"):
        core.setPosition(rig_config.focus_drive.lower_limit_um - 1)


def test_pixel_size_follows_the_objective_turret(core, rig_config) -> None:
    for obj in rig_config.objectives:
        core.setProperty("Objective", "Label", obj.label)
        assert core.getPixelSizeUm() == pytest.approx(15.0 / obj.magnification)
        assert core.getCurrentPixelSizeConfig() == f"Res{obj.label}"
    core.setState("Objective", 4)
    assert core.getProperty("Objective", "Label") == "100x"
    assert core.getPixelSizeAffine()[0] == pytest.approx(0.15)


def test_a_flake_covers_fewer_pixels_at_lower_magnification(core) -> None:
    world = core.simulation.world
    flake = max(world.flakes, key=lambda f: f.polygon.area)
    c = flake.polygon.centroid
    counts = {}
    for label in ("100x", "50x"):
        core.setProperty("Objective", "Label", label)
        px = core.getPixelSizeUm()
        counts[label] = int((world.label_raster((c.x, c.y), (512, 512), px) > 0).sum())
    assert counts["50x"] < counts["100x"] / 2


def test_snap_gives_an_rgb_frame_of_the_sensor_shape(make_core) -> None:
    core = make_core(small_rig_config(camera={"sensor_shape": (300, 400)}))
    core.snapImage()
    frame = core.getImage()
    assert frame.shape == (300, 400, 3)
    assert frame.dtype == np.uint8
    assert core.getImageWidth() == 400 and core.getImageHeight() == 300
    assert frame.mean() > 60  # auto-shutter opened the lamp


def test_closed_shutter_gives_a_dark_frame(core) -> None:
    core.setAutoShutter(False)
    core.setShutterOpen(False)
    core.snapImage()
    assert core.getImage().mean() < 10
    core.setShutterOpen(True)
    core.snapImage()
    assert core.getImage().mean() > 60


def test_mda_runner_acquires_at_each_position(core) -> None:
    frames: list[tuple[tuple, float, float]] = []
    core.mda.events.frameReady.connect(
        lambda img, event, meta: frames.append((img.shape, event.x_pos, event.y_pos))
    )
    seq = useq.MDASequence(stage_positions=[(100, 100), (300, 400), (500, 200)])
    core.mda.run(seq)
    assert [(x, y) for _, x, y in frames] == [(100, 100), (300, 400), (500, 200)]
    assert all(shape == (512, 512, 3) for shape, _, _ in frames)
    assert core.getXYPosition() == pytest.approx((500, 200))


# ------------------------------------------------------------------ injected faults


def test_stage_timeout_surfaces_as_a_wait_error_and_the_next_move_works(make_core) -> None:
    core = make_core(small_rig_config(faults={"stage_timeout": {"at": [1]}}))
    core.setTimeoutMs(100)
    _move(core, 100, 100)
    core.setXYPosition(400, 400)
    with pytest.raises(Exception, match="timed out"):
        core.waitForDevice("XYStage")
    assert core.getXYPosition() != pytest.approx((400, 400))
    assert _move(core, 400, 400) == pytest.approx((400, 400))


def test_stage_position_error_leaves_the_stage_off_target(make_core) -> None:
    core = make_core(small_rig_config(faults={"stage_position_error": {"at": [0]}}))
    x, y = _move(core, 300, 300)
    assert np.hypot(x - 300, y - 300) == pytest.approx(8.0)
    assert _move(core, 300, 300) == pytest.approx((300, 300))


def test_black_frame_fault(make_core) -> None:
    core = make_core(small_rig_config(faults={"black_frame": {"at": [0]}}))
    core.snapImage()
    assert core.getImage().max() == 0
    core.snapImage()
    assert core.getImage().mean() > 60


def test_camera_error_raises_on_snap(make_core) -> None:
    core = make_core(small_rig_config(faults={"camera_error": {"at": [1]}}))
    core.snapImage()
    with pytest.raises(RuntimeError, match="camera error"):
        core.snapImage()
    core.snapImage()


def test_focus_error_raises_on_move(make_core) -> None:
    core = make_core(small_rig_config(faults={"focus_error": {"at": [0]}}))
    with pytest.raises(RuntimeError, match="focus drive error"):
        core.setPosition(1000)
    core.setPosition(1000)
    core.waitForDevice("FocusDrive")
    assert core.getPosition() == pytest.approx(1000)


def _failures(core, n: int) -> list[bool]:
    out = []
    for _ in range(n):
        try:
            core.snapImage()
            out.append(False)
        except RuntimeError:
            out.append(True)
    return out


def test_random_faults_are_deterministic_by_seed(make_core) -> None:
    cfgs = [small_rig_config(faults={"seed": s, "camera_error": {"rate": 0.3}}) for s in (1, 1, 2)]
    a, b, c = (_failures(make_core(cfg), 20) for cfg in cfgs)
    assert a == b
    assert a != c
    assert 2 <= sum(a) <= 12
