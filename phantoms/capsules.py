"""Painting vessels and bronchi (capsules) where they cross one slice, with soft edges.

Thousands of small vessels cost a handful of numpy calls: segments are batched by the size of
the pixel box they touch and splatted with ``np.maximum.at``.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from hrct_triage.phantoms.anatomy import AIR, BLOOD, MUSCLE, Anatomy, Vessels
from hrct_triage.phantoms.geometry import F32, Grid, Mask
from hrct_triage.phantoms.vessels import airways

_PAD = 64  # margin of the scratch image capsules are splatted into (no bounds checks needed)


def _capsule_weights(grid: Grid, tubes: Vessels, z: float, extra: float = 0.0) -> F32:
    """Coverage (0..1, soft edged) of every tube segment crossing the plane at z.

    Segments are evaluated in batches of equal-sized pixel boxes and splatted with
    ``np.maximum.at``, so thousands of small vessels cost a handful of numpy calls.
    """
    radius = tubes.radius + extra
    act = _crossing(tubes, z, extra)
    rows, cols = grid.shape
    weight = np.zeros((rows + 2 * _PAD, cols + 2 * _PAD), dtype=np.float32)
    if act.size:
        p0, d, r = tubes.p0[act], tubes.p1[act] - tubes.p0[act], radius[act]
        origin, size = _capsule_boxes(grid, p0, d, r, z)
        for lo, hi in ((0, 8), (8, 16), (16, 32), (32, 64), (64, 2 * _PAD)):
            pick = (size > lo) & (size <= hi)
            if pick.any():
                _splat(grid, weight, p0[pick], d[pick], r[pick], z, origin[pick], hi)
    return weight[_PAD : _PAD + rows, _PAD : _PAD + cols]


def _crossing(tubes: Vessels, z: float, extra: float = 0.0) -> NDArray[np.intp]:
    """Indices of the segments that come within their radius of the plane at z."""
    radius = tubes.radius + extra
    lo_z = np.minimum(tubes.p0[:, 2], tubes.p1[:, 2]) - radius
    hi_z = np.maximum(tubes.p0[:, 2], tubes.p1[:, 2]) + radius
    return np.flatnonzero((lo_z <= z) & (hi_z >= z))


def _capsule_boxes(
    grid: Grid, p0: NDArray[np.float64], d: NDArray[np.float64], r: NDArray[np.float64], z: float
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """Top-left pixel (row, col) and box size of the part of each segment near the plane."""
    dz = d[:, 2]
    flat = np.abs(dz) < 1e-6
    safe = np.where(flat, 1.0, dz)
    ta, tb = (z - r - p0[:, 2]) / safe, (z + r - p0[:, 2]) / safe
    lo = np.where(flat, 0.0, np.clip(np.minimum(ta, tb), 0.0, 1.0))
    hi = np.where(flat, 1.0, np.clip(np.maximum(ta, tb), 0.0, 1.0))
    a, b = p0 + lo[:, None] * d, p0 + hi[:, None] * d
    spacing = float(grid.x[1] - grid.x[0])
    low = (np.minimum(a[:, :2], b[:, :2]) - r[:, None] - 1.0 - [grid.x[0], grid.y[0]]) / spacing
    span = (np.abs(a[:, :2] - b[:, :2]) + 2.0 * r[:, None] + 2.0) / spacing
    origin = np.floor(low[:, ::-1]).astype(np.int64)  # (row, col)
    size = np.ceil(span.max(axis=1)).astype(np.int64) + 2
    return origin, np.minimum(size, 2 * _PAD)


def _splat(
    grid: Grid,
    weight: F32,
    p0: NDArray[np.float64],
    d: NDArray[np.float64],
    r: NDArray[np.float64],
    z: float,
    origin: NDArray[np.int64],
    box: int,
) -> None:
    spacing = float(grid.x[1] - grid.x[0])
    steps = np.arange(box)
    rr = np.clip(origin[:, 0:1] + steps, -_PAD, grid.shape[0] + _PAD - 1)  # (n, box)
    cc = np.clip(origin[:, 1:2] + steps, -_PAD, grid.shape[1] + _PAD - 1)
    wy = (float(grid.y[0]) + rr * spacing - p0[:, 1:2])[:, :, None]  # (n, box, 1)
    wx = (float(grid.x[0]) + cc * spacing - p0[:, 0:1])[:, None, :]  # (n, 1, box)
    wz = (z - p0[:, 2])[:, None, None]
    dx, dy, dz = (d[:, i][:, None, None] for i in range(3))
    along = np.clip((wx * dx + wy * dy + wz * dz) / (d * d).sum(axis=1)[:, None, None], 0.0, 1.0)
    dist = np.sqrt((wx - along * dx) ** 2 + (wy - along * dy) ** 2 + (wz - along * dz) ** 2)
    cover = np.clip((r[:, None, None] - dist) / 0.7 + 0.5, 0.0, 1.0).astype(np.float32)
    flat = (rr[:, :, None] + _PAD) * weight.shape[1] + (cc[:, None, :] + _PAD)
    np.maximum.at(weight.reshape(-1), flat.ravel(), cover.ravel())


def paint_tubes(hu: F32, grid: Grid, lung: Mask, anat: Anatomy, z: float) -> None:
    """Bronchi (air with a wall) and pulmonary vessels (blood, thinning to the periphery)."""
    bronchi = airways(anat)
    if _crossing(bronchi, z, 2.0).size:
        np.copyto(hu, np.float32(MUSCLE), where=_capsule_weights(grid, bronchi, z, 1.8) > 0.5)
        np.copyto(hu, np.float32(AIR), where=_capsule_weights(grid, bronchi, z) > 0.5)
    if anat.vessels is not None and _crossing(anat.vessels, z).size:
        cover = _capsule_weights(grid, anat.vessels, z) * lung
        hu += (BLOOD - hu) * cover
