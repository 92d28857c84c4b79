"""The analytic chest: tissue HU values, the patient record and each organ's cross-section.

One ``Anatomy`` holds everything random about a patient; ``sections`` turns it into the ellipses
of body, chest wall, lungs, mediastinum, heart, great vessels, airways and bones at one table
position, shared by the painter (``lung_mask``) and the scalar tests that place vessels and
lesions (``point_in_lung``), so what is placed and what is painted agree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
from numpy.typing import NDArray

from hrct_triage.phantoms.geometry import Ellipse, Grid, Mask

Label = Literal["covid", "healthy"]
CHEST_LENGTH_MM = 260.0


# Hounsfield units of the tissues drawn.
AIR = -1000.0
LUNG = -850.0
FAT = -100.0
MEDIASTINAL_FAT = -85.0
SKIN = 30.0
MUSCLE = 40.0
BLOOD = 40.0
LIVER = 55.0
CARTILAGE = 140.0
MARROW = 230.0
CORTEX = 700.0
DISC = 85.0
CSF = 15.0
TABLE_SHELL = 250.0
TABLE_FOAM = -900.0
BODY_CY = -8.0  # y (mm) of the body's centre; the table is under its posterior edge
CARINA_T = 0.31  # fraction of the scan length, from the apex end, where the trachea divides


@dataclass(frozen=True)
class Lesion:
    """An irregular ellipsoidal opacity; ``kind`` decides how it is blended into lung."""

    center: tuple[float, float, float]
    radii: tuple[float, float, float]
    kind: str  # "ggo", "consolidation", "crazy", "atelectasis", "blob"
    level: float  # HU of the ground-glass (or only) component
    core_level: float  # HU of the consolidated core (consolidation kind)
    in_mask: bool  # counts as a COVID-19 lesion in the ground truth
    phase: float  # offsets the texture so lesions differ
    angle: float = 0.0  # in-plane rotation: long axis along the pleura


@dataclass(frozen=True)
class Vessels:
    """Vessel tree as capsules: endpoints (n, 3) in mm and radii (n,)."""

    p0: NDArray[np.float64]
    p1: NDArray[np.float64]
    radius: NDArray[np.float64]


@dataclass(frozen=True)
class Anatomy:
    """Everything random about one patient, drawn once from the study's seed."""

    label: Label
    size: float  # overall patient scale
    aspect: float  # AP / lateral
    fat_mm: float
    z_top: float  # table position of the first thin slice edge (apex end)
    pixel_spacing: float
    lung_level: float
    noise_sigma: float
    dome_right: float  # t of the right hemidiaphragm top
    dome_left: float
    heart_shift: float
    lesions: tuple[Lesion, ...] = ()
    vessels: Vessels | None = None
    motion_px: int = 0  # ghost shift of a breathing artefact at the bases (0: none)
    signed_pixels: bool = False  # PixelRepresentation 1 with padding (GE-like) vs 0 (12 bit)
    severity: str = "none"


@dataclass(frozen=True)
class Sections:
    """Cross-sections of every analytic organ at one table position ``z``."""

    body: Ellipse
    muscle: Ellipse
    cavity: Ellipse
    lungs: tuple[Ellipse | None, Ellipse | None]  # right (x < 0), left (x > 0)
    lung_exclusions: tuple[Ellipse, ...]  # mediastinum, heart, domes, spine, aorta
    domes: tuple[Ellipse | None, Ellipse | None]
    heart: Ellipse | None
    soft_vessels: tuple[Ellipse, ...]  # aorta, SVC, great vessels: blood in the mediastinum
    trachea: Ellipse | None
    esophagus: Ellipse | None
    vertebra: Ellipse
    canal: Ellipse
    posterior_arch: Ellipse
    processes: tuple[Ellipse, ...]
    bones: tuple[tuple[Ellipse, float], ...]  # ribs, sternum, scapulae, clavicles (shape, core)
    is_disc: bool


def t_of(anat: Anatomy, z: float) -> float:
    """Fraction of the chest from the apex end (0) to the bases (1) at table position z."""
    return (anat.z_top - z) / CHEST_LENGTH_MM


def smooth01(v: float) -> float:
    v = min(max(v, 0.0), 1.0)
    return v * v * (3.0 - 2.0 * v)


def _body_axes(anat: Anatomy, t: float) -> tuple[float, float]:
    grow = smooth01(t / 0.5)
    a = 165.0 * anat.size * (0.86 + 0.14 * grow)
    b = 112.0 * anat.size * anat.aspect * (0.9 + 0.1 * grow)
    return a, b


def sections(anat: Anatomy, z: float) -> Sections:
    """The cross-sections at z; shared by the painter and the point-in-lung test."""
    t = t_of(anat, z)
    s = anat.size
    a_b, b_b = _body_axes(anat, t)
    body = Ellipse(0.0, BODY_CY, a_b, b_b)
    muscle = Ellipse(0.0, BODY_CY, a_b - anat.fat_mm, b_b - anat.fat_mm)
    cavity = Ellipse(0.0, BODY_CY - 6.0, muscle.ax - 16.0 * s, muscle.ay - 22.0 * s)
    cav_post = cavity.cy + cavity.ay
    vertebra = Ellipse(0.0, cav_post - 22.0 * s, 17.0 * s, 15.0 * s)
    canal_y = vertebra.cy + vertebra.ay + 8.0 * s
    canal = Ellipse(0.0, canal_y, 8.0 * s, 7.0 * s)
    posterior_arch = Ellipse(0.0, canal_y + 2.0 * s, 14.0 * s, 12.0 * s)
    processes = (
        Ellipse(0.0, canal_y + 20.0 * s, 4.0 * s, 12.0 * s),
        Ellipse(-22.0 * s, canal_y - 2.0 * s, 11.0 * s, 4.5 * s, 0.25),
        Ellipse(22.0 * s, canal_y - 2.0 * s, 11.0 * s, 4.5 * s, -0.25),
    )
    is_disc = (z - anat.z_top) % (26.0 * s) < 5.0 * s
    domes = (_dome(anat, z, -1), _dome(anat, z, 1))
    heart = _heart(anat, t)
    mediastinum = _mediastinum(anat, t, cavity)
    aorta_desc = Ellipse(20.0 * s, vertebra.cy - 14.0 * s, 12.0 * s, 12.0 * s) if t > 0.26 else None
    soft = _great_vessels(anat, t, aorta_desc)
    trachea = _trachea(anat, t, vertebra) if t < CARINA_T else None
    esophagus = Ellipse(6.0 * s, vertebra.cy - vertebra.ay - 8.0 * s, 7.0 * s, 6.0 * s)
    exclusions: list[Ellipse] = [mediastinum, vertebra.grow(10.0 * s)]
    exclusions += [e for e in domes if e is not None]
    if heart is not None:
        exclusions.append(heart.grow(4.0 * s))
    if aorta_desc is not None:
        exclusions.append(aorta_desc.grow(3.0 * s))
    return Sections(
        body=body,
        muscle=muscle,
        cavity=cavity,
        lungs=(_lung(anat, t, cavity, -1), _lung(anat, t, cavity, 1)),
        lung_exclusions=tuple(exclusions),
        domes=domes,
        heart=heart,
        soft_vessels=soft,
        trachea=trachea,
        esophagus=esophagus,
        vertebra=vertebra,
        canal=canal,
        posterior_arch=posterior_arch,
        processes=processes,
        bones=_bones(anat, z, cavity),
        is_disc=is_disc,
    )


def _lung(anat: Anatomy, t: float, cavity: Ellipse, side: int) -> Ellipse | None:
    """Lung outline before cuts: grows from a small apex, tapers into the posterior recess."""
    grow = min(max((t - 0.02) / 0.33, 0.0), 1.0) ** 0.55
    taper = min(max((0.985 - t) / 0.07, 0.0), 1.0) ** 0.5
    g = grow * taper
    if g <= 0.02:
        return None
    cx = side * cavity.ax * (0.5 + 0.12 * (1.0 - g))
    cy = cavity.cy + 5.0 + 22.0 * anat.size * (1.0 - g) + 10.0 * (1.0 - taper)
    return Ellipse(cx, cy, cavity.ax * 0.56 * g, cavity.ay * 1.02 * g)


def _dome(anat: Anatomy, z: float, side: int) -> Ellipse | None:
    """Cross-section of a hemidiaphragm dome (liver on the right, spleen/stomach on the left)."""
    s = anat.size
    top_t = anat.dome_right if side < 0 else anat.dome_left
    rz = 80.0 * s
    zc = anat.z_top - top_t * CHEST_LENGTH_MM - rz
    dz = max((z - zc) / rz, 0.0)  # below the dome's equator the abdomen stays full width
    if dz >= 1.0:
        return None
    f = math.sqrt(1.0 - dz * dz)
    return Ellipse(side * 55.0 * s, BODY_CY - 18.0 * s, 98.0 * s * f, 95.0 * s * f)


def _heart(anat: Anatomy, t: float) -> Ellipse | None:
    """The heart: lower-middle chest, left of midline, long axis to the left and anterior."""
    h2 = 1.0 - ((t - 0.68) / 0.23) ** 2
    if h2 <= 0.01:
        return None
    h = math.sqrt(h2)
    s = anat.size
    return Ellipse(
        (14.0 + anat.heart_shift) * s, BODY_CY - 34.0 * s, 64.0 * s * h, 48.0 * s * h, -0.55
    )


def _mediastinum(anat: Anatomy, t: float, cavity: Ellipse) -> Ellipse:
    s = anat.size
    width = 19.0 if t < 0.22 else (30.0 if t < 0.47 else 22.0)
    return Ellipse(4.0 * s, cavity.cy - 8.0, width * s, cavity.ay * 0.97)


def _trachea(anat: Anatomy, t: float, vertebra: Ellipse) -> Ellipse:
    y_low = vertebra.cy - vertebra.ay - 24.0 * anat.size
    y = y_low - 26.0 * anat.size * (1.0 - t / CARINA_T)
    return Ellipse(0.0, y, 9.0 * anat.size, 8.0 * anat.size)


def _great_vessels(anat: Anatomy, t: float, aorta_desc: Ellipse | None) -> tuple[Ellipse, ...]:
    s = anat.size
    out: list[Ellipse] = [] if aorta_desc is None else [aorta_desc]
    if 0.27 < t < 0.5:
        out.append(Ellipse(-8.0 * s, BODY_CY - 40.0 * s, 15.0 * s, 15.0 * s))  # ascending aorta
    if 0.36 < t < 0.47:
        out.append(Ellipse(22.0 * s, BODY_CY - 42.0 * s, 14.0 * s, 13.0 * s))  # pulmonary trunk
    if 0.14 < t < 0.46:
        out.append(Ellipse(-26.0 * s, BODY_CY - 30.0 * s, 10.0 * s, 9.0 * s))  # SVC
    if 0.23 <= t <= 0.28:  # aortic arch, running from front right to back left
        out.append(Ellipse(6.0 * s, BODY_CY - 8.0 * s, 36.0 * s, 12.0 * s, 1.0))
    if 0.05 < t < 0.23:  # arch branches
        out.append(Ellipse(-14.0 * s, BODY_CY - 34.0 * s, 7.0 * s, 7.0 * s))
        out.append(Ellipse(6.0 * s, BODY_CY - 30.0 * s, 5.5 * s, 5.5 * s))
        out.append(Ellipse(17.0 * s, BODY_CY - 20.0 * s, 5.5 * s, 5.5 * s))
    return tuple(out)


def _bones(anat: Anatomy, z: float, cavity: Ellipse) -> tuple[tuple[Ellipse, float], ...]:
    """Ribs (oblique, so each cut is an elongated ring), sternum, scapulae and clavicles."""
    s = anat.size
    t = t_of(anat, z)
    out: list[tuple[Ellipse, float]] = []
    a_r, b_r = cavity.ax + 6.0 * s, cavity.ay + 6.0 * s
    drop = 78.0 * s
    for k in range(12):
        z_k = anat.z_top + 14.0 - k * 24.0 * s
        u = (z_k - z) / drop
        reach = 0.55 if k >= 10 else 1.0  # floating ribs stop early
        if not 0.0 <= u <= reach:
            continue
        phi = math.pi * (0.1 + 0.85 * u**0.8)
        core = CARTILAGE if phi > 0.84 * math.pi else MARROW
        for side in (-1, 1):
            x = side * a_r * math.sin(phi)
            y = cavity.cy + b_r * math.cos(phi)
            angle = math.atan2(-b_r * math.sin(phi), side * a_r * math.cos(phi))
            out.append((Ellipse(x, y, 8.0 * s, 3.6 * s, angle), core))
    if 0.12 < t < 0.66:
        out.append((Ellipse(0.0, cavity.cy - cavity.ay - 5.0 * s, 14.0 * s, 5.5 * s), MARROW))
    if 0.02 < t < 0.42:
        phi = 0.27 * math.pi
        for side in (-1, 1):
            x = side * (a_r + 15.0 * s) * math.sin(phi)
            y = cavity.cy + (b_r + 13.0 * s) * math.cos(phi)
            angle = math.atan2(-math.sin(phi), side * math.cos(phi))
            out.append((Ellipse(x, y, 28.0 * s, 3.0 * s, angle), MARROW))
    if t < 0.09:
        for side in (-1, 1):
            y = cavity.cy - cavity.ay - 10.0 * s
            out.append((Ellipse(side * 60.0 * s, y, 32.0 * s, 6.0 * s, side * 0.25), MARROW))
    return tuple(out)


def point_in_lung(sec: Sections, x: float, y: float, margin: float = 0.0) -> bool:
    """Scalar twin of the painted lung mask, used to grow vessels and place lesions."""
    if not sec.cavity.contains(x, y, -margin):
        return False
    if not any(e is not None and e.contains(x, y, -margin) for e in sec.lungs):
        return False
    return not any(e.contains(x, y, margin) for e in sec.lung_exclusions)


def lung_mask(grid: Grid, sec: Sections) -> Mask:
    """Pixels of lung parenchyma: the lung outlines, cut by chest wall and mediastinal organs."""
    mask = np.zeros(grid.shape, dtype=bool)
    for lung in sec.lungs:
        hit = None if lung is None else grid.ellipse(lung)
        if hit is not None:
            mask[hit[0]] |= hit[1]
    if not mask.any():
        return mask
    hit = grid.ellipse(sec.cavity)
    inside = np.zeros(grid.shape, dtype=bool)
    if hit is not None:
        inside[hit[0]] = hit[1]
    mask &= inside
    for e in sec.lung_exclusions:
        hit = grid.ellipse(e)
        if hit is not None:
            mask[hit[0]] &= ~hit[1]
    return mask
