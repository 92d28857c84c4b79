"""Painting one axial slice of the chest in HU: table, body, organs, bones, lung and lesions."""

from __future__ import annotations

import math

import numpy as np

from hrct_triage.phantoms.anatomy import (
    AIR,
    BLOOD,
    CARTILAGE,
    CORTEX,
    CSF,
    DISC,
    FAT,
    LIVER,
    MARROW,
    MEDIASTINAL_FAT,
    MUSCLE,
    SKIN,
    TABLE_FOAM,
    TABLE_SHELL,
    Anatomy,
    Lesion,
    Sections,
)
from hrct_triage.phantoms.geometry import F32, Box, Ellipse, Grid, Mask


def _fill(hu: F32, grid: Grid, e: Ellipse | None, value: float) -> None:
    if e is None:
        return
    hit = grid.ellipse(e)
    if hit is not None:
        box, inside = hit
        np.copyto(hu[box], np.float32(value), where=inside)


def _bone(hu: F32, grid: Grid, e: Ellipse, core: float, cortex_mm: float = 1.6) -> None:
    """A bone cut: cortical ring around a cancellous (or cartilage) core."""
    _fill(hu, grid, e, CORTEX if core != CARTILAGE else core)
    _fill(hu, grid, e.grow(-cortex_mm), core)


def paint_table(hu: F32, grid: Grid, sec: Sections) -> None:
    """Curved carbon-fibre cradle the patient lies on: two thin shells around a foam core."""
    top = sec.body.cy + sec.body.ay + 1.0 - 0.0008 * grid.x**2  # rises toward the edges
    box = grid.box(0.0, float(top.min() + top.max()) / 2 + 14.0, 1e4, float(np.ptp(top)) / 2 + 16)
    if box is None:
        return
    depth = grid.y[box[0]][:, None] - top[None, :]
    sub = hu[box]
    sub[(depth > 0.0) & (depth < 2.5)] = TABLE_SHELL
    sub[(depth >= 2.5) & (depth < 26.0)] = TABLE_FOAM
    sub[(depth >= 26.0) & (depth < 28.5)] = TABLE_SHELL


def paint_body(hu: F32, grid: Grid, sec: Sections) -> None:
    _fill(hu, grid, sec.body, SKIN)
    _fill(hu, grid, sec.body.grow(-2.0), FAT)
    _fill(hu, grid, sec.muscle, MUSCLE)
    _fill(hu, grid, sec.cavity, MEDIASTINAL_FAT)


def paint_organs(hu: F32, grid: Grid, sec: Sections) -> None:
    """Abdomen under the domes, heart in its fat, great vessels, trachea and oesophagus."""
    for dome, value in zip(sec.domes, (LIVER, MUSCLE), strict=True):
        _fill(hu, grid, dome, value)
    if sec.heart is not None:
        _fill(hu, grid, sec.heart.grow(3.0), MEDIASTINAL_FAT)
        _fill(hu, grid, sec.heart, BLOOD)
    for vessel in sec.soft_vessels:
        _fill(hu, grid, vessel, BLOOD)
    _fill(hu, grid, sec.esophagus, MUSCLE - 5.0)
    if sec.trachea is not None:
        _fill(hu, grid, sec.trachea.grow(2.0), MUSCLE)
        _fill(hu, grid, sec.trachea, AIR)


def paint_skeleton(hu: F32, grid: Grid, sec: Sections) -> None:
    _bone(hu, grid, sec.posterior_arch, MARROW, 2.5)
    for process in sec.processes:
        _bone(hu, grid, process, MARROW)
    _fill(hu, grid, sec.canal, CSF)
    if sec.is_disc:
        _fill(hu, grid, sec.vertebra, DISC)
    else:
        _bone(hu, grid, sec.vertebra, MARROW, 2.0)
    for shape, core in sec.bones:
        _bone(hu, grid, shape, core)


def _texture_at(
    tex: F32, z: float, period: float, phase: float = 0.0, box: Box = (slice(None), slice(None))
) -> F32:
    """Unit-variance texture (within ``box``) that changes smoothly with table position."""
    a = 2.0 * math.pi * z / period + phase
    return tex[0][box] * np.float32(math.cos(a)) + tex[1][box] * np.float32(math.sin(a))


def paint_lung(
    hu: F32, grid: Grid, lung: Mask, sec: Sections, anat: Anatomy, tex: F32 | None, z: float
) -> None:
    """Aerated lung, a little denser where it is dependent (posterior), with fine texture."""
    front = sec.cavity.cy - sec.cavity.ay
    dependent = np.clip((grid.y - front) / (2.0 * sec.cavity.ay), 0.0, 1.0) ** 2 * 60.0
    value = (anat.lung_level + dependent)[:, None] * np.ones((1, grid.shape[1]), np.float32)
    if tex is not None:
        value = value + 26.0 * _texture_at(tex, z, 23.0)
    np.copyto(hu, value, where=lung)


def paint_lesions(
    hu: F32, grid: Grid, lung: Mask, anat: Anatomy, tex: F32 | None, z: float
) -> Mask:
    """Blend every opacity that reaches this slice into lung; return the COVID lesion mask."""
    mask = np.zeros(grid.shape, dtype=bool)
    if tex is None:
        return mask
    for les in anat.lesions:
        cx, cy, cz = les.center
        rx, ry, rz = les.radii
        dzq = ((z - cz) / rz) ** 2
        if dzq >= 1.0:
            continue
        shape = Ellipse(cx, cy, rx, ry, les.angle)
        hx, hy = shape.half_extent()
        box = grid.box(cx, cy, hx * 1.35, hy * 1.35)
        if box is None:
            continue
        q = grid.q(shape, box) + np.float32(dzq)
        rough = _texture_at(tex[1:], z, 31.0, les.phase, box)
        weight = np.clip((1.0 - q) * 3.0 + 0.6 * rough, 0.0, 1.0) * lung[box]
        target = _lesion_target(les, grid, box, q, rough, _texture_at(tex, z, 17.0, box=box))
        sub = hu[box]
        sub += (target - sub) * weight
        if les.in_mask:
            mask[box] |= weight > 0.5
    return mask


def _lesion_target(les: Lesion, grid: Grid, box: Box, q: F32, rough: F32, fine: F32) -> F32:
    """HU an opacity tends to: ground glass, a consolidated core, or GGO with a septal grid."""
    target = np.float32(les.level) + 30.0 * fine
    if les.kind == "consolidation":
        core = q < 0.4 + 0.15 * rough
        target = np.where(core, np.float32(les.core_level) + 12.0 * fine, target)
    elif les.kind == "crazy":
        spacing = 6.5
        gx = (grid.x[box[1]][None, :] + 2.0 * rough) / spacing
        gy = (grid.y[box[0]][:, None] - 2.0 * rough) / spacing
        near = np.minimum(np.abs(gx - np.round(gx)), np.abs(gy - np.round(gy))) * spacing
        target = target + 220.0 * np.clip(1.0 - near / 0.7, 0.0, 1.0)
    return target.astype(np.float32)
