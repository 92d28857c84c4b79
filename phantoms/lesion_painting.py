"""Painting findings into one thin slice: phases, lobular margins, textures, the lesion mask.

Why this exists: a finding must look like the disease where it lies, in a phantom's noiseless
slice or in a real slice (``hybrid``), where the real noise inside the lesion is kept. Painting
happens in phases so ground glass lies under the vessels, consolidation hides them, and bronchi
stay dark inside consolidation (air bronchograms); disease fills or spares whole secondary
lobules, which gives it geographic, polygonal margins. COVID-19 coverage goes to the lesion
mask, every finding's id to the findings map.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

from hrct_triage.phantoms.findings import FINDINGS, WHOLE_LUNG, Finding, Plan
from hrct_triage.phantoms.geometry import (
    Grid,
    Tubes,
    cell_values,
    cellular,
    sheet_cover,
    tube_cover,
)

__all__ = ["PHASES", "LesionContext", "SliceContext", "paint"]

F32 = NDArray[np.floating[Any]]
F64 = NDArray[np.floating[Any]]

PHASES = ("before_vessels", "after_vessels", "after_airways")
"""When each finding is painted into a slice, in this order (``paint``'s ``phase``)."""
_PHASE = {
    "ggo": "before_vessels",
    "crazy_paving": "before_vessels",
    "perilobular": "before_vessels",
    "consolidation": "after_vessels",
    "reverse_halo": "after_vessels",
    "subpleural_band": "after_vessels",
    "nodule": "after_vessels",
    "mass": "after_vessels",
    "atelectasis": "before_vessels",
    "plate_atelectasis": "after_vessels",
    "effusion": "after_airways",
    "fibrosis": "before_vessels",
    "bronchiectasis": "after_airways",
    "emphysema": "before_vessels",
    "mosaic": "before_vessels",
    "motion": "none",
    "other_pneumonia": "after_vessels",
}


_LOBULE_MM = 12.0  # secondary pulmonary lobules: what gives disease its geographic margins


@dataclass(frozen=True)
class _Lattice:
    """Random values on a regular 3-D lattice (z = depth, y, x), read with cubic B-splines."""

    origin: F64  # (x, y, d) of element [0, 0, 0]
    step: float
    values: F32  # (nz, ny, nx)

    def plane(self, x: F32, y: F32, d: float, order: int = 3) -> F32:
        """Unit-variance smooth noise at the pixels x (columns) and y (rows) of depth d."""
        fz = (d - float(self.origin[2])) / self.step
        k = int(np.clip(math.floor(fz), 0, self.values.shape[0] - 2))
        t = float(np.clip(fz - k, 0.0, 1.0))
        layer = (1.0 - t) * self.values[k] + t * self.values[k + 1]
        cy = (np.asarray(y, dtype=np.float64) - float(self.origin[1])) / self.step
        cx = (np.asarray(x, dtype=np.float64) - float(self.origin[0])) / self.step
        yy, xx = np.meshgrid(cy, cx, indexing="ij")
        out = ndimage.map_coordinates(
            layer, [yy.ravel(), xx.ravel()], order=order, prefilter=False, mode="nearest"
        )
        # a cubic B-spline of white noise keeps ~0.48 of the variance per axis, linear ~2/3
        norm = 0.39 if order == 3 else 0.54
        return (out.reshape(yy.shape) / norm).astype(np.float32)


def _lattice(rng: np.random.Generator, lo: F64, hi: F64, step: float) -> _Lattice:
    shape = np.maximum(np.ceil((hi - lo) / step).astype(int) + 4, 4)
    values = rng.standard_normal((int(shape[2]), int(shape[1]), int(shape[0]))).astype(np.float32)
    return _Lattice(lo - 2 * step, step, values)


def _extent(f: Finding, margin: float) -> tuple[F64, F64]:
    if f.kind in WHOLE_LUNG:
        lo = np.array([-220.0, -220.0, -60.0])
        hi = np.array([220.0, 220.0, 420.0])
        return lo, hi
    c = np.array(f.centre, dtype=np.float64)
    r = np.array(f.radii, dtype=np.float64) * 1.8 + margin
    return c - r, c + r


@dataclass
class LesionContext:
    """Per-study state shared by the slices: noise lattices, lobules and septa per finding."""

    coarse: dict[int, _Lattice] = field(default_factory=dict)  # ~15 mm: outline irregularity
    fine: dict[int, _Lattice] = field(default_factory=dict)  # ~3 mm: texture
    anatomy_seed: int = 0  # the study's lobules
    airways: Tubes | None = None  # the study's airway lumens (bronchiectasis)
    airway_walls: Tubes | None = None
    airway_lobe: NDArray[np.int64] | None = None

    @staticmethod
    def make(plan: Plan, anatomy_seed: int = 0) -> LesionContext:
        ctx = LesionContext(anatomy_seed=anatomy_seed)
        for f in plan.items:
            if f.kind == "motion":
                continue
            rng = np.random.default_rng(f.seed)
            lo, hi = _extent(f, 20.0)
            coarse_mm = 30.0 if f.kind == "mosaic" else 15.0
            ctx.coarse[f.seed] = _lattice(rng, lo, hi, coarse_mm)
            if f.kind not in WHOLE_LUNG:
                ctx.fine[f.seed] = _lattice(rng, lo, hi, 3.0)
        return ctx


@dataclass
class SliceContext:
    """One thin slice being painted: the image, the lung, and what the painters need."""

    grid: Grid
    d: float
    hu: F32
    lung: F32  # 0..1
    lobes: NDArray[np.uint8]
    y: F32
    x: F32
    base: F32  # aerated lung HU before any finding
    study: LesionContext
    height: float
    cav_y: float
    cav_b: float
    residual: F32 | None = None  # real noise to keep inside lesions (hybrids)
    _pleura: F32 | None = None
    _lobules: NDArray[np.int64] | None = None  # each (decimated) pixel's lobule cell

    @property
    def pleura(self) -> F32:
        if self._pleura is None:
            inside = self.lung > 0.5
            self._pleura = (ndimage.distance_transform_edt(inside) * self.grid.spacing).astype(
                np.float32
            )
        return self._pleura

    def apply(
        self,
        box: tuple[slice, slice],
        w: F32,
        target: F32 | float,
        mode: str,
        f: Finding,
        les: F32,
        fnd: NDArray[np.uint8],
    ) -> None:
        """Blend ``target`` into the image with weight ``w`` (inside ``box``).

        ``raise``: only lift what is lighter than the target (vessels stay visible through
        ground glass); ``replace``: move everything toward it; ``add``: add ``target`` HU.
        """
        w = np.clip(w, 0.0, 1.0).astype(np.float32)
        sub = self.hu[box]
        tgt = np.asarray(target, dtype=np.float32)
        if self.residual is not None and mode == "replace":
            # a real bronchus stays dark inside consolidation (air bronchogram)
            w = w * np.clip((sub + 1000.0) / 80.0, 0.0, 1.0)
        if mode == "raise":
            delta = np.maximum(tgt - sub, 0.0) * w
        elif mode == "add":
            delta = tgt * w
        else:
            delta = (tgt - sub) * w
        if self.residual is not None and mode != "add":
            # blending toward the target shrinks the real noise by (1 - w); put it back
            delta = delta + self.residual[box] * w * (delta != 0)
        sub += delta
        if f.covid:
            np.maximum(les[box], w, out=les[box])
        mark = w > 0.5
        fnd[box][mark] = FINDINGS[f.kind]


def _coarse(ctx: SliceContext, f: Finding, box: tuple[slice, slice]) -> F32:
    return ctx.study.coarse[f.seed].plane(ctx.x[0, box[1]], ctx.y[box[0], 0], ctx.d)


def _fine(ctx: SliceContext, f: Finding, box: tuple[slice, slice]) -> F32:
    return ctx.study.fine[f.seed].plane(ctx.x[0, box[1]], ctx.y[box[0], 0], ctx.d, order=1)


def _lobular(ctx: SliceContext, f: Finding, box: tuple[slice, slice]) -> F32:
    """The random value (0..1) of the lobule each pixel lies in: geographic, polygonal margins.

    All findings share the study's lobules (the same cells, found once per slice over the whole
    image at every second pixel); each finding gives them its own values.
    """
    if ctx._lobules is None:
        found: list[NDArray[np.int64]] = []
        cellular(
            ctx.x[:, ::2],
            ctx.y[::2, :],
            ctx.d,
            _LOBULE_MM,
            ctx.study.anatomy_seed,
            0,
            cells_out=found,
        )
        ctx._lobules = found[0]
    r0, r1 = box[0].start // 2, (box[0].stop + 1) // 2
    c0, c1 = box[1].start // 2, (box[1].stop + 1) // 2
    value = cell_values(ctx._lobules[:, r0:r1, c0:c1], f.seed)
    full = np.repeat(np.repeat(value, 2, axis=0), 2, axis=1)
    dr, dc = box[0].start - 2 * r0, box[1].start - 2 * c0
    h = box[0].stop - box[0].start
    w = box[1].stop - box[1].start
    return np.asarray(full[dr : dr + h, dc : dc + w], dtype=np.float32)


def _envelope(
    ctx: SliceContext, f: Finding, pad: float = 1.4
) -> tuple[tuple[slice, slice], F32] | None:
    cx, cy, cd = f.centre
    rx, ry, rd = f.radii
    dz = (ctx.d - cd) / rd
    if abs(dz) > pad:
        return None
    ext = max(rx, ry) * pad
    box = ctx.grid.box(cx - ext, cx + ext, cy - ext, cy + ext)
    if box is None:
        return None
    x = ctx.x[0, box[1]] - np.float32(cx)
    y = ctx.y[box[0], 0] - np.float32(cy)
    c, s = np.float32(math.cos(f.angle)), np.float32(math.sin(f.angle))
    u = x[None, :] * c + y[:, None] * s
    v = -x[None, :] * s + y[:, None] * c
    q = (u / np.float32(rx)) ** 2 + (v / np.float32(ry)) ** 2 + np.float32(dz * dz)
    return box, q.astype(np.float32)


def _septa(ctx: SliceContext, f: Finding, box: tuple[slice, slice], width: float) -> F32:
    """Thickened interlobular or intralobular septa: the walls of small cellular cells."""
    spacing = f.extra if f.kind in ("crazy_paving", "perilobular") else 5.0
    _, f1, f2 = cellular(ctx.x[:, box[1]], ctx.y[box[0], :], ctx.d, spacing, f.seed, f.seed)
    gap = (f2 - f1) / 2.0
    return np.clip(1.0 - gap / width, 0.0, 1.0).astype(np.float32)


def _blob(ctx: SliceContext, f: Finding, les: F32, fnd: NDArray[np.uint8], periph: bool) -> None:
    env = _envelope(ctx, f)
    if env is None:
        return
    box, q = env
    rough = _coarse(ctx, f, box)
    if f.kind in ("nodule", "mass"):
        lumpy = (0.4 if f.kind == "mass" else 0.1) * rough
        if f.kind == "mass" and f.level2 < 0:
            # ground glass round the tumour: irregular, by lobules, fading outward
            reach = (1.0 + f.extra) ** 2
            lobule = _lobular(ctx, f, box)
            halo = np.clip((reach - q + 0.5 * rough + 0.4 * (lobule - 0.5)) * 2.5, 0.0, 1.0)
            halo = halo * ctx.lung[box]
            if halo.any():
                texture = 14.0 * _fine(ctx, f, box) + 40.0 * (lobule - 0.5)
                ctx.apply(box, halo, f.level2 + texture, "raise", f, les, fnd)
        # a tumour's edge is blurred by its infiltration, its inside uneven (necrosis, vessels)
        slope = 3.0 if f.kind == "mass" else 6.0
        solid = np.clip((1.0 - q + lumpy) * slope, 0.0, 1.0) * np.maximum(ctx.lung[box], 0.3)
        if solid.any():
            grain = 6.0 * _fine(ctx, f, box)
            if f.kind == "mass":
                grain = 3.0 * grain + 25.0 * rough
            ctx.apply(box, solid, f.level + grain, "replace", f, les, fnd)
        return
    # disease fills whole secondary lobules or spares them: geographic, polygonal margins
    lobule = _lobular(ctx, f, box)
    occ = np.clip((1.0 - q + 0.3 * rough + 0.7 * (lobule - 0.5)) * 3.0, 0.0, 1.0)
    occ = occ * ctx.lung[box]
    if periph:
        reach = max(f.radii[1] * 2.2, 25.0)
        occ *= np.clip((reach - ctx.pleura[box]) / 8.0, 0.0, 1.0)
    if not occ.any():
        return
    fine = _fine(ctx, f, box)
    texture = 14.0 * fine + 18.0 * rough + 40.0 * (lobule - 0.5)
    if f.kind == "ggo":
        ctx.apply(box, occ, f.level + texture, "raise", f, les, fnd)
    elif f.kind == "crazy_paving":
        ctx.apply(box, occ, f.level + texture, "raise", f, les, fnd)
        lines = _septa(ctx, f, box, 0.7)
        ctx.apply(box, occ * lines * 0.8, f.level2 + 0.5 * texture, "raise", f, les, fnd)
    elif f.kind == "perilobular":
        lines = _septa(ctx, f, box, 1.4) * np.clip(rough + 0.6, 0.0, 1.0)
        ctx.apply(box, occ * 0.5, f.level + texture, "raise", f, les, fnd)
        ctx.apply(box, occ * lines, f.level2, "raise", f, les, fnd)
    elif f.kind == "consolidation":
        ctx.apply(box, occ, f.level + texture, "raise", f, les, fnd)
        core = np.clip((0.55 - q + 0.3 * rough + 0.4 * (lobule - 0.5)) * 4.0, 0.0, 1.0) * occ
        ctx.apply(box, core, f.level2 + 0.3 * texture, "replace", f, les, fnd)
    elif f.kind == "reverse_halo":
        ctx.apply(box, occ, f.level + texture, "raise", f, les, fnd)
        ring = np.clip(1.0 - np.abs(q - 0.75 + 0.1 * rough) / 0.18, 0.0, 1.0) * occ
        ctx.apply(box, ring, f.level2 + 0.3 * texture, "replace", f, les, fnd)
    elif f.kind == "other_pneumonia":
        inlobe = ctx.lobes[box] == f.lobe if f.lobe else np.ones(q.shape, bool)
        dense = np.clip((0.85 - q + 0.2 * rough) * 4.0, 0.0, 1.0) * ctx.lung[box] * inlobe
        rim = np.clip((1.1 - q + 0.3 * rough) * 3.0, 0.0, 1.0) * ctx.lung[box] * inlobe
        ctx.apply(box, rim, f.level2 + texture, "raise", f, les, fnd)
        ctx.apply(box, dense, f.level + 0.3 * texture, "replace", f, les, fnd)


def _band(ctx: SliceContext, f: Finding, les: F32, fnd: NDArray[np.uint8]) -> None:
    env = _envelope(ctx, f, pad=1.1)
    if env is None:
        return
    box, q = env
    noise = _coarse(ctx, f, box)
    depth = ctx.pleura[box]
    line = np.clip(1.0 - np.abs(depth - f.extra + 1.5 * noise) / 1.3, 0.0, 1.0)
    w = line * np.clip((1.0 - q) * 3.0, 0.0, 1.0) * ctx.lung[box]
    ctx.apply(box, w, f.level, "raise", f, les, fnd)


def _plate(ctx: SliceContext, f: Finding, les: F32, fnd: NDArray[np.uint8]) -> None:
    env = _envelope(ctx, f, pad=1.05)
    if env is None:
        return
    box, q = env
    nz = f.level2
    nxy = math.sqrt(max(1.0 - nz * nz, 0.0))
    n = np.array([nxy * math.cos(f.angle), nxy * math.sin(f.angle), nz])
    x = ctx.x[0, box[1]] - np.float32(f.centre[0])
    y = ctx.y[box[0], 0] - np.float32(f.centre[1])
    dist = (
        x[None, :] * np.float32(n[0])
        + y[:, None] * np.float32(n[1])
        + np.float32((ctx.d - f.centre[2]) * n[2])
    )
    w = sheet_cover(
        dist.astype(np.float32), float(n[2]), thickness=f.extra, pixel=ctx.grid.spacing, slab=1.25
    )
    w = w * np.clip((1.0 - q) * 4.0, 0.0, 1.0) * ctx.lung[box]
    ctx.apply(box, w, f.level, "replace", f, les, fnd)


def _dependent(
    ctx: SliceContext,
    f: Finding,
    les: F32,
    fnd: NDArray[np.uint8],
    thickness: float,
    target: float,
    mode: str,
    side: int = 0,
) -> None:
    """A layer along the posterior (dependent) lung border, thicker toward the bases."""
    lung = ctx.lung > 0.5
    if not lung.any():
        return
    rows = np.arange(lung.shape[0], dtype=np.float32)[:, None]
    last = np.where(lung, rows, -1.0).max(axis=0)  # posterior-most lung row per column
    has = last >= 0
    dist_rows = (last[None, :] - rows) * np.float32(ctx.grid.spacing)
    meniscus = 1.0 + 0.5 * np.abs(ctx.x) / 140.0
    thick = np.float32(thickness) * meniscus
    w = np.clip((thick - dist_rows) / 2.0, 0.0, 1.0) * lung * has[None, :]
    if side:
        w = w * ((ctx.x < 0) if side < 0 else (ctx.x > 0))
    box = (slice(0, lung.shape[0]), slice(0, lung.shape[1]))
    if w.any():
        ctx.apply(box, w.astype(np.float32), target, mode, f, les, fnd)


def _spheres(ctx: SliceContext, spheres: F64, grow: float = 0.0) -> F32:
    centres = np.stack([spheres[:, 0], spheres[:, 1], -spheres[:, 2]], axis=1)
    r = spheres[:, 3] + grow
    return tube_cover(ctx.grid, Tubes(centres, centres.copy(), r, r.copy()), -ctx.d)


def _paint_one(ctx: SliceContext, f: Finding, les: F32, fnd: NDArray[np.uint8]) -> None:
    full = (slice(0, ctx.hu.shape[0]), slice(0, ctx.hu.shape[1]))
    if f.kind in ("ggo", "crazy_paving", "perilobular", "consolidation", "reverse_halo"):
        _blob(ctx, f, les, fnd, periph=True)
    elif f.kind in ("nodule", "mass", "other_pneumonia"):
        _blob(ctx, f, les, fnd, periph=False)
        if f.tubes is not None:
            w = tube_cover(ctx.grid, f.tubes, -ctx.d) * ctx.lung
            if w.any():
                ctx.apply(full, w, f.level, "replace", f, les, fnd)
    elif f.kind == "subpleural_band":
        _band(ctx, f, les, fnd)
    elif f.kind == "plate_atelectasis":
        _plate(ctx, f, les, fnd)
    elif f.kind == "atelectasis":
        grade = min(max((ctx.d - f.centre[2]) / (0.3 * ctx.height), 0.0), 1.0)
        if grade > 0:
            _dependent(ctx, f, les, fnd, f.extra * grade, f.level, "raise")
    elif f.kind == "effusion":
        top = f.centre[2]
        grade = min(max((ctx.d - top) / (ctx.height - top), 0.0), 1.0) ** 0.7
        if grade > 0:
            side = int(f.centre[0])
            _dependent(ctx, f, les, fnd, f.extra * grade + 6.0, f.level2, "raise", side)
            _dependent(ctx, f, les, fnd, f.extra * grade, f.level, "replace", side)
    elif f.kind == "emphysema" and f.spheres is not None:
        near = np.abs(f.spheres[:, 2] - ctx.d) < f.spheres[:, 3] + 1.0
        if near.any():
            w = _spheres(ctx, f.spheres[near]) * ctx.lung * 0.9
            ctx.apply(full, w, f.level, "replace", f, les, fnd)
    elif f.kind == "fibrosis" and f.spheres is not None:
        if ctx.d < 0.45 * ctx.height:
            return
        band = np.clip((f.extra - ctx.pleura) / 5.0, 0.0, 1.0) * ctx.lung
        band *= np.clip((ctx.y - np.float32(ctx.cav_y - 0.4 * ctx.cav_b)) / 30.0, 0.0, 1.0)
        band *= min(1.0, (ctx.d - 0.45 * ctx.height) / (0.2 * ctx.height))
        if band.any():
            rows = np.flatnonzero(band.any(axis=1))
            cols = np.flatnonzero(band.any(axis=0))
            sub = (slice(int(rows[0]), int(rows[-1]) + 1), slice(int(cols[0]), int(cols[-1]) + 1))
            lines = np.zeros_like(band)
            lines[sub] = _septa(ctx, f, sub, 0.6)
            ctx.apply(full, band * 0.5, -740.0, "raise", f, les, fnd)
            ctx.apply(full, band * lines * 0.7, f.level, "raise", f, les, fnd)
        near = np.abs(f.spheres[:, 2] - ctx.d) < f.spheres[:, 3] + 1.5
        if near.any():
            wall = _spheres(ctx, f.spheres[near], 1.0) * ctx.lung
            ctx.apply(full, wall, -80.0, "replace", f, les, fnd)
            ctx.apply(
                full, _spheres(ctx, f.spheres[near]) * ctx.lung, f.level2, "replace", f, les, fnd
            )
    elif f.kind == "mosaic":
        rows = np.flatnonzero(ctx.lung.max(axis=1) > 0)
        cols = np.flatnonzero(ctx.lung.max(axis=0) > 0)
        if rows.size == 0:
            return
        full = (slice(int(rows[0]), int(rows[-1]) + 1), slice(int(cols[0]), int(cols[-1]) + 1))
        field_ = 0.6 * _coarse(ctx, f, full) + 1.6 * (_lobular(ctx, f, full) - 0.5)
        air = (ctx.hu[full] < -600.0) * ctx.lung[full]
        dark = np.clip((field_ - 0.2) * 2.0, 0.0, 1.0) * air
        bright = np.clip((-field_ - 0.4) * 2.0, 0.0, 1.0) * air
        ctx.apply(full, dark, f.level, "add", f, les, fnd)
        ctx.apply(full, bright, f.level2, "add", f, les, fnd)
    elif f.kind == "bronchiectasis" and ctx.study.airways is not None:
        lobes = {f.lobe // 10, f.lobe % 10} - {0}
        lobe_of = ctx.study.airway_lobe
        assert lobe_of is not None and ctx.study.airway_walls is not None
        pick = np.isin(lobe_of, list(lobes))
        lumen = ctx.study.airways.take(pick)
        r = np.maximum(lumen.r0, lumen.r1) * f.extra
        dil = Tubes(lumen.p0, lumen.p1, r, r)
        wall_w = tube_cover(ctx.grid, dil.grown(np.maximum(0.8, 0.35 * r)), -ctx.d)
        lum_w = tube_cover(ctx.grid, dil, -ctx.d)
        if wall_w.any():
            ctx.apply(
                full,
                wall_w * np.clip(1.0 - lum_w, 0, 1) * ctx.lung,
                f.level,
                "replace",
                f,
                les,
                fnd,
            )
            ctx.apply(full, lum_w * ctx.lung, f.level2, "replace", f, les, fnd)


def paint(plan: Plan, ctx: SliceContext, les: F32, fnd: NDArray[np.uint8], *, phase: str) -> None:
    """Paint this phase's findings into ``ctx.hu``; COVID-19 coverage goes to ``les`` (max) and
    finding ids to ``fnd``."""
    for f in plan.items:
        if _PHASE[f.kind] != phase:
            continue
        lo, hi = f.d_range()
        if not lo <= ctx.d <= hi:
            continue
        _paint_one(ctx, f, les, fnd)
