"""Flat-field correction, measured on the simulated camera, whose vignetting is known."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from conftest import small_rig_config

from scanner.flat_field import (
    FlatFieldError,
    apply_flat_field,
    estimate_flat_field,
    read_flat_field,
    write_flat_field,
)
from scanner.plan import ChipOutline, FieldOfView, flat_field_fields


def _frames(core, places: list[tuple[float, float]]) -> list[np.ndarray]:
    world = core.simulation.world
    out = []
    for x, y in places:
        core.setXYPosition(x, y)
        core.waitForDevice(core.getXYStageDevice())
        core.setPosition(world.focus_z_um(x, y))
        core.waitForDevice(core.getFocusDevice())
        core.snapImage()
        out.append(np.array(core.getImage()))
    return out


def _true_gain(core) -> np.ndarray:
    """The renderer's own illumination falloff, as the gamma-encoded frame carries it."""
    optics = core.simulation.cfg.optics
    gain = core.simulation.renderer._vignette ** (1 / optics.gamma)
    return gain / gain.mean(axis=(0, 1))


@pytest.fixture
def vignetted(make_core):
    # Strong vignetting and a lamp off-centre, on a chip crowded with flakes and debris.
    cfg = small_rig_config(
        optics={"vignetting": 0.3, "illumination_tilt": 0.15},
        flakes={"thin_flakes_per_mm2": 150, "bulk_pieces_per_mm2": 40},
    )
    return make_core(cfg)


def test_the_estimate_recovers_the_cameras_vignetting_from_crowded_fields(vignetted) -> None:
    rng = np.random.default_rng(0)
    places = [tuple(p) for p in rng.uniform(100, 900, (12, 2))]
    frames = _frames(vignetted, places)
    true = _true_gain(vignetted)
    assert true.min() < 0.9  # the test is worth something: the corners are >10 % darker

    gain = estimate_flat_field(frames)
    assert gain.shape == frames[0].shape and gain.dtype == np.float32
    assert np.abs(gain / true - 1).max() < 0.015

    # Corrected, the bare oxide is as bright in the corners as in the middle.
    corrected = apply_flat_field(frames[0], gain)
    assert corrected.dtype == frames[0].dtype
    for image, worst in ((frames[0], 0.08), (corrected, 0.015)):
        x = image.astype(np.float32)
        corner, middle = (
            np.median(x[:64, :64], axis=(0, 1)),
            np.median(x[224:288, 224:288], axis=(0, 1)),
        )
        assert (np.abs(corner / middle - 1).max() > worst) == (image is frames[0])


def test_a_saved_flat_field_reads_back_and_bad_files_are_named(vignetted, tmp_path) -> None:
    gain = estimate_flat_field(_frames(vignetted, [(300, 300), (600, 650), (700, 200)]))
    write_flat_field(tmp_path / "ff.tif", gain)
    np.testing.assert_allclose(read_flat_field(tmp_path / "ff.tif"), gain, rtol=1e-3)

    # A raw frame of a bare wafer, any scale, is a flat field too.
    tifffile.imwrite(tmp_path / "raw.tif", (gain * 180).astype(np.uint8))
    np.testing.assert_allclose(read_flat_field(tmp_path / "raw.tif"), gain, atol=0.01)

    with pytest.raises(FlatFieldError, match="does not exist"):
        read_flat_field(tmp_path / "nope.tif")
    (tmp_path / "text.tif").write_text("not an image")
    with pytest.raises(FlatFieldError, match="not a readable TIFF"):
        read_flat_field(tmp_path / "text.tif")
    tifffile.imwrite(tmp_path / "zero.tif", np.zeros((64, 64), np.float32))
    with pytest.raises(FlatFieldError, match="positive"):
        read_flat_field(tmp_path / "zero.tif")
    half = np.ones((64, 64), np.float32)
    half[:, :32] = 0.1  # a shadow no lamp casts: a frame of something that is not a wafer
    tifffile.imwrite(tmp_path / "shadow.tif", half)
    with pytest.raises(FlatFieldError, match="runs from"):
        read_flat_field(tmp_path / "shadow.tif")
    with pytest.raises(FlatFieldError, match="512×512 px but frames are 256×256"):
        apply_flat_field(np.zeros((256, 256, 3), np.uint8), gain)


def test_dark_frames_give_a_clear_error() -> None:
    dark = [np.full((128, 128, 3), 3, np.uint8) for _ in range(4)]
    with pytest.raises(FlatFieldError, match="all 4 flat-field frames are dark"):
        estimate_flat_field(dark)
    with pytest.raises(FlatFieldError, match="no frames"):
        estimate_flat_field([])


def test_flat_field_fields_spread_over_the_chip_and_avoid_its_edge() -> None:
    chip = ChipOutline(corners_um=((0, 0), (1000, 1000))).shape()
    fov = (100.0, 100.0)
    grid = [(r, c) for r in range(11) for c in range(11)]
    fields = [FieldOfView(i, r, c, 50 + 90 * c, 50 + 90 * r) for i, (r, c) in enumerate(grid)]
    picked = flat_field_fields(fields, chip, fov, 16)
    assert len(picked) == 16 and len({f.index for f in picked}) == 16
    assert all(chip.contains(f.footprint(fov)) for f in picked)
    rows = {f.row for f in picked}
    assert min(rows) <= 2 and max(rows) >= 8  # from one end of the chip to the other
    # A chip of four fields, all on its edge: all four are used.
    assert len(flat_field_fields(fields[:2] + fields[11:13], chip, fov, 16)) == 4
