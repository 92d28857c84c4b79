"""Shared geometry of the phantom generator: pixel grids, tapered tubes and thin sheets.

Why this exists: most of what makes a chest CT look real is thin and tubular (vessels, bronchi,
ribs, the aorta) or thin and sheet-like (fissures, pleura, subpleural bands), and its look at a
given slice thickness is a matter of partial volume. Rasterising tubes and sheets with the right
partial volume, fast enough for tens of thousands of branches per slice, is done once here and
used by the anatomy, the trees and the lesions.

Coordinates are patient millimetres: x to the patient's left (image columns), y posterior
(image rows), z superior (DICOM's z, so apex slices have the larger z).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

__all__ = [
    "Grid",
    "Tubes",
    "cell_values",
    "cellular",
    "sheet_cover",
    "smooth_noise_2d",
    "tube_cover",
]

F32 = NDArray[np.floating[Any]]
F64 = NDArray[np.floating[Any]]
Mask = NDArray[np.bool_]


@dataclass(frozen=True)
class Grid:
    """Pixel-centre coordinates (mm) of a square axial image centred on x = 0, y = 0."""

    n: int
    spacing: float

    @property
    def coords(self) -> F32:
        return ((np.arange(self.n) - (self.n - 1) / 2.0) * self.spacing).astype(np.float32)

    @property
    def shape(self) -> tuple[int, int]:
        return self.n, self.n

    def xy(self) -> tuple[F32, F32]:
        """Broadcastable x (1, n) and y (n, 1) coordinates."""
        c = self.coords
        return c[None, :], c[:, None]

    def index(self, mm: float) -> float:
        """Fractional pixel index of a coordinate (the same for rows and columns)."""
        return mm / self.spacing + (self.n - 1) / 2.0

    def box(self, x0: float, x1: float, y0: float, y1: float) -> tuple[slice, slice] | None:
        """Rows and columns covering [x0, x1] x [y0, y1] (None when off the image)."""
        c0 = max(math.floor(self.index(x0)), 0)
        c1 = min(math.ceil(self.index(x1)) + 1, self.n)
        r0 = max(math.floor(self.index(y0)), 0)
        r1 = min(math.ceil(self.index(y1)) + 1, self.n)
        if c1 <= c0 or r1 <= r0:
            return None
        return slice(r0, r1), slice(c0, c1)


@dataclass(frozen=True)
class Tubes:
    """Tapered capsules: segment ends (n, 3) in mm and the radius at each end (n,)."""

    p0: F64
    p1: F64
    r0: F64
    r1: F64

    @staticmethod
    def empty() -> Tubes:
        z = np.zeros((0, 3))
        return Tubes(z, z.copy(), np.zeros(0), np.zeros(0))

    @staticmethod
    def concat(parts: list[Tubes]) -> Tubes:
        parts = [p for p in parts if len(p)]
        if not parts:
            return Tubes.empty()
        return Tubes(
            np.concatenate([p.p0 for p in parts]),
            np.concatenate([p.p1 for p in parts]),
            np.concatenate([p.r0 for p in parts]),
            np.concatenate([p.r1 for p in parts]),
        )

    def __len__(self) -> int:
        return int(self.r0.size)

    def take(self, which: NDArray[np.bool_] | NDArray[np.intp]) -> Tubes:
        return Tubes(self.p0[which], self.p1[which], self.r0[which], self.r1[which])

    def grown(self, extra: F64 | float) -> Tubes:
        return Tubes(self.p0, self.p1, self.r0 + extra, self.r1 + extra)

    def scaled(self, factor: float) -> Tubes:
        return Tubes(self.p0, self.p1, self.r0 * factor, self.r1 * factor)

    def subdivided(self, max_len: float) -> Tubes:
        """The same tubes cut into pieces no longer than ``max_len`` (bounded pixel boxes)."""
        length = np.linalg.norm(self.p1 - self.p0, axis=1)
        pieces = np.maximum(np.ceil(length / max_len), 1).astype(np.intp)
        if int(pieces.max(initial=1)) == 1:
            return self
        idx = np.repeat(np.arange(len(self)), pieces)
        first = np.cumsum(pieces) - pieces
        k = np.arange(idx.size) - first[idx]
        a = (k / pieces[idx])[:, None]
        b = ((k + 1) / pieces[idx])[:, None]
        d = self.p1 - self.p0
        dr = self.r1 - self.r0
        return Tubes(
            self.p0[idx] + a * d[idx],
            self.p0[idx] + b * d[idx],
            self.r0[idx] + a[:, 0] * dr[idx],
            self.r0[idx] + b[:, 0] * dr[idx],
        )

    def z_range(self) -> tuple[F64, F64]:
        rmax = np.maximum(self.r0, self.r1)
        lo = np.minimum(self.p0[:, 2], self.p1[:, 2]) - rmax
        hi = np.maximum(self.p0[:, 2], self.p1[:, 2]) + rmax
        return lo, hi


_PAD = 80
_BOXES = (6, 10, 16, 24, 40, 64, 100, 2 * _PAD)


def tube_cover(grid: Grid, tubes: Tubes, z: float, *, blur: float = 0.0) -> F32:
    """Partial-volume coverage (0..1) of every tube cut by the plane at height ``z``.

    Each pixel gets, from the nearest tube, ``clip((r - d) / s + 0.5)`` with ``d`` its 3-D
    distance to the tube's axis, ``r`` the (tapered) radius there and ``s`` the pixel size
    plus ``blur`` mm: a tube thinner than a pixel comes out with less than full contrast, as on
    a scanner. Tubes are batched by pixel-box size and splatted with ``np.maximum.at``, so tens
    of thousands of branches cost a few numpy calls per plane.
    """
    rows, cols = grid.shape
    out = np.zeros((rows + 2 * _PAD, cols + 2 * _PAD), dtype=np.float32)
    if len(tubes):
        lo, hi = tubes.z_range()
        act = np.flatnonzero((lo <= z) & (hi >= z))
        if act.size:
            t = tubes.take(act)
            origin, size = _boxes(grid, t, z)
            lower = 0
            for upper in _BOXES:
                pick = (size > lower) & (size <= upper)
                if pick.any():
                    _splat(grid, out, t.take(pick), z, origin[pick], upper, blur)
                lower = upper
    return out[_PAD : _PAD + rows, _PAD : _PAD + cols]


def _boxes(grid: Grid, t: Tubes, z: float) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """Top-left pixel (row, col) and square box size of the part of each tube near the plane."""
    d = t.p1 - t.p0
    r = np.maximum(t.r0, t.r1)
    dz = d[:, 2]
    flat = np.abs(dz) < 1e-6
    safe = np.where(flat, 1.0, dz)
    ta, tb = (z - r - t.p0[:, 2]) / safe, (z + r - t.p0[:, 2]) / safe
    lo = np.where(flat, 0.0, np.clip(np.minimum(ta, tb), 0.0, 1.0))
    hi = np.where(flat, 1.0, np.clip(np.maximum(ta, tb), 0.0, 1.0))
    a, b = t.p0 + lo[:, None] * d, t.p0 + hi[:, None] * d
    c0 = float(grid.coords[0])
    low = (np.minimum(a[:, :2], b[:, :2]) - r[:, None] - 1.5 - c0) / grid.spacing
    span = (np.abs(a[:, :2] - b[:, :2]) + 2.0 * r[:, None] + 3.0) / grid.spacing
    origin = np.floor(low[:, ::-1]).astype(np.int64)  # (row, col)
    size = np.ceil(span.max(axis=1)).astype(np.int64) + 1
    return origin, np.minimum(size, 2 * _PAD)


def _splat(
    grid: Grid,
    out: F32,
    t: Tubes,
    z: float,
    origin: NDArray[np.int64],
    box: int,
    blur: float,
) -> None:
    sp = grid.spacing
    c0 = float(grid.coords[0])
    steps = np.arange(box)
    rr = np.clip(origin[:, 0:1] + steps, -_PAD, grid.n + _PAD - 1)
    cc = np.clip(origin[:, 1:2] + steps, -_PAD, grid.n + _PAD - 1)
    wy = (c0 + rr * sp - t.p0[:, 1:2])[:, :, None].astype(np.float32)
    wx = (c0 + cc * sp - t.p0[:, 0:1])[:, None, :].astype(np.float32)
    wz = (z - t.p0[:, 2])[:, None, None].astype(np.float32)
    d = (t.p1 - t.p0).astype(np.float32)
    dx, dy, dz = (d[:, i][:, None, None] for i in range(3))
    dd = np.maximum((d * d).sum(axis=1), 1e-9)[:, None, None]
    along = np.clip((wx * dx + wy * dy + wz * dz) / dd, 0.0, 1.0)
    ex, ey, ez = wx - along * dx, wy - along * dy, wz - along * dz
    dist = np.sqrt(ex * ex + ey * ey + ez * ez)
    r0 = t.r0.astype(np.float32)[:, None, None]
    r = r0 + along * (t.r1.astype(np.float32)[:, None, None] - r0)
    cover = np.clip((r - dist) / np.float32(sp + blur) + 0.5, 0.0, 1.0)
    flat = (rr[:, :, None] + _PAD) * out.shape[1] + (cc[:, None, :] + _PAD)
    np.maximum.at(out.reshape(-1), flat.ravel(), cover.ravel())


def sheet_cover(
    distance: F32, normal_z: F32 | float, *, thickness: float, pixel: float, slab: float
) -> F32:
    """Partial volume of a thin sheet (a fissure, a band) in voxels of pixel x pixel x slab mm.

    ``distance`` is each voxel centre's signed 3-D distance to the sheet and ``normal_z`` the
    z component of the sheet's unit normal there. A sheet ``thickness`` mm thick fills a share
    ``thickness / (2 h)`` of the voxels within ``h`` of it, where ``h`` is half the voxel's extent
    along the normal; a triangular profile of that height keeps the integral right, so an
    oblique sheet in a thick slice comes out as a wide faint band and an in-plane one as a
    thin sharp line.
    """
    nz = np.abs(np.asarray(normal_z, dtype=np.float32))
    nxy = np.sqrt(np.maximum(1.0 - nz * nz, 0.0))
    h = 0.5 * (nxy * pixel * 1.2 + nz * slab) + 0.25
    peak = np.minimum(thickness / h, 1.0)
    return np.clip(1.0 - np.abs(distance) / h, 0.0, 1.0) * peak


def smooth_noise_2d(rng: np.random.Generator, shape: tuple[int, int], cell: int) -> F32:
    """Unit-variance random field smooth over ``cell`` pixels (bilinear upsampled lattice)."""
    small = (shape[0] // cell + 3, shape[1] // cell + 3)
    lattice = rng.standard_normal(small).astype(np.float32)
    big = ndimage.zoom(lattice, cell, order=3, prefilter=False)[: shape[0], : shape[1]]
    big -= big.mean()
    return (big / max(float(big.std()), 1e-6)).astype(np.float32)


_M1 = np.uint64(0x9E3779B97F4A7C15)
_M2 = np.uint64(0xBF58476D1CE4E5B9)
_M3 = np.uint64(0x94D049BB133111EB)


def _hash(i: NDArray[np.int64], j: NDArray[np.int64], k: int, seed: int) -> NDArray[np.uint64]:
    """A well-mixed 64-bit hash of integer lattice coordinates (splitmix-style)."""
    with np.errstate(over="ignore"):
        h = (i.astype(np.uint64) * _M1) ^ (j.astype(np.uint64) * _M2)
        h = h ^ (np.uint64(k & 0xFFFFFFFF) * _M3) ^ np.uint64(seed & 0xFFFFFFFF)
        h = (h ^ (h >> np.uint64(30))) * _M2
        h = (h ^ (h >> np.uint64(27))) * _M3
        return np.asarray(h ^ (h >> np.uint64(31)), dtype=np.uint64)


def cellular(
    x: F32,
    y: F32,
    d: float,
    spacing: float,
    seed: int,
    value_seed: int,
    cells_out: list[NDArray[np.int64]] | None = None,
) -> tuple[F32, F32, F32]:
    """Voronoi cells of a jittered 3-D lattice (cellular noise) in one plane.

    ``x`` (1, W) and ``y`` (H, 1) in mm at depth ``d``. Returns each pixel's cell value (0..1,
    drawn with ``value_seed``: the same cells can carry other values), and the distances (mm)
    to the nearest and second-nearest cell centres; where the two are close, the pixel lies on
    a cell wall. Cells ``spacing`` mm apart look like secondary pulmonary lobules; no search
    tree is needed, only the 27 neighbouring lattice cells (hashed once per cell, not per
    pixel, since the cells of a row or column are shared). ``cells_out`` receives each pixel's
    cell (3, H, W), so other values can be given to the same cells with ``cell_values``.
    """
    gx = (np.asarray(x, np.float64) / spacing).ravel()
    gy = (np.asarray(y, np.float64) / spacing).ravel()
    gz = d / spacing
    ix0 = np.floor(gx).astype(np.int64)
    iy0 = np.floor(gy).astype(np.int64)
    iz0 = math.floor(gz)
    # the distinct lattice columns and rows this plane touches, with one margin cell
    ci = np.arange(int(ix0.min()) - 1, int(ix0.max()) + 2)
    cj = np.arange(int(iy0.min()) - 1, int(iy0.max()) + 2)
    shape = (gy.size, gx.size)
    best1 = np.full(shape, np.inf, dtype=np.float32)
    best2 = np.full(shape, np.inf, dtype=np.float32)
    win = np.zeros(shape, dtype=np.int64)  # flat index of the winning cell in (k, j, i)
    scale = 1.0 / 65536.0
    for dk in (-1, 0, 1):
        ck = iz0 + dk
        h = _hash(ci[None, :], cj[:, None], ck, seed)  # (rows of cells, columns of cells)
        jx = (h & np.uint64(0xFFFF)).astype(np.float64) * scale + ci[None, :]
        jy = ((h >> np.uint64(16)) & np.uint64(0xFFFF)).astype(np.float64) * scale + cj[:, None]
        jz = ((h >> np.uint64(32)) & np.uint64(0xFFFF)).astype(np.float64) * scale + ck
        dz2 = ((gz - jz) ** 2).astype(np.float32)
        for dj in (-1, 0, 1):
            rows = iy0 + dj - cj[0]  # (H,) index into the cell rows
            for di in (-1, 0, 1):
                cols = ix0 + di - ci[0]  # (W,)
                px = jx[rows[:, None], cols[None, :]]
                py = jy[rows[:, None], cols[None, :]]
                d2 = ((gx[None, :] - px) ** 2 + (gy[:, None] - py) ** 2).astype(np.float32) + dz2[
                    rows[:, None], cols[None, :]
                ]
                closer = d2 < best1
                np.minimum(best2, np.where(closer, best1, d2), out=best2)
                np.copyto(best1, d2, where=closer)
                flat = ((dk + 1) * cj.size + rows[:, None]) * ci.size + cols[None, :]
                np.copyto(win, np.broadcast_to(flat, shape), where=closer)
    k_idx = win // (cj.size * ci.size)
    rem = win % (cj.size * ci.size)
    cells = np.stack([ci[rem % ci.size], cj[rem // ci.size], k_idx + iz0 - 1])
    value = cell_values(cells, value_seed)
    f1 = np.sqrt(best1) * np.float32(spacing)
    f2 = np.sqrt(best2) * np.float32(spacing)
    if cells_out is not None:
        cells_out.append(cells)
    return value, f1, f2


def cell_values(cells: NDArray[np.int64], value_seed: int) -> F32:
    """Random values (0..1) of lattice cells (3, ...) for one ``value_seed``."""
    hv = _hash(cells[0], cells[1], 0, value_seed) ^ _hash(cells[2], cells[2] * 0, 7, value_seed)
    return ((hv >> np.uint64(40)).astype(np.float32) / np.float32(1 << 24)).astype(np.float32)
