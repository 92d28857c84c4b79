"""Painting one thin slice in Hounsfield units: body, organs, skeleton, table and aerated lung.

Why this exists: what lies around the lungs (fat, muscle, breasts, heart, liver, ribs, spine,
scapulae, the table, a blanket) and the aerated lung itself (denser where dependent, lobular
mottling, fine grain, fissure lines) must carry real tissue values and textures, or a model
learns the difference between a drawing and a patient. Tubes and sheets come with their
partial volume (``geometry``); noise and blur are the scanner's (``scanner_physics``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from hrct_triage.phantoms.anatomy import dome_depth, ellipsoid_q, fissures
from hrct_triage.phantoms.geometry import Grid, sheet_cover, smooth_noise_2d, tube_cover
from hrct_triage.phantoms.patient import Patient, Section, cavity_axes, smoothstep
from hrct_triage.phantoms.scanner_physics import paint_table
from hrct_triage.phantoms.structures import Structures

__all__ = [
    "AIR",
    "BLOOD",
    "Extras",
    "Textures",
    "blend",
    "draw_textures",
    "fissure_cover",
    "paint_lung",
    "paint_static",
]

F32 = NDArray[np.floating[Any]]
F64 = NDArray[np.floating[Any]]

# Hounsfield units of the tissues drawn
AIR = -1000.0
FAT = -100.0
MEDIASTINAL_FAT = -90.0
MUSCLE = 45.0
BLOOD = 40.0
LIVER = 58.0
SPLEEN = 48.0
CARTILAGE = 120.0
MARROW = 240.0
CORTEX = 850.0
DISC = 80.0
CSF = 15.0
SKIN = 30.0


@dataclass(frozen=True)
class Textures:
    """Smooth random fields shared by all slices (shifted with depth so they vary)."""

    fields: F32  # (k, n, n) unit variance, ~12 mm blobs
    fine: F32  # (k, n, n) unit variance, ~2 mm grain

    def at(self, which: int, d: float, fine: bool = False) -> F32:
        src = self.fine if fine else self.fields
        a = d / (9.0 if fine else 23.0)
        i = which % (src.shape[0] - 1)
        return (src[i] * np.float32(math.cos(a)) + src[i + 1] * np.float32(math.sin(a))).astype(
            np.float32
        )


def draw_textures(rng: np.random.Generator, grid: Grid) -> Textures:
    coarse = max(2, round(12.0 / grid.spacing))
    fine = max(1, round(2.0 / grid.spacing))
    fields = np.stack([smooth_noise_2d(rng, grid.shape, coarse) for _ in range(4)])
    fines = np.stack([smooth_noise_2d(rng, grid.shape, fine) for _ in range(3)])
    return Textures(fields, fines)


def blend(hu: F32, value: F32 | float | np.floating[Any], cover: F32) -> None:
    hu += (np.asarray(value, dtype=np.float32) - hu) * cover


def paint_static(
    p: Patient, st: Structures, grid: Grid, sl: Section, tex: Textures, extras: Extras
) -> F32:
    """Everything but lung parenchyma and the lung's tubes, for one thin slice."""
    d, z = sl.d, -sl.d
    sp = np.float32(grid.spacing)
    hu = np.full(grid.shape, AIR, dtype=np.float32)
    paint_table(hu, grid, float(p.y_post + 30.0 * p.scale + p.fat * 0.9 + 1.5))
    if p.blanket:
        ring = np.abs(sl.rho - (sl.r_body + extras.blanket_gap(sl.theta, d)))
        cover = np.clip(1.0 - ring / 0.9, 0.0, 1.0) * (np.sin(sl.theta) < 0.1)
        blend(hu, np.float32(-350.0), cover * 0.8)
    body = np.clip((sl.r_body - sl.rho) / sp + 0.5, 0.0, 1.0)
    arms = tube_cover(grid, st.arms, z)
    body = np.maximum(body, arms)
    fat_value = FAT + 12.0 * tex.at(0, d)
    blend(hu, fat_value, body)
    skin_in = np.clip((sl.r_body - 1.8 - sl.rho) / sp + 0.5, 0.0, 1.0)
    blend(hu, np.float32(SKIN), np.clip(body - skin_in, 0.0, 1.0))
    if p.breast > 0:
        gland = np.clip(tex.at(1, d) * 0.8 + 0.2, 0.0, 1.0) * (np.sin(sl.theta) < -0.3)
        breast_zone = (sl.rho > sl.r_body - p.breast * 0.9) & (sl.rho < sl.r_body - 3.0)
        blend(hu, np.float32(25.0), gland * breast_zone * 0.8)
    # muscle: between the rib cage and the fat, with fat streaks between muscles
    post = np.clip(np.sin(sl.theta), 0.0, 1.0)
    fat_in = sl.r_body - np.float32(p.fat) * (0.7 + 0.5 * np.abs(np.cos(sl.theta)) + 0.4 * post)
    muscle = np.clip((fat_in - sl.rho) / sp + 0.5, 0.0, 1.0)
    streak = np.clip(tex.at(2, d, fine=True) - 1.3, 0.0, 1.0)
    blend(hu, MUSCLE + 8.0 * tex.at(3, d), muscle * (1.0 - streak))
    arm_muscle = tube_cover(grid, st.arms.grown(-(p.fat * 0.7 + 4.0)), z)
    blend(hu, np.float32(MUSCLE), arm_muscle)
    # the cavity: mediastinal fat, then organs
    cav = np.clip((sl.r_cav - sl.rho) / sp + 0.5, 0.0, 1.0)
    blend(hu, np.float32(MEDIASTINAL_FAT), cav)
    _paint_abdomen(p, grid, sl, hu, cav, tex)
    q = ellipsoid_q(grid, st.heart_centre, st.heart_axes, st.heart_rot, z, 0.0)
    if q.min() < 1.4:
        peri = np.clip((1.08 - q) * 20.0, 0.0, 1.0)
        blend(hu, np.float32(25.0), peri)
        myo = np.clip((1.0 - q) * 25.0, 0.0, 1.0)
        blend(hu, BLOOD + 6.0 * tex.at(1, d), myo)
    qa = ellipsoid_q(grid, st.atrium_centre, st.atrium_axes, np.eye(3), z, 0.0)
    blend(hu, BLOOD + 4.0 * tex.at(1, d), np.clip((1.0 - qa) * 20.0, 0.0, 1.0))
    for tubes, value in ((st.aorta, BLOOD + 2.0), (st.great_vessels, BLOOD)):
        blend(hu, np.float32(value), tube_cover(grid, tubes, z))
    blend(hu, np.float32(MUSCLE), tube_cover(grid, st.oesophagus, z))
    blend(hu, np.float32(MUSCLE - 10.0), tube_cover(grid, st.trachea_wall, z))
    _paint_skeleton(p, st, grid, sl, hu)
    return hu


def _paint_abdomen(p: Patient, grid: Grid, sl: Section, hu: F32, cav: F32, tex: Textures) -> None:
    """Under the domes: liver on the right, spleen and stomach on the left, diaphragm above."""
    x, y, d = sl.x, sl.y, sl.d
    s = np.float32(p.scale)
    dome = dome_depth(p, x, y, sl.cav_y)
    below = np.clip((np.float32(d) - dome) / 3.0 + 0.5, 0.0, 1.0) * cav
    if float(below.max()) <= 0.0:
        return
    muscle_band = np.clip(1.0 - np.abs(np.float32(d) - dome - 2.5) / 2.5, 0.0, 1.0) * cav
    liver_edge = 18.0 * s - 0.5 * (y - np.float32(sl.cav_y)) + 6.0 * tex.at(2, d)
    liver = below * (x < liver_edge)
    blend(hu, LIVER + 7.0 * tex.at(0, d), liver)
    left = below * (x >= liver_edge)
    spleen_q = ((x - 85.0 * s) / (38.0 * s)) ** 2 + (
        (y - np.float32(p.y_post - 40.0 * s)) / (55.0 * s)
    ) ** 2
    blend(hu, np.float32(SPLEEN), left * (spleen_q < 1.0))
    stomach_q = ((x - 50.0 * s) / (40.0 * s)) ** 2 + (
        (y - np.float32(sl.cav_y - 15.0 * s)) / (35.0 * s)
    ) ** 2
    stomach = left * (stomach_q < 1.0) * (spleen_q >= 1.0)
    blend(hu, np.float32(30.0), stomach * (stomach_q > 0.8))
    gas_level = np.float32(sl.cav_y - 15.0 * s) - np.float32(12.0 * s)
    inner = stomach * (stomach_q <= 0.8)
    blend(hu, np.float32(AIR), inner * (y < gas_level))
    blend(hu, np.float32(20.0), inner * (y >= gas_level))
    blend(hu, np.float32(MUSCLE), muscle_band * (below < 0.5))


def _paint_spine(p: Patient, sl: Section, full: F32, box: tuple[slice, slice], d: float) -> None:
    s = p.scale
    x = sl.x[:, box[1]]
    y = sl.y[box[0], :]
    hu = full[box]
    level = (d + 0.07 * p.lung_height) % (26.0 * s)
    vb = (x / np.float32(19.0 * s)) ** 2 + (
        (y - np.float32(sl.spine_y)) / np.float32(16.0 * s)
    ) ** 2
    if level < 5.0 * s:
        blend(hu, np.float32(DISC), (vb < 1.0).astype(np.float32))
    else:
        blend(hu, np.float32(CORTEX), (vb < 1.0).astype(np.float32))
        blend(hu, np.float32(MARROW - (p.age - 50.0)), (vb < 0.8).astype(np.float32))
    cy = sl.spine_y + 26.0 * s
    canal = (x / np.float32(8.0 * s)) ** 2 + ((y - np.float32(cy)) / np.float32(8.0 * s)) ** 2
    arch = (x / np.float32(15.0 * s)) ** 2 + (
        (y - np.float32(cy + 2.0 * s)) / np.float32(13.0 * s)
    ) ** 2
    blend(hu, np.float32(CORTEX * 0.8), (arch < 1.0).astype(np.float32))
    spinous = (x / np.float32(4.0 * s)) ** 2 + (
        (y - np.float32(cy + 22.0 * s)) / np.float32(13.0 * s)
    ) ** 2
    blend(hu, np.float32(CORTEX * 0.7), (spinous < 1.0).astype(np.float32))
    if level > 8.0 * s:  # transverse processes, toward the rib heads
        for side in (-1.0, 1.0):
            tp = ((x - np.float32(side * 24.0 * s)) / np.float32(12.0 * s)) ** 2 + (
                (y - np.float32(cy - 2.0 * s)) / np.float32(5.0 * s)
            ) ** 2
            blend(hu, np.float32(CORTEX * 0.7), (tp < 1.0).astype(np.float32))
    blend(hu, np.float32(CSF), (canal < 1.0).astype(np.float32))


def _paint_skeleton(p: Patient, st: Structures, grid: Grid, sl: Section, hu: F32) -> None:
    z, d = -sl.d, sl.d
    s = p.scale
    # vertebra: body (or disc), canal, posterior arch and processes, drawn in a box round it
    box = grid.box(-45.0 * s, 45.0 * s, sl.spine_y - 20.0 * s, sl.spine_y + 65.0 * s)
    if box is not None:
        _paint_spine(p, sl, hu, box, d)
    x, y = sl.x, sl.y
    # ribs, cartilage, clavicles, humeri
    blend(hu, np.float32(CORTEX), tube_cover(grid, st.rib_outer, z))
    blend(hu, np.float32(MARROW), tube_cover(grid, st.rib_inner, z))
    cart_value = CARTILAGE + (180.0 if p.calcified else 0.0)
    blend(hu, np.float32(cart_value), tube_cover(grid, st.cartilage, z) * 0.9)
    blend(hu, np.float32(CORTEX), tube_cover(grid, st.clavicle_outer, z))
    blend(hu, np.float32(MARROW), tube_cover(grid, st.clavicle_inner, z))
    blend(hu, np.float32(CORTEX), tube_cover(grid, st.humerus, z))
    blend(hu, np.float32(MARROW), tube_cover(grid, st.humerus.grown(-2.5), z))
    # sternum: manubrium and body in front of the cavity
    t = p.t(d)
    if 0.1 < t < 0.78:
        _, b, cyc = cavity_axes(p, d)
        yc = cyc - b - 7.0 * s
        half = (16.0 if t < 0.3 else 12.0) * s
        bx = grid.box(-half - 2.0, half + 2.0, yc - 8.0 * s, yc + 8.0 * s)
        if bx is not None:
            xs, ys = x[:, bx[1]], y[bx[0], :]
            st_q = (xs / np.float32(half)) ** 2 + ((ys - np.float32(yc)) / np.float32(6.0 * s)) ** 2
            blend(hu[bx], np.float32(CORTEX * 0.8), (st_q < 1.0).astype(np.float32))
            blend(hu[bx], np.float32(MARROW), (st_q < 0.55).astype(np.float32))
    # scapulae: curved plates behind the posterolateral ribs (only the back half is evaluated)
    if -0.25 < t < 0.6:
        fade = float(smoothstep((0.6 - t) / 0.15))
        top = grid.box(-1e4, 1e4, sl.cav_y, 1e4)
        if top is not None:
            theta = sl.theta[top]
            rho = sl.rho[top]
            r = sl.r_cav[top] + np.float32(22.0 * s + 6.0 * s * (0.3 - t))
            plate = np.clip(1.0 - np.abs(rho - r) / np.float32(2.2 * s), 0.0, 1.0)
            for side in (-1.0, 1.0):
                mid = np.pi / 2 - side * (0.85 + 0.2 * t)
                span = np.exp(-(((theta - np.float32(mid)) / 0.42) ** 6))
                blend(hu[top], np.float32(CORTEX * 0.75), plate * span * fade)
    if p.calcified and len(st.calcifications):
        c = st.calcifications
        near = np.abs(c[:, 2] - z) < c[:, 3]
        for cx, cy2, _, r in c[near]:
            q = ((x - np.float32(cx)) ** 2 + (y - np.float32(cy2)) ** 2) / np.float32(r * r)
            blend(hu, np.float32(500.0), np.clip(1.5 - q, 0.0, 1.0))


@dataclass(frozen=True)
class Extras:
    """Random smooth functions of angle and depth (blanket folds)."""

    coef: F64  # (k, 4)

    def blanket_gap(self, theta: F32, d: float) -> F32:
        g = np.full(theta.shape, 10.0, dtype=np.float32)
        for k, (amp, fq, ph, dz) in enumerate(self.coef):
            g += np.float32(amp) * np.cos(
                np.float32(fq * (k + 1)) * theta + np.float32(ph + d * dz)
            )
        return np.maximum(g, 1.5)


# ------------------------------------------------------------------------------------------
# The lung's own detail
# ------------------------------------------------------------------------------------------


def paint_lung(p: Patient, grid: Grid, sl: Section, hu: F32, tex: Textures, fissure: F32) -> F32:
    """Aerated lung: denser where dependent, lobular mottling, fine grain, fissures."""
    y = sl.y
    front = np.float32(sl.cav_y - 0.9 * p.cav_b)
    depth = np.clip((y - front) / np.float32(1.9 * p.cav_b), 0.0, 1.0)
    value = np.float32(p.lung_hu) + np.float32(p.gravity_hu) * depth**1.5
    value = value + 5.0 * tex.at(2, sl.d) + 18.0 * tex.at(1, sl.d, fine=True)
    value = value + (np.float32(-250.0) - value) * fissure
    blend(hu, value.astype(np.float32), sl.lung)
    return value.astype(np.float32)


def fissure_cover(p: Patient, sl: Section, grid: Grid, slab: float, tex: Textures) -> F32:
    obl_r, obl_l, minor, nz = fissures(p, sl)
    right = sl.x < 0
    obl = np.where(right, obl_r, obl_l)
    c = sheet_cover(obl, nz, thickness=0.35, pixel=grid.spacing, slab=slab)
    anterior = obl_r < 0
    c_minor = sheet_cover(minor, 0.99, thickness=0.35, pixel=grid.spacing, slab=slab)
    c = np.maximum(c, c_minor * (right & anterior))
    complete = np.clip(tex.at(3, sl.d * 0.3) + 1.2, 0.0, 1.0)  # fissures are often incomplete
    return (c * complete * (sl.lung > 0.5)).astype(np.float32)
