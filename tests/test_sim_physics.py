"""The simulated camera's physics: layer contrast, defocus blur, exposure, vignetting, smear."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from conftest import small_rig_config
from scipy import ndimage

from drivers.simulated import ChipWorld
from drivers.simulated.optics import optical_contrast
from drivers.simulated.render import Exposure, FrameRenderer, blur_sigma_px


@pytest.fixture(scope="module")
def clean_scope():
    """A world and renderer with no vignetting and low noise, for measuring contrast."""
    cfg = small_rig_config(
        optics={"vignetting": 0.0},
        camera={"read_noise_e": 1.0},
        chip={"width_um": 1000, "height_um": 1000, "oxide_drift_nm": 0.0},
        flakes={"thin_flakes_per_mm2": 20, "residue_per_mm2": 0, "dust_per_mm2": 0},
    )
    world = ChipWorld(cfg)
    return cfg, world, FrameRenderer(world, cfg, seed=5)


def _region_means(
    frame: np.ndarray, labels: np.ndarray, layer: int
) -> tuple[np.ndarray, np.ndarray]:
    """Mean 8-bit colour of a class and of the substrate, away from edges (eroded masks)."""
    inside = ndimage.binary_erosion(labels == layer, iterations=6)
    substrate = ndimage.binary_erosion(labels == 0, iterations=12)
    return frame[inside].mean(axis=0), frame[substrate].mean(axis=0)


@pytest.mark.parametrize("layers", [1, 2])
def test_layer_contrast_matches_the_thin_film_optics(clean_scope, layers: int) -> None:
    cfg, world, renderer = clean_scope
    obj = cfg.objective_config("100x")
    flake = max((f for f in world.flakes if f.layers == layers), key=lambda f: f.polygon.area)
    c = flake.polygon.centroid
    frame = renderer.render(Exposure((c.x, c.y), obj, 0.0, cfg.camera.exposure_ms)).astype(float)
    labels = world.label_raster((c.x, c.y), renderer.shape, renderer.pixel_size_um(obj))
    flake_rgb, substrate_rgb = _region_means(frame, labels, layers)
    measured = (substrate_rgb - flake_rgb) / substrate_rgb
    expected = optical_contrast(layers, cfg.chip.oxide_nm, cfg.optics.lamp_kelvin, obj.na, 2.2)
    # optics.md, NA 0.9, gamma 2.2: 1L +0.11 +0.09 -0.03; 2L +0.20 +0.12 -0.06
    assert measured == pytest.approx(expected, abs=0.02)
    assert measured[0] > 0.08 and measured[1] > 0.05  # darker in red and green
    assert measured[2] < 0  # brighter in blue


@pytest.mark.parametrize("substrate", ["quartz", "sapphire"])
def test_cvd_on_a_transparent_substrate_renders_layers_brighter(substrate: str) -> None:
    cfg = small_rig_config(
        optics={"vignetting": 0.0},
        camera={"read_noise_e": 1.0},
        chip={"width_um": 600, "height_um": 600, "oxide_drift_nm": 0.0, "substrate": substrate},
        flakes={
            "growth": "cvd",
            "thin_flakes_per_mm2": 60,
            "residue_per_mm2": 0,
            "dust_per_mm2": 0,
        },
    )
    world = ChipWorld(cfg)
    renderer = FrameRenderer(world, cfg, seed=5)
    obj = cfg.objective_config("100x")
    flake = max((f for f in world.flakes if f.layers == 1), key=lambda f: f.polygon.area)
    c = flake.polygon.centroid
    frame = renderer.render(Exposure((c.x, c.y), obj, 0.0, cfg.camera.exposure_ms)).astype(float)
    labels = world.label_raster((c.x, c.y), renderer.shape, renderer.pixel_size_um(obj))
    flake_rgb, substrate_rgb = _region_means(frame, labels, 1)
    measured = (substrate_rgb - flake_rgb) / substrate_rgb
    expected = optical_contrast(
        1, cfg.chip.oxide_nm, cfg.optics.lamp_kelvin, obj.na, 2.2, substrate
    )
    assert measured == pytest.approx(expected, abs=0.02)
    assert (measured < -0.03).all()  # brighter than the substrate in every channel
    on_silicon = optical_contrast(1, cfg.chip.oxide_nm, cfg.optics.lamp_kelvin, obj.na, 2.2)
    assert measured[0] < on_silicon[0] - 0.1  # the opposite sign of SiO2/Si in red


def test_veiling_glare_lowers_every_layer_contrast_by_one_over_one_plus_glare(clean_scope) -> None:
    cfg, world, renderer = clean_scope
    glary_cfg = cfg.model_copy(
        update={"optics": cfg.optics.model_copy(update={"veiling_glare": 0.25})}
    )
    glary = FrameRenderer(world, glary_cfg, seed=5)
    obj = cfg.objective_config("100x")
    flake = max((f for f in world.flakes if f.layers == 1), key=lambda f: f.polygon.area)
    c = flake.polygon.centroid
    labels = world.label_raster((c.x, c.y), renderer.shape, renderer.pixel_size_um(obj))
    contrast = []
    for r in (renderer, glary):
        frame = r.render(Exposure((c.x, c.y), obj, 0.0, cfg.camera.exposure_ms)).astype(float)
        flake_rgb, substrate_rgb = _region_means(frame, labels, 1)
        contrast.append((substrate_rgb - flake_rgb)[:2] / substrate_rgb[:2])
    # gamma-encoded contrast of a faint layer scales as the linear one: 1 / 1.25, nearly
    assert contrast[1] == pytest.approx(contrast[0] / 1.25, rel=0.12)


def test_an_unknown_substrate_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="substrate"):
        small_rig_config(chip={"substrate": "glass"})


def test_bilayer_contrast_exceeds_monolayer_in_red(clean_scope) -> None:
    cfg = clean_scope[0]
    one = optical_contrast(1, cfg.chip.oxide_nm, cfg.optics.lamp_kelvin, 0.9, 2.2)
    two = optical_contrast(2, cfg.chip.oxide_nm, cfg.optics.lamp_kelvin, 0.9, 2.2)
    assert two[0] > one[0] + 0.05


def _edge_energy(img: np.ndarray) -> float:
    gray = img.mean(axis=2)
    return float((np.diff(gray, axis=0) ** 2).sum() + (np.diff(gray, axis=1) ** 2).sum())


def test_blur_grows_with_defocus(clean_scope) -> None:
    cfg, world, renderer = clean_scope
    obj = cfg.objective_config("100x")
    c = max(world.flakes, key=lambda f: f.polygon.area).polygon.centroid
    energies = [
        _edge_energy(renderer.reflectance(Exposure((c.x, c.y), obj, dz, 40.0)))
        for dz in (0.0, 0.3, 1.0, 3.0)
    ]
    assert all(a > b for a, b in itertools.pairwise(energies))
    assert energies[-1] < energies[0] / 4
    # symmetric about focus
    below = _edge_energy(renderer.reflectance(Exposure((c.x, c.y), obj, -1.0, 40.0)))
    assert below == pytest.approx(energies[2], rel=0.02)


def test_blur_sigma_is_diffraction_limited_in_focus() -> None:
    assert blur_sigma_px(0.0, 0.9, 0.15) == pytest.approx(0.21 * 0.55 / 0.9 / 0.15)
    assert blur_sigma_px(2.0, 0.9, 0.15) > 10 * blur_sigma_px(0.0, 0.9, 0.15)
    # a low-NA objective has a deeper focus
    assert blur_sigma_px(2.0, 0.15, 3.0) < blur_sigma_px(2.0, 0.9, 3.0)


def test_brightness_follows_exposure_and_saturates(clean_scope) -> None:
    cfg, _world, renderer = clean_scope
    obj = cfg.objective_config("100x")
    bare = (cfg.chip.width_um / 2, cfg.chip.height_um / 2)
    means = [renderer.render(Exposure(bare, obj, 0.0, ms)).mean() for ms in (5.0, 10.0, 20.0)]
    assert means[0] < means[1] < means[2]
    # 8-bit values follow signal^(1/2.2): doubling exposure scales them by 2^(1/2.2)
    assert means[1] / means[0] == pytest.approx(2 ** (1 / 2.2), rel=0.05)
    saturated = renderer.render(Exposure(bare, obj, 0.0, 2000.0))
    assert (saturated == 255).mean() > 0.99


def test_vignetting_darkens_the_corners(make_core) -> None:
    core = make_core(
        small_rig_config(
            optics={"vignetting": 0.3},
            flakes={
                "thin_flakes_per_mm2": 0,
                "bulk_pieces_per_mm2": 0,
                "residue_per_mm2": 0,
                "dust_per_mm2": 0,
            },
        )
    )
    core.snapImage()
    frame = core.getImage().astype(float).mean(axis=2)
    centre, corner = frame[236:276, 236:276].mean(), frame[:40, :40].mean()
    # 30 % less light at the corner; 8-bit values scale by 0.7^(1/2.2) ≈ 0.85
    assert corner / centre == pytest.approx(0.7 ** (1 / 2.2), abs=0.03)


def test_shot_and_read_noise(make_core) -> None:
    empty = {
        "thin_flakes_per_mm2": 0,
        "bulk_pieces_per_mm2": 0,
        "residue_per_mm2": 0,
        "dust_per_mm2": 0,
    }
    quiet = make_core(
        small_rig_config(camera={"read_noise_e": 0.0}, flakes=empty, optics={"vignetting": 0.0})
    )
    loud = make_core(
        small_rig_config(camera={"read_noise_e": 300.0}, flakes=empty, optics={"vignetting": 0.0})
    )
    stds = []
    for core in (quiet, loud):
        core.snapImage()
        stds.append(core.getImage().astype(float)[..., 1].std())
    assert stds[0] > 0.5  # shot noise alone is visible
    assert stds[1] > 2 * stds[0]


def test_frame_taken_while_the_stage_moves_is_smeared(clean_scope) -> None:
    cfg, world, renderer = clean_scope
    obj = cfg.objective_config("100x")
    c = max(world.flakes, key=lambda f: f.polygon.area).polygon.centroid
    still = renderer.reflectance(Exposure((c.x, c.y), obj, 0.0, 40.0)).mean(axis=2)
    moving = renderer.reflectance(Exposure((c.x, c.y), obj, 0.0, 40.0, smear_um=(8.0, 0.0))).mean(
        axis=2
    )
    x_energy = lambda im: float((np.diff(im, axis=1) ** 2).sum())  # noqa: E731
    y_energy = lambda im: float((np.diff(im, axis=0) ** 2).sum())  # noqa: E731
    along = x_energy(moving) / x_energy(still)
    across = y_energy(moving) / y_energy(still)
    assert along < 0.5  # smeared along the motion
    assert along < 0.5 * across  # far less across it


def test_snap_during_a_real_time_move_is_smeared(make_core) -> None:
    core = make_core(small_rig_config(time_scale=1.0))
    world = core.simulation.world
    c = max(world.flakes, key=lambda f: f.polygon.area).polygon.centroid
    core.setXYPosition(c.x, c.y)
    core.waitForDevice("XYStage")
    core.snapImage()
    still = core.getImage().astype(float).mean(axis=2)
    core.setXYPosition(c.x + 800, c.y)
    assert core.deviceBusy("XYStage")
    core.snapImage()  # taken mid-move, at speed
    moving = core.getImage().astype(float).mean(axis=2)
    core.waitForDevice("XYStage")
    smooth = ndimage.uniform_filter(still, 5), ndimage.uniform_filter(moving, 5)
    assert float((np.diff(smooth[1], axis=1) ** 2).sum()) < 0.5 * float(
        (np.diff(smooth[0], axis=1) ** 2).sum()
    )
