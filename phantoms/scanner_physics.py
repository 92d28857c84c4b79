"""The scanner: what turns an ideal HU object into the image a CT scanner sends.

Why this exists: a classifier sees noise and sharpness before it sees anatomy. Real images
differ from ideal ones in ways that are easy to model and that a phantom must reproduce or a
model will learn them as the difference between "phantom" and "patient":

* the reconstruction kernel blurs (its MTF) and, for lung and bone kernels, enhances edges
  (the dark rim beside a bright vessel);
* noise is not white: filtered back-projection gives it a ramp-shaped power spectrum that the
  kernel's window rolls off, peaking at 0.1-0.5 cycles/mm depending on the kernel;
* noise is not uniform: it grows with the attenuation along the rays through a point (wide
  shoulders, lateral rays through the liver) and is lower in air beside the patient;
* photon starvation through dense bone gives streaks;
* breathing and the heartbeat double and blur edges at the bases;
* the reconstruction circle cuts off anything outside it (arms, a big patient), with a bright
  rim where the body is truncated; stored values cannot go below -1024 HU.

Partial volume along z is done by the caller, which renders thin sub-slices and averages them
with the slice sensitivity profile before handing the volume here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

from hrct_triage.phantoms.geometry import Grid

__all__ = ["KERNELS", "Kernel", "Scanner", "draw_scanner", "nps_shape", "paint_table", "scan"]

F32 = NDArray[np.floating[Any]]
F64 = NDArray[np.floating[Any]]


@dataclass(frozen=True)
class Kernel:
    """A reconstruction kernel: object sharpness and the noise power spectrum's shape."""

    name: str
    blur_mm: float  # Gaussian sigma of the point spread
    sharpen: float  # unsharp-mask gain (edge enhancement; 0 for soft kernels)
    sharpen_mm: float  # its Gaussian sigma
    nps_peak: float  # cycles/mm of the ramp-and-window part's maximum
    nps_rise: float  # low-frequency exponent of that part
    nps_fall: float  # how sharply the window rolls it off
    nps_low: float  # weight of a low-frequency (exponential) component
    nps_low_scale: float  # its e-folding frequency (cycles/mm)
    noise_5mm: tuple[float, float]  # range of soft-tissue noise SD (HU) at 5 mm


KERNELS: dict[str, Kernel] = {
    "LUNG": Kernel("LUNG", 0.3, 0.7, 1.0, 0.45, 1.6, 4.0, 0.08, 0.08, (35.0, 90.0)),
    "SHARP": Kernel("SHARP", 0.25, 0.9, 0.8, 0.52, 1.7, 5.0, 0.05, 0.08, (45.0, 110.0)),
    "MEDIUM": Kernel("MEDIUM", 0.45, 0.35, 1.2, 0.32, 1.4, 3.0, 0.15, 0.08, (18.0, 45.0)),
    "STANDARD": Kernel("STANDARD", 0.45, 0.0, 1.0, 0.15, 1.0, 2.0, 0.8, 0.06, (8.0, 20.0)),
}


def nps_shape(kernel: Kernel, freq: F64) -> F64:
    """Relative NPS at radial frequencies ``freq`` (cycles/mm), maximum 1."""
    f = np.maximum(freq, 1e-6) / kernel.nps_peak
    a, b = kernel.nps_rise, kernel.nps_fall
    ramp = f**a * np.exp((a / b) * (1.0 - f**b))
    w = kernel.nps_low
    shape = (1.0 - w) * ramp + w * np.exp(-freq / kernel.nps_low_scale)
    return np.asarray(shape / max(float(shape.max()), 1e-12))


@dataclass(frozen=True)
class Scanner:
    """One acquisition: kernel, noise level (SD in soft tissue at 5 mm) and artefacts."""

    kernel: Kernel
    noise_sd: float
    attenuation_gamma: float  # how strongly noise follows ray attenuation
    streaks: float  # gain of photon-starvation streaks
    truncation_hu: float  # brightening at a truncated body edge


def draw_scanner(rng: np.random.Generator, kernel: str, noise_sd: float | None) -> Scanner:
    """A kernel by name ("RANDOM" draws one, lung-like kernels more often) and a noise level."""
    name = kernel.upper()
    if name == "RANDOM":
        name = str(rng.choice(list(KERNELS), p=[0.45, 0.15, 0.2, 0.2]))
    k = KERNELS[name]
    sd = float(rng.uniform(*k.noise_5mm)) if noise_sd is None else float(noise_sd)
    return Scanner(
        kernel=k,
        noise_sd=sd,
        attenuation_gamma=float(rng.uniform(0.3, 0.4)),
        streaks=float(rng.uniform(0.3, 1.0)),
        truncation_hu=float(rng.uniform(60.0, 180.0)),
    )


def paint_table(hu: F32, grid: Grid, y_top: float) -> None:
    """Curved carbon-fibre cradle (two shells round a foam core) with a thin mattress on it."""
    x, y = grid.xy()
    top = np.float32(y_top) + np.float32(0.0011) * x * x
    depth = y - top
    wide = np.abs(x) < 215.0
    pad = (depth > -2.0) & (depth < 0.0) & wide
    hu[pad] = -880.0
    hu[(depth >= 0.0) & (depth < 1.6) & wide] = 300.0
    hu[(depth >= 1.6) & (depth < 30.0) & wide] = -960.0
    hu[(depth >= 30.0) & (depth < 31.6) & wide] = 300.0
    base = (y > np.float32(y_top + 55.0)) & (y < np.float32(y_top + 58.0)) & (np.abs(x) < 170.0)
    hu[base] = 500.0


# ------------------------------------------------------------------------------------------
# Noise
# ------------------------------------------------------------------------------------------


def _noise_bank(rng: np.random.Generator, kernel: Kernel, n: int, spacing: float) -> F32:
    """Six periodic unit-variance noise fields with the kernel's NPS (shifted per slice)."""
    f = np.fft.fftfreq(n, d=spacing)
    fr = np.sqrt(f[:, None] ** 2 + f[None, :] ** 2)
    amp = np.sqrt(nps_shape(kernel, fr)).astype(np.float32)
    bank = np.empty((6, n, n), dtype=np.float32)
    for i in range(6):
        white = rng.standard_normal((n, n)).astype(np.float32)
        field = np.fft.ifft2(np.fft.fft2(white) * amp).real.astype(np.float32)
        bank[i] = field / max(float(field.std()), 1e-6)
    return bank


def _noise_map(hu: F32, sp: float, gamma: float) -> F32:
    """Relative noise SD from the attenuation of the rays through each point.

    On a coarse copy of the slice, line integrals along 12 directions give the transmission of
    every ray; the variance at a point is the mean over directions of 1/transmission (FBP),
    softened by ``gamma`` for the bowtie filter and tube-current modulation.
    """
    step = max(1, hu.shape[0] // 64)
    small = hu[::step, ::step]
    mu = np.clip((small + 1000.0) / 1000.0, 0.0, 3.0).astype(np.float32) * np.float32(0.02)
    mm = sp * step
    acc = np.zeros_like(mu)
    for angle in np.linspace(0.0, 180.0, 12, endpoint=False):
        rot = ndimage.rotate(mu, angle, reshape=False, order=1, mode="constant")
        line = rot.sum(axis=1, keepdims=True) * np.float32(mm)
        back = ndimage.rotate(
            np.broadcast_to(line, rot.shape), -angle, reshape=False, order=1, mode="nearest"
        )
        acc += np.exp(np.minimum(back, 12.0))
    rel = (acc / 12.0) ** gamma
    big = ndimage.zoom(rel, step, order=1)[: hu.shape[0], : hu.shape[1]]
    if big.shape != hu.shape:
        big = np.pad(
            big, ((0, hu.shape[0] - big.shape[0]), (0, hu.shape[1] - big.shape[1])), mode="edge"
        )
    return big.astype(np.float32)


def _streaks(hu: F32, grid: Grid, rng: np.random.Generator, sd: float, gain: float) -> F32:
    """Photon-starvation streaks along the most attenuated rays (shoulders, dense bone)."""
    out = np.zeros_like(hu)
    step = max(1, hu.shape[0] // 64)
    small = hu[::step, ::step]
    mu = np.clip((small + 1000.0) / 1000.0, 0.0, 3.0).astype(np.float32)
    mm = grid.spacing * step
    x, y = grid.xy()
    n_small = small.shape[0]
    centre = (n_small - 1) / 2.0
    rays: list[tuple[float, float, float]] = []
    for angle in np.linspace(0.0, 180.0, 24, endpoint=False):
        rot = ndimage.rotate(mu, angle, reshape=False, order=1, mode="constant")
        water_mm = rot.sum(axis=1) * mm  # water-equivalent path of each ray
        excess = np.clip((water_mm - 480.0) / 80.0, 0.0, None)
        for i in np.flatnonzero(excess > 0):
            rays.append((float(excess[i]), math.radians(angle), (i - centre) * mm))
    rays.sort(reverse=True)
    for excess_i, th, s in rays[:12]:
        amp = sd * gain * excess_i * float(rng.normal(0.0, 1.0))
        dist = np.abs(x * np.float32(math.sin(th)) + y * np.float32(math.cos(th)) - s)
        out += np.float32(amp) * np.exp(-((dist / np.float32(mm * 0.6)) ** 2))
    return out


# ------------------------------------------------------------------------------------------
# The whole chain
# ------------------------------------------------------------------------------------------


def _kernel_filter(img: F32, kernel: Kernel, sp: float) -> F32:
    out = ndimage.gaussian_filter(img, kernel.blur_mm / sp) if kernel.blur_mm > 0 else img
    if kernel.sharpen > 0:
        low = ndimage.gaussian_filter(out, kernel.sharpen_mm / sp)
        out = out + np.float32(kernel.sharpen) * (out - low)
    return np.asarray(out, dtype=np.float32)


def _motion(img: F32, amount: float, sp: float, k: int, n: int) -> F32:
    """Breathing and cardiac motion in the lower half: a shifted, blurred ghost blended in."""
    frac = k / max(n - 1, 1)
    if amount <= 0 or frac < 0.45:
        return img
    w = np.float32(min(0.5, 0.5 * (frac - 0.45) / 0.25))
    px = amount / sp
    ghost = ndimage.shift(img, (px, 0.4 * px), order=1, mode="nearest")
    ghost = ndimage.uniform_filter1d(ghost, max(1, int(px)) * 2 + 1, axis=0)
    return np.asarray((1 - w) * img + w * ghost, dtype=np.float32)


def _metal_streaks(grid: Grid, rng: np.random.Generator, points: F64, gain: float) -> F32:
    """The starburst round metal: alternating dark and bright lines through each object,
    fading with distance (beam hardening and photon starvation along the rays through it)."""
    x, y = grid.xy()
    out = np.zeros(grid.shape, dtype=np.float32)
    width = np.float32(0.7 * grid.spacing)
    for mx, my, r in points:
        angles = np.linspace(0.0, np.pi, 14, endpoint=False) + float(rng.uniform(0, np.pi / 14))
        amp = float(rng.uniform(100.0, 300.0)) * min(r / 1.5, 2.0) * gain
        dx = x - np.float32(mx)
        dy = y - np.float32(my)
        dist = np.sqrt(dx * dx + dy * dy)
        fade = np.exp(-dist / np.float32(50.0)) * np.clip(dist / np.float32(3.0 * r), 0.0, 1.0)
        for i, th in enumerate(angles):
            across = np.abs(dx * np.float32(math.sin(th)) - dy * np.float32(math.cos(th)))
            sign = 1.0 if i % 2 == 0 else -1.3  # dark bands are the stronger ones
            out += np.float32(amp * sign) * np.exp(-((across / width) ** 2)) * fade
    return out


def scan(
    volume: F32,
    grid: Grid,
    scanner: Scanner,
    thickness: float,
    rng: np.random.Generator,
    motion_mm: float = 0.0,
    *,
    metal: F64 | None = None,
    depths: F64 | None = None,
) -> F32:
    """Kernel, noise, streaks, motion, reconstruction circle and storage, slice by slice.

    ``metal`` (n, 4: x, y, depth, radius in mm) are the metal objects of the study and
    ``depths`` the slice centres' depths, so each slice gets the streaks of the metal it cuts.
    """
    n = grid.n
    sp = grid.spacing
    bank = _noise_bank(rng, scanner.kernel, n, sp)
    sd = scanner.noise_sd * math.sqrt(5.0 / max(thickness, 0.5))
    x, y = grid.xy()
    r = np.sqrt(x * x + y * y)
    radius = np.float32(n / 2.0 * sp)
    outside = r > radius
    rim = np.exp(-(radius - r) / np.float32(6.0)).astype(np.float32)
    maps = [_noise_map(volume[k], sp, scanner.attenuation_gamma) for k in range(len(volume))]
    soft = [(volume[k] > 0) & (volume[k] < 100) for k in range(len(volume))]
    ref = float(np.median(np.concatenate([m[s] for m, s in zip(maps, soft, strict=True)])))
    out = np.empty_like(volume)
    for k in range(len(volume)):
        img = _motion(volume[k], motion_mm, sp, k, len(volume))
        img = _kernel_filter(img, scanner.kernel, sp)
        coef = rng.normal(size=3)
        coef /= np.linalg.norm(coef)
        idx = rng.choice(6, size=3, replace=False)
        noise = np.zeros((n, n), dtype=np.float32)
        for c, i in zip(coef, idx, strict=True):
            shifted = np.roll(bank[i], tuple(int(v) for v in rng.integers(0, n, 2)), axis=(0, 1))
            noise += np.float32(c) * (shifted.T if rng.random() < 0.5 else shifted)
        img = img + noise * maps[k] * np.float32(sd / ref)
        if scanner.streaks > 0:
            img = img + _streaks(volume[k], grid, rng, sd, scanner.streaks)
        if metal is not None and depths is not None and len(metal):
            cut = np.abs(metal[:, 2] - depths[k]) < metal[:, 3] + thickness / 2.0
            if cut.any():
                pts = metal[cut][:, [0, 1, 3]]
                img = img + _metal_streaks(grid, rng, pts, scanner.streaks)
        body_cut = (volume[k] > -500.0) & outside
        if body_cut.any():
            img = img + np.float32(scanner.truncation_hu) * rim * (volume[k] > -500.0)
        img[outside] = -1024.0
        out[k] = img
    return np.clip(np.round(out), -1024.0, 3071.0).astype(np.float32)
