"""Where the lungs are in one slice: lung coverage, lobes, fissures, diaphragm and mediastinum.

Why this exists: the lungs are what the model reads, and their borders decide everything else:
the mediastinum wraps the heart and great vessels in one smooth contour, the domes cut the
bases with the liver and spleen beneath, and the oblique and minor fissures split the lungs into
lobes that no vessel or bronchus crosses. The painters, the findings' atlas and the ground-truth
lung mask all read these fields, so what is drawn and what is labelled agree.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

from hrct_triage.phantoms.findings import Atlas
from hrct_triage.phantoms.geometry import Grid, tube_cover
from hrct_triage.phantoms.patient import Patient, Section, outline, smoothstep
from hrct_triage.phantoms.structures import Structures

__all__ = ["LOBES", "dome_depth", "ellipsoid_q", "fissures", "lung_atlas", "lung_fields"]

F32 = NDArray[np.floating[Any]]
F64 = NDArray[np.floating[Any]]
Mask = NDArray[np.bool_]

LOBES = {1: "RUL", 2: "RML", 3: "RLL", 4: "LUL", 5: "LLL"}


def dome_depth(p: Patient, x: F32, y: F32, cav_y: float) -> F32:
    """Depth of the diaphragm under each pixel: two domes, deepest in the posterior recesses."""
    h = p.lung_height
    s = p.scale
    right = np.float32(p.dome_right * h) + 0.0
    left = np.float32(p.dome_left * h)
    top = np.where(x < 12.0 * s, right, left)
    xc = np.where(x < 12.0 * s, -58.0 * s, 62.0 * s)
    yc = np.float32(p.y_post - 95.0 * s)
    qx = ((x - xc) / np.float32(80.0 * s)) ** 2
    qy = ((y - yc) / np.float32(95.0 * s)) ** 2
    post = np.clip((y - yc) / np.float32(90.0 * s), 0.0, None)
    depth = top + (h - top) * (0.55 * qx + 0.35 * qy + 0.5 * post**2)
    return np.asarray(np.minimum(depth, 1.05 * h), dtype=np.float32)


def ellipsoid_q(grid: Grid, centre: F64, axes: F64, rot: F64, z: float, grow: float) -> F32:
    """Normalised squared radius of every pixel in the ellipsoid (x, y at height z)."""
    x, y = grid.xy()
    dx = x - np.float32(centre[0])
    dy = y - np.float32(centre[1])
    dz = np.float32(z - centre[2])
    q = np.zeros(grid.shape, dtype=np.float32)
    for i in range(3):
        u = rot[0, i] * dx + rot[1, i] * dy + rot[2, i] * dz
        q += (u / np.float32(axes[i] + grow)) ** 2
    return q


def fissures(p: Patient, sl: Section) -> tuple[F32, F32, F32, float]:
    """Signed distance (mm) to the oblique fissure of each lung and to the minor fissure.

    Oblique: high and posterior at the top of the lower lobe, low and anterior at the
    diaphragm. Positive distance is behind it (lower lobe). Minor: roughly horizontal in the
    right lung; positive below it (middle lobe). Also the z part of the oblique normal.
    """
    h = p.lung_height
    s = p.scale
    d = sl.d
    y_top, d_top = p.y_post - 10.0 * s, 0.24 * h
    y_bot, d_bot = p.y_post - 2.0 * p.cav_b + 30.0 * s, 0.98 * h
    slope = (y_bot - y_top) / (d_bot - d_top)  # dy/dd (negative: forward as it goes down)
    lateral = np.abs(sl.x) / np.float32(p.cav_a)
    yf = y_top + slope * (d - d_top) + (40.0 * s + p.fissure_tilt * 60.0) * (lateral - 0.45) ** 2
    dist_obl = (sl.y - yf) / np.float32(math.sqrt(1.0 + slope * slope))
    nz = abs(slope) / math.sqrt(1.0 + slope * slope)
    d_minor = 0.44 * h + 0.12 * (sl.y - np.float32(sl.cav_y)) + 6.0 * s * lateral
    dist_minor = (np.float32(d) - d_minor) / np.float32(math.sqrt(1 + 0.12**2))
    return dist_obl.astype(np.float32), dist_obl.astype(np.float32), dist_minor, nz


def _hull(mask: Mask, grid: Grid, radius_mm: float) -> F32:
    """The smooth outline fat gives the mediastinum: a morphological closing on a ~1.6 mm copy
    of the organs, brought back to full size with a soft (partial-volume) edge, 0..1."""
    step = max(1, round(1.6 / grid.spacing))
    small = mask[::step, ::step]
    r = max(1, round(radius_mm / (grid.spacing * step)))
    yy, xx = np.ogrid[-r : r + 1, -r : r + 1]
    disk = xx * xx + yy * yy <= r * r
    closed = ndimage.binary_closing(np.pad(small, r), structure=disk)[r:-r, r:-r]
    closed = ndimage.binary_fill_holes(closed).astype(np.float32)
    big = ndimage.zoom(closed, step, order=1) if step > 1 else closed
    out = np.zeros(mask.shape, dtype=np.float32)
    h, w = min(big.shape[0], mask.shape[0]), min(big.shape[1], mask.shape[1])
    out[:h, :w] = big[:h, :w]
    out = ndimage.gaussian_filter(out, 0.45 * step)
    return np.clip((out - 0.5) * 2.5 + 0.5, 0.0, 1.0)


def lung_fields(
    p: Patient, st: Structures, grid: Grid, d: float
) -> tuple[Section, F32, NDArray[np.uint8]]:
    """The outline of one slice, its lung coverage (0..1) and lobe labels (0 outside)."""
    sl = outline(p, grid, d)
    sp = grid.spacing
    inside = np.clip((sl.r_cav - sl.rho) / np.float32(sp) + 0.5, 0.0, 1.0)
    x, y = sl.x, sl.y
    s = p.scale
    # mediastinum: the organs with their fat, wrapped in one smooth contour, plus a thin
    # junction line where the lungs meet in front (upper chest) and behind the heart
    t = p.t(d)
    upper = float(smoothstep((0.36 - t) / 0.2))
    centre = np.float32(4.0 * s)
    band = np.abs(x - centre) < np.float32(p.mediastinum * (0.45 + 1.8 * upper))
    z = -d
    organs = np.broadcast_to(band, grid.shape).copy()
    q = ellipsoid_q(grid, st.heart_centre, st.heart_axes, st.heart_rot, z, 6.0)
    organs |= q < 1.0
    organs |= ellipsoid_q(grid, st.atrium_centre, st.atrium_axes, np.eye(3), z, 4.0) < 1.0
    for tubes, margin in (
        (st.aorta, 4.0),
        (st.great_vessels, 3.5),
        (st.trachea_wall, 3.0),
        (st.oesophagus, 4.0),
    ):
        organs |= tube_cover(grid, tubes.grown(margin), z) > 0.5
    soft = np.maximum(_hull(organs, grid, 11.0 * s), organs.astype(np.float32))
    med = soft > 0.5
    spine = (x / np.float32(30.0 * s)) ** 2 + (
        (y - np.float32(sl.spine_y)) / np.float32(34.0 * s)
    ) ** 2 < 1.0
    dome = dome_depth(p, x, y, sl.cav_y)
    below = np.float32(d) > dome
    apex_r = np.float32(40.0 * s)
    apex = (
        np.float32(d)
        > 7.0
        * (
            ((np.abs(x) - 48.0 * s) / apex_r) ** 2
            + ((y - np.float32(p.y_post - 45 * s)) / apex_r) ** 2
        )
        - 4.0
    )
    lung = inside * (1.0 - soft) * (~spine & ~below & apex)
    # soften the dome surface by its partial volume (a few mm of depth)
    lung *= np.clip((dome - np.float32(d)) / 3.0 + 0.5, 0.0, 1.0)
    sl.lung = lung.astype(np.float32)
    sl.below_dome = below
    sl.mediastinum = med
    obl_r, obl_l, minor, _ = fissures(p, sl)
    right = x < centre
    lobes = np.zeros(grid.shape, dtype=np.uint8)
    rl = right & (obl_r < 0)
    lobes[rl & (minor < 0)] = 1
    lobes[rl & (minor >= 0)] = 2
    lobes[right & (obl_r >= 0)] = 3
    lobes[~right & (obl_l < 0)] = 4
    lobes[~right & (obl_l >= 0)] = 5
    lobes[lung < 0.5] = 0
    sl.lobes = lobes
    return sl, sl.lung, lobes


def lung_atlas(p: Patient, st: Structures) -> Atlas:
    """Coarse lung voxels (4 mm) with lobe, pleural distance and relative position."""
    step = 4.0
    n = int(2 * (p.cav_a + 20.0) / step) + 2
    grid = Grid(n, step)
    depths = np.arange(0.0, p.lung_height * 1.06, step)
    pts: list[F64] = []
    lobes: list[NDArray[np.int64]] = []
    pleura: list[F64] = []
    post: list[F64] = []
    c = grid.coords
    for d in depths:
        _, lung, lobe = lung_fields(p, st, grid, float(d))
        inside = lung > 0.5
        keep = inside & (lobe > 0)
        rr, cc = np.nonzero(keep)
        if rr.size == 0:
            continue
        dist = ndimage.distance_transform_edt(inside) * step
        pts.append(np.stack([c[cc], c[rr], np.full(rr.size, d)], axis=1).astype(np.float64))
        lobes.append(lobe[rr, cc].astype(np.int64))
        pleura.append(dist[rr, cc].astype(np.float64))
        lo, hi = float(c[rr].min()), float(c[rr].max())
        post.append((c[rr] - lo) / max(hi - lo, 1.0))
    allp = np.concatenate(pts)
    return Atlas(
        points=allp,
        lobe=np.concatenate(lobes),
        pleura=np.concatenate(pleura),
        posterior=np.concatenate(post),
        lower=np.clip(allp[:, 2] / p.lung_height, 0.0, 1.0),
        height=p.lung_height,
    )
