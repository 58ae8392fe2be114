"""Thin-film colours of MoS2 on SiO2/Si, as the simulated camera sees them.

Physics and target numbers are in shared/optics.md: characteristic-matrix reflectance, averaged
over the objective's cone of angles, weighted by a black-body lamp and Gaussian R/G/B channels,
white-balanced so that a perfect mirror reads (1, 1, 1). The renderer only ever needs a
(material code -> RGB) table for one oxide thickness, so `MaterialColours` precomputes that table
on a fine oxide grid once and interpolates per frame.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache
from typing import Literal, get_args

import numpy as np
from scipy.interpolate import PchipInterpolator

LAYER_THICKNESS_NM: float = 0.65
THICK_LAYERS: tuple[int, ...] = (14, 20, 30, 45, 70, 100, 150, 230, 350)
RESIDUE_CODE: int = 20
DUST_CODE: int = 21
N_MATERIALS: int = 22

#: Integration grid; 5 nm steps change the contrasts by < 0.002 against 1 nm steps.
WAVELENGTHS_NM: np.ndarray = np.arange(400.0, 701.0, 5.0)
CHANNEL_CENTRES_NM: tuple[float, float, float] = (605.0, 535.0, 460.0)
#: Gaussian standard deviation of each channel (FWHM ~66 nm). Of 20-35 nm, 28 nm best reproduces
#: both optics.md contrast rows and the 285 nm case (largest error 0.044, rms 0.019).
CHANNEL_SIGMA_NM: float = 28.0

RESIDUE_INDEX: complex = 1.49 + 0.002j
RESIDUE_THICKNESS_NM: float = 15.0
#: Dust scatters light out of the objective rather than interfering: a flat dark grey.
DUST_REFLECTANCE: float = 0.04

# Hsu et al. 2019 via optics.md; >= 3 layers share the 3L row.
_MOS2_WL_NM = np.array([450.0, 530.0, 550.0, 600.0, 650.0])
_MOS2_INDEX = {
    1: np.array([5.93 + 2.09j, 5.08 + 0.91j, 4.96 + 0.91j, 4.60 + 1.53j, 5.17 + 1.31j]),
    2: np.array([5.13 + 2.24j, 5.08 + 0.81j, 5.03 + 1.00j, 4.42 + 1.51j, 4.71 + 1.30j]),
    3: np.array([4.11 + 1.00j, 5.26 + 0.81j, 5.00 + 0.76j, 4.46 + 1.07j, 4.71 + 0.64j]),
}
# Green 2008, Table 1, every 20 nm: the optics.md row alone would miss the steep rise of n and k
# below 450 nm, which the blue channel sees.
_SI_WL_NM = np.arange(400.0, 701.0, 20.0)
_SI_N = [5.613, 5.119, 4.812, 4.587, 4.419, 4.294, 4.193, 4.112]
_SI_N += [4.045, 3.988, 3.940, 3.898, 3.861, 3.828, 3.798, 3.772]
_SI_K = [0.296, 0.176, 0.107, 0.071, 0.055, 0.044, 0.036, 0.030]
_SI_K += [0.026, 0.023, 0.020, 0.017, 0.015, 0.013, 0.012, 0.011]


def material_code(layers: int) -> int:
    """Nearest material code for a MoS2 layer count."""
    if layers < 0:
        raise ValueError(f"layer count must be >= 0, got {layers}")
    if layers <= 10:
        return int(layers)
    return 11 + int(np.argmin(np.abs(np.array(THICK_LAYERS) - layers)))


def _layers_of_code(code: int) -> int:
    return code if code <= 10 else THICK_LAYERS[code - 11]


def _pchip_complex(x: np.ndarray, values: np.ndarray, at: np.ndarray) -> np.ndarray:
    # n and k separately: interpolating them jointly would not be shape-preserving for each.
    at = np.clip(np.asarray(at, dtype=float), x[0], x[-1])  # flat outside the table
    return PchipInterpolator(x, values.real)(at) + 1j * PchipInterpolator(x, values.imag)(at)


def mos2_index(wavelength_nm: np.ndarray, layers: int) -> np.ndarray:
    """Complex index n + ik of `layers`-layer MoS2."""
    if layers < 1:
        raise ValueError(f"MoS2 needs at least one layer, got {layers}")
    return _pchip_complex(_MOS2_WL_NM, _MOS2_INDEX[min(layers, 3)], wavelength_nm)


def sio2_index(wavelength_nm: np.ndarray) -> np.ndarray:
    """Fused silica, Malitson 1965 Sellmeier formula (real)."""
    l2 = (np.asarray(wavelength_nm, dtype=float) / 1000.0) ** 2
    terms = ((0.6961663, 0.0684043), (0.4079426, 0.1162414), (0.8974794, 9.896161))
    eps = 1.0 + sum(a * l2 / (l2 - b**2) for a, b in terms)
    return np.sqrt(eps).astype(complex)


def sapphire_index(wavelength_nm: np.ndarray) -> np.ndarray:
    """Sapphire, ordinary ray, Malitson 1972 Sellmeier formula (real)."""
    l2 = (np.asarray(wavelength_nm, dtype=float) / 1000.0) ** 2
    terms = ((1.4313493, 0.0726631), (0.65054713, 0.1193242), (5.3414021, 18.028251))
    eps = 1.0 + sum(a * l2 / (l2 - b**2) for a, b in terms)
    return np.sqrt(eps).astype(complex)


#: What the flakes lie on. "sio2_si" is the oxidised silicon wafer of exfoliation, whose oxide
#: thickness sets the colours; CVD MoS2 is often grown on (or transferred to) transparent
#: "quartz" or "sapphire", a dark, weakly reflecting background on which every layer is
#: *brighter* than the substrate, most of all in blue.
Substrate = Literal["sio2_si", "quartz", "sapphire"]
SUBSTRATES: tuple[str, ...] = get_args(Substrate)


def substrate_indices(substrate: str, wl: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
    """(index of the oxide film under the flake, or None; semi-infinite substrate index)."""
    if substrate == "sio2_si":
        return sio2_index(wl), si_index(wl)
    if substrate == "quartz":
        return None, sio2_index(wl)  # thick: its back face is far out of focus
    if substrate == "sapphire":
        return None, sapphire_index(wl)
    raise ValueError(f"unknown substrate {substrate!r}; choose from {', '.join(SUBSTRATES)}")


def _under(oxide: np.ndarray | None, oxide_nm: float) -> list[tuple[np.ndarray, float]]:
    return [] if oxide is None else [(oxide, oxide_nm)]


def si_index(wavelength_nm: np.ndarray) -> np.ndarray:
    """Crystalline silicon, Green 2008."""
    return _pchip_complex(_SI_WL_NM, np.array(_SI_N) + 1j * np.array(_SI_K), wavelength_nm)


def _angles(na: float, n_angles: int) -> tuple[np.ndarray, np.ndarray]:
    if na <= 0:
        return np.zeros(1), np.ones(1)
    x, w = np.polynomial.legendre.leggauss(n_angles)
    theta_max = math.asin(min(na, 1.0))
    theta = (x + 1.0) * theta_max / 2.0
    w = w * np.sin(theta) * np.cos(theta)  # projected solid angle collected by the pupil
    return theta, w / w.sum()


def _admittance(n: np.ndarray, n_cos: np.ndarray, s_pol: bool) -> np.ndarray:
    return n_cos if s_pol else n**2 / n_cos  # N cosθ (s) or N / cosθ (p)


def stack_reflectance(
    wavelength_nm: np.ndarray,
    films: Sequence[tuple[np.ndarray | complex, float]],
    substrate_index: np.ndarray,
    na: float,
    n_angles: int = 12,
) -> np.ndarray:
    """(n_wl,) unpolarised reflectance from air of `films` (top to bottom) on a substrate.

    For na > 0 the result is averaged over incidence angles 0..asin(na), weighted by sinθ cosθ.
    """
    wl = np.asarray(wavelength_nm, dtype=float)
    theta, weight = _angles(na, n_angles)
    sin0 = np.sin(theta)[:, None]  # (angle, 1): n0 sinθ0 is conserved through the stack

    def n_cos(index: np.ndarray | complex) -> tuple[np.ndarray, np.ndarray]:
        # N cosθ = sqrt(N² - sin²θ0); the principal root has Im >= 0, i.e. decays into the stack.
        n = np.broadcast_to(np.asarray(index, dtype=complex), wl.shape)[None, :]
        return n, np.sqrt(n**2 - sin0**2 + 0j)

    stack = [(*n_cos(index), thickness) for index, thickness in reversed(films)]
    air, substrate = n_cos(1.0), n_cos(substrate_index)
    total = np.zeros((theta.size, wl.size))
    for s_pol in (True, False):
        b = np.ones((theta.size, wl.size), dtype=complex)
        c = _admittance(*substrate, s_pol) * b
        for n, nc, thickness in stack:  # apply M_j from the substrate upwards
            delta = 2.0 * np.pi * nc * thickness / wl
            cos_d, sin_d, eta = np.cos(delta), np.sin(delta), _admittance(n, nc, s_pol)
            b, c = cos_d * b - 1j * sin_d / eta * c, -1j * eta * sin_d * b + cos_d * c
        eta0 = _admittance(*air, s_pol)
        r = (eta0 * b - c) / (eta0 * b + c)
        total += 0.5 * np.abs(r) ** 2
    return weight @ total


def lamp_spectrum(wavelength_nm: np.ndarray, kelvin: float) -> np.ndarray:
    """Planck spectral radiance, normalised to 1 at 560 nm."""
    c2_nm_k = 1.438777e7  # second radiation constant hc/k in nm·K

    def planck(wl: np.ndarray | float) -> np.ndarray:
        return 1.0 / (np.power(wl, 5.0) * np.expm1(c2_nm_k / (wl * kelvin)))

    return planck(np.asarray(wavelength_nm, dtype=float)) / planck(560.0)


def channel_sensitivities(wavelength_nm: np.ndarray) -> np.ndarray:
    """(3, n_wl) Gaussian R, G, B sensitivities, peak 1."""
    wl = np.asarray(wavelength_nm, dtype=float)[None, :]
    centres = np.array(CHANNEL_CENTRES_NM)[:, None]
    return np.exp(-0.5 * ((wl - centres) / CHANNEL_SIGMA_NM) ** 2)


def camera_rgb(reflectance: np.ndarray, wavelength_nm: np.ndarray, kelvin: float) -> np.ndarray:
    """(..., 3) linear signal of a reflectance spectrum (..., n_wl); a mirror reads (1, 1, 1)."""
    weights = lamp_spectrum(wavelength_nm, kelvin)[None, :] * channel_sensitivities(wavelength_nm)
    return np.asarray(reflectance) @ (weights / weights.sum(axis=1, keepdims=True)).T


def _top_films(code: int, wl: np.ndarray) -> list[tuple[np.ndarray, float]]:
    """Films above the oxide for an optical (non-dust) material code."""
    if code == RESIDUE_CODE:
        return [(np.full(wl.shape, RESIDUE_INDEX), RESIDUE_THICKNESS_NM)]
    layers = _layers_of_code(code)
    return [(mos2_index(wl, layers), layers * LAYER_THICKNESS_NM)] if layers else []


class MaterialColours:
    """Linear RGB (mirror = 1) of every material code over a range of oxide thicknesses."""

    def __init__(
        self,
        oxide_min_nm: float,
        oxide_max_nm: float,
        lamp_kelvin: float = 3200,
        na: float = 0.9,
        step_nm: float = 0.5,
        substrate: str = "sio2_si",
    ) -> None:
        if not 0 < oxide_min_nm <= oxide_max_nm:
            raise ValueError(
                f"need 0 < oxide_min_nm <= oxide_max_nm, got {oxide_min_nm}-{oxide_max_nm}"
            )
        self.oxide_min_nm, self.oxide_max_nm = float(oxide_min_nm), float(oxide_max_nm)
        wl = WAVELENGTHS_NM
        # Indices once, not per oxide step: building the interpolators dominated the runtime.
        oxide, base = substrate_indices(substrate, wl)
        tops = [_top_films(code, wl) for code in range(DUST_CODE)]
        # A transparent substrate has no oxide: one row serves every requested thickness.
        n_steps = math.ceil((oxide_max_nm - oxide_min_nm) / step_nm) if oxide is not None else 0
        self._oxide = np.linspace(oxide_min_nm, oxide_max_nm, n_steps + 1)
        spectra = [
            [stack_reflectance(wl, [*top, *_under(oxide, d)], base, na) for top in tops]
            for d in self._oxide
        ]
        self._table = np.full((self._oxide.size, N_MATERIALS, 3), DUST_REFLECTANCE)
        self._table[:, :DUST_CODE] = camera_rgb(np.array(spectra), wl, lamp_kelvin)

    def linear_rgb(self, oxide_nm: float) -> np.ndarray:
        """(N_MATERIALS, 3) float32 linear RGB at this oxide thickness."""
        lo, hi = self.oxide_min_nm, self.oxide_max_nm
        if not lo - 1e-9 <= oxide_nm <= hi + 1e-9:
            raise ValueError(f"oxide_nm={oxide_nm} is outside the precomputed range {lo}-{hi} nm")
        if self._oxide.size == 1:
            return self._table[0].astype(np.float32)
        x = (oxide_nm - lo) / (self._oxide[1] - self._oxide[0])
        i = min(max(int(x), 0), self._oxide.size - 2)
        f = min(max(x - i, 0.0), 1.0)
        return ((1.0 - f) * self._table[i] + f * self._table[i + 1]).astype(np.float32)


@lru_cache(maxsize=16)
def _cached_colours(
    lo: float, hi: float, kelvin: float, na: float, substrate: str
) -> MaterialColours:
    return MaterialColours(lo, hi, kelvin, na, substrate=substrate)


def material_colours(
    oxide_min_nm: float,
    oxide_max_nm: float,
    lamp_kelvin: float = 3200,
    na: float = 0.9,
    substrate: str = "sio2_si",
) -> MaterialColours:
    """Shared `MaterialColours`: nearly equal requests reuse one table.

    The range is widened outwards to 0.1 nm so rounding never excludes a requested thickness.
    """
    lo, hi = math.floor(oxide_min_nm * 10) / 10, math.ceil(oxide_max_nm * 10) / 10
    return _cached_colours(lo, hi, float(round(lamp_kelvin)), round(na, 3), substrate)


def optical_contrast(
    layers: int,
    oxide_nm: float,
    lamp_kelvin: float = 3200,
    na: float = 0.9,
    gamma: float | None = 2.2,
    substrate: str = "sio2_si",
) -> np.ndarray:
    """(3,) contrast (I_sub - I_flake) / I_sub per channel; positive means the flake is darker.

    I is the gamma-encoded signal linear^(1/gamma), or the linear signal when gamma is None.
    ``oxide_nm`` matters only on "sio2_si".
    """
    if layers < 0:
        raise ValueError(f"layer count must be >= 0, got {layers}")
    wl = WAVELENGTHS_NM
    oxide, base = substrate_indices(substrate, wl)
    under = _under(oxide, oxide_nm)
    flake = [(mos2_index(wl, layers), layers * LAYER_THICKNESS_NM), *under] if layers else under
    spectra = np.array([stack_reflectance(wl, films, base, na) for films in (under, flake)])
    sub, flk = camera_rgb(spectra, wl, lamp_kelvin)
    if gamma is not None:
        sub, flk = sub ** (1.0 / gamma), flk ** (1.0 / gamma)
    return (sub - flk) / sub
