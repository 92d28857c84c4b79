"""Synthetic COVID-19 lesions inserted into a real chest CT: hybrids for evaluation only.

Why this exists: the project has no real COVID-19 CT with HU and masks it may use, and phantom
results measure the phantoms. A hybrid keeps everything real (anatomy, vessels, bronchi, the
scanner's noise and kernel) and adds lesions whose extent is known exactly, so sensitivity and
the pointing game can be measured on real backgrounds. Hybrids are for evaluation; they must
never be used for training (their backgrounds are the development series).

The lesions are the generator's own (``findings``, ``lesion_painting``): placed from an atlas
built from the real lung mask (peripheral, posterior, lower, bilateral), painted on thin
sub-slices across each real slice's thickness and averaged (partial volume), with ground glass
lifting only what is lighter than it (the real vessels stay visible through it), consolidation
hiding the vessels but not the bronchi (air bronchograms), and the real noise kept inside the
lesion.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

from hrct_triage.phantoms.findings import Atlas, Plan, draw_findings
from hrct_triage.phantoms.geometry import Grid
from hrct_triage.phantoms.lesion_painting import PHASES, LesionContext, SliceContext, paint

__all__ = ["Hybrid", "atlas_from_mask", "insert_covid"]

F32 = NDArray[np.floating[Any]]
F64 = NDArray[np.floating[Any]]
Mask = NDArray[np.bool_]


@dataclass(frozen=True)
class Hybrid:
    """A real volume with synthetic COVID-19: HU (same shape), lesion mask and the plan."""

    hu: F32
    lesion: Mask
    plan: Plan
    severity: str


def atlas_from_mask(lung: Mask, pixel_spacing: float, depths: F64, step_mm: float = 4.0) -> Atlas:
    """An atlas (coarse lung points with side, pleural distance, relative position) from a
    real lung mask (slices, rows, columns), slice k at depth ``depths[k]`` below the apex."""
    stride = max(1, round(step_mm / pixel_spacing))
    n = lung.shape[1]
    coords = (np.arange(n) - (n - 1) / 2.0) * pixel_spacing
    pts: list[F64] = []
    pleura: list[F64] = []
    post: list[F64] = []
    used = np.flatnonzero(lung.reshape(len(lung), -1).any(axis=1))
    top = float(depths[used[0]]) if used.size else 0.0
    height = float(depths[used[-1]] - top) if used.size else 1.0
    for k in used:
        small = lung[k, ::stride, ::stride]
        dist = ndimage.distance_transform_edt(small) * pixel_spacing * stride
        rr, cc = np.nonzero(small)
        x = coords[::stride][cc]
        y = coords[::stride][rr]
        pts.append(np.stack([x, y, np.full(rr.size, depths[k] - top)], axis=1))
        pleura.append(dist[rr, cc])
        lo, hi = float(y.min()), float(y.max())
        post.append((y - lo) / max(hi - lo, 1.0))
    allp = np.concatenate(pts)
    midline = float(np.median(allp[:, 0]))
    lower = np.clip(allp[:, 2] / max(height, 1.0), 0.0, 1.0)
    right = allp[:, 0] < midline
    # lobes are not known on a real mask: upper/lower by height, so lesions favour the bases
    lobe = np.where(right, np.where(lower < 0.45, 1, 3), np.where(lower < 0.45, 4, 5))
    allp[:, 2] += top
    return Atlas(
        allp,
        lobe.astype(np.int64),
        np.concatenate(pleura),
        np.concatenate(post),
        lower,
        max(height, 1.0),
    )


def insert_covid(
    hu: F32,
    lung: Mask,
    *,
    pixel_spacing: float,
    slice_thickness: float,
    z: F64,
    seed: int,
    severity: str | None = None,
    sub_mm: float = 1.25,
) -> Hybrid:
    """Insert COVID-19 lesions into ``hu`` (slices, rows, columns, apex first; z = DICOM slice
    positions in mm) inside the filled lung mask ``lung``. Deterministic given ``seed``."""
    rng = np.random.default_rng([seed, 23, 7])
    depths = float(z[0]) - np.asarray(z, dtype=np.float64)
    at = atlas_from_mask(lung, pixel_spacing, depths)
    plan = draw_findings(rng, at, label="covid", findings=(), severity=severity)
    study = LesionContext.make(plan, anatomy_seed=seed)
    grid = Grid(hu.shape[1], pixel_spacing)
    x, y = grid.xy()
    n_sub = max(1, math.ceil(slice_thickness / sub_mm))
    offsets = (np.arange(n_sub) + 0.5) / n_sub - 0.5
    weights = 1.0 - 0.35 * np.abs(offsets) * 2.0
    weights = weights / weights.sum()
    out = hu.copy()
    lesion = np.zeros(hu.shape, dtype=bool)
    lobes = np.zeros(hu.shape[1:], dtype=np.uint8)
    for k in range(hu.shape[0]):
        if not lung[k].any():
            continue
        real = hu[k].astype(np.float32)
        residual = (real - ndimage.median_filter(real, size=3)).astype(np.float32)
        lung_k = lung[k].astype(np.float32)
        acc = np.zeros_like(real)
        cover = np.zeros_like(real)
        touched = False
        pleura = None  # the lung's distance to the pleura: the same for every sub-slice
        for off, w in zip(offsets, weights, strict=True):
            d = float(depths[k] + off * slice_thickness)
            ctx = SliceContext(
                grid,
                d,
                real.copy(),
                lung_k,
                lobes,
                y,
                x,
                real,
                study,
                at.height,
                0.0,
                100.0,
                residual=residual,
                _pleura=pleura,
            )
            les = np.zeros_like(real)
            fnd = np.zeros(real.shape, dtype=np.uint8)
            for phase in PHASES:
                paint(plan, ctx, les, fnd, phase=phase)
            pleura = ctx._pleura
            acc += np.float32(w) * ctx.hu
            cover += np.float32(w) * les
            touched |= bool(les.any())
        if touched:
            # Only the pixels the painting changed take the painted value: the rest keep the
            # scanner's, including those the clip would move (padding outside the field of view
            # at -2048 or -3024 HU, and air whose noise reaches below -1024 HU).
            painted = np.clip(np.round(acc), -1024.0, 3071.0)
            out[k] = np.where(np.abs(acc - real) >= 0.5, painted, hu[k])
            lesion[k] = cover > 0.5
    return Hybrid(out, lesion, plan, plan.severity)
