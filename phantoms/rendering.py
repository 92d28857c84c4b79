"""From a patient to HU slices as a scanner reconstructs them, and from HU to stored values.

The reconstruction kernel sets sharpness and noise, breathing adds motion ghosts at the bases,
and texture and noise fields are drawn once per study and windowed per slice. ``render_series``
and ``projection`` are what the DICOM writers use: HU images and COVID lesion masks, nothing else.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, replace

import numpy as np
from scipy import ndimage

from hrct_triage.phantoms.anatomy import (
    AIR,
    CHEST_LENGTH_MM,
    Anatomy,
    Sections,
    lung_mask,
    sections,
    smooth01,
    t_of,
)
from hrct_triage.phantoms.capsules import paint_tubes
from hrct_triage.phantoms.geometry import F32, Grid, Mask
from hrct_triage.phantoms.painting import (
    paint_body,
    paint_lesions,
    paint_lung,
    paint_organs,
    paint_skeleton,
    paint_table,
)

MATRIX = 512  # rows and columns of every CT image and of the localizer


@dataclass(frozen=True)
class Kernel:
    """How a reconstruction kernel looks: its Enhanced CT group, sharpness and noise."""

    group: str  # ConvolutionKernelGroup (Enhanced CT defined terms)
    blur_passes: int  # 3-tap smoothing passes (the point-spread): fewer is sharper
    noise: float  # noise standard deviation relative to the lung kernel's


KERNEL_LOOK = {
    "LUNG": Kernel("LUNG", 1, 1.0),
    "BONE": Kernel("BONE", 0, 1.3),
    "STANDARD": Kernel("SOFT_TISSUE", 3, 0.55),
    "SOFT": Kernel("SOFT_TISSUE", 4, 0.45),
}
KERNELS: tuple[str, ...] = tuple(KERNEL_LOOK)
"""Reconstruction kernels the thin series can have (its ConvolutionKernel); LUNG is the default.
BONE is sharper and noisier, STANDARD and SOFT smoother and quieter, as on a scanner."""


@dataclass(frozen=True)
class Detail:
    """Fine detail of a full-resolution slice; the localizer's coarse pass goes without."""

    tex: F32  # (3, H, W) texture fields
    noise: F32  # (2, 1.5 H, 1.5 W) unit Gaussian fields, windowed and mixed anew per slice
    rng: np.random.Generator
    blur_passes: int  # 3-tap smoothing passes: the reconstruction kernel's sharpness
    noise_sigma: float

    @staticmethod
    def make(rng: np.random.Generator, shape: tuple[int, int]) -> Detail:
        noise = rng.standard_normal((2, shape[0] * 3 // 2, shape[1] * 3 // 2), dtype=np.float32)
        return Detail(_textures(rng, shape), noise, rng, 1, 0.0)

    def sample_noise(self, shape: tuple[int, int]) -> F32:
        """Fresh-looking Gaussian noise without drawing 262k normals per slice: two random
        windows of a larger noise field, mixed at a random angle (still unit variance)."""
        r0, c0, r1, c1 = (int(v) for v in self.rng.integers(0, shape[0] // 2, 4))
        a = float(self.rng.uniform(0.0, 2.0 * math.pi))
        first = self.noise[0, r0 : r0 + shape[0], c0 : c0 + shape[1]]
        second = self.noise[1, r1 : r1 + shape[0], c1 : c1 + shape[1]]
        return first * np.float32(math.cos(a)) + second * np.float32(math.sin(a))


def render(anat: Anatomy, grid: Grid, z: float, detail: Detail | None) -> tuple[F32, Mask, Mask]:
    """One axial slice in HU at table position z, its lung mask and its COVID lesion mask.

    Without ``detail`` (the localizer's coarse pass) texture, vessels, lesions and noise are
    skipped.
    """
    sec = sections(anat, z)
    hu = np.full(grid.shape, AIR, dtype=np.float32)
    paint_table(hu, grid, sec)
    paint_body(hu, grid, sec)
    paint_organs(hu, grid, sec)
    paint_skeleton(hu, grid, sec)
    lung = lung_mask(grid, sec)
    tex = None if detail is None else detail.tex
    paint_lung(hu, grid, lung, sec, anat, tex, z)
    lesions = paint_lesions(hu, grid, lung, anat, tex, z)
    if detail is None:
        return hu, lung, lesions
    paint_tubes(hu, grid, lung, anat, z)
    _motion(hu, grid, sec, anat, z)
    for _ in range(detail.blur_passes):
        hu = _blur3(hu)
    if detail.noise_sigma > 0:
        hu += detail.sample_noise(grid.shape) * np.float32(detail.noise_sigma)
    return hu, lung, lesions


def _blur3(a: F32, side: float = 0.2) -> F32:
    """Separable 3-tap smoothing (sigma ~0.6 px per pass): the scanner's point-spread."""
    w_side, w_mid = np.float32(side), np.float32(1.0 - 2.0 * side)
    rows = a * w_mid
    rows[1:] += a[:-1] * w_side
    rows[:-1] += a[1:] * w_side
    out = rows * w_mid
    out[:, 1:] += rows[:, :-1] * w_side
    out[:, :-1] += rows[:, 1:] * w_side
    return out


def _motion(hu: F32, grid: Grid, sec: Sections, anat: Anatomy, z: float) -> None:
    """Breathing/cardiac motion at the bases: inside the thorax, a blurred ghost of the slice
    shifted by a few pixels (double contours at the heart and diaphragm, smeared vessels)."""
    t = t_of(anat, z)
    hit = grid.ellipse(sec.cavity)
    if anat.motion_px == 0 or t < 0.5 or hit is None:
        return
    box, inside = hit
    w = np.float32(0.45 * smooth01((t - 0.5) / 0.2))
    ghost = np.roll(hu, anat.motion_px, axis=0)[box]
    ghost = ndimage.uniform_filter1d(ghost, anat.motion_px * 2 + 1, axis=0)
    np.copyto(hu[box], (1.0 - w) * hu[box] + w * ghost, where=inside)


def _textures(rng: np.random.Generator, shape: tuple[int, int]) -> F32:
    """Three unit-variance random fields (fine grain plus blotches) for lung and lesion texture."""
    out = np.empty((3, *shape), dtype=np.float32)
    small = (shape[0] // 8, shape[1] // 8)
    for i in range(3):
        fine = _blur3(_blur3(rng.standard_normal(shape, dtype=np.float32), 0.25), 0.25)
        coarse = ndimage.zoom(rng.standard_normal(small, dtype=np.float32), 8, order=1)
        field = fine / fine.std() + 0.7 * coarse / coarse.std()
        out[i] = field / field.std()
    return out


def slice_positions(anat: Anatomy, count: int) -> list[float]:
    """Slice centres spread evenly from the apex end to the bases (table order)."""
    step = CHEST_LENGTH_MM / count
    return [round(anat.z_top - (k + 0.5) * step, 4) for k in range(count)]


def render_series(
    anat: Anatomy, grid: Grid, count: int, detail: Detail, *, blur_passes: int, noise: float
) -> Iterator[tuple[int, float, F32, Mask]]:
    """The slices of an axial series in table order: (index, z, HU, COVID lesion mask).

    ``blur_passes`` and ``noise`` (relative to the patient's ``noise_sigma``) are the series'
    reconstruction kernel and slice thickness.
    """
    detail = replace(detail, blur_passes=blur_passes, noise_sigma=anat.noise_sigma * noise)
    for k, z in enumerate(slice_positions(anat, count)):
        hu, _, lesions = render(anat, grid, z, detail)
        yield k, z, hu, lesions


def projection(anat: Anatomy, *, width_mm: float, height_mm: float, z_top: float) -> F32:
    """A frontal projection (water-equivalent cm along y) of the coarse anatomy, 512 x 512."""
    nz, nx, ny = 80, 128, 96
    grid = Grid(
        ((np.arange(nx) - (nx - 1) / 2.0) * width_mm / nx).astype(np.float32),
        ((np.arange(ny) - (ny - 1) / 2.0) * 380.0 / ny).astype(np.float32),
    )
    dy_cm = 380.0 / ny / 10.0
    rows = []
    for k in range(nz):
        z = z_top - (k + 0.5) * height_mm / nz
        hu, _, _ = render(anat, grid, z, None)
        rows.append(np.clip(hu + 1000.0, 0.0, None).sum(axis=0) * dy_cm / 1000.0)
    proj = np.stack(rows).astype(np.float32)
    return ndimage.zoom(proj, (MATRIX / nz, MATRIX / nx), order=1).astype(np.float32)


def stored_pixels(hu: F32, anat: Anatomy, outside: Mask | None = None) -> bytes:
    """Stored values for HU = stored - 1024: 12-bit unsigned, or GE-like signed 16-bit with
    the padding value outside the reconstruction circle."""
    stored = np.clip(np.rint(hu) + 1024.0, 0.0, 4095.0)
    if not anat.signed_pixels:
        return stored.astype("<u2").tobytes()
    out = stored.astype("<i2")
    if outside is not None:
        out[outside] = PADDING
    return out.tobytes()


PADDING = -2000


def outside_circle(grid: Grid) -> Mask:
    radius = (grid.x.size / 2.0) * float(grid.x[1] - grid.x[0])
    return (grid.x[None, :] ** 2 + grid.y[:, None] ** 2) > radius**2
