"""One random adult as the phantoms draw them, and the outlines of their chest per slice.

Why this exists: a chest CT's look depends first on who lies on the table (size, sex, age, arms
up or down, fat, lung size and density), and every later step (structures, lungs, findings,
scanner) reads those facts from one record drawn once from the seed. The outlines (inner rib
cage and skin, as polar radii round the cavity centre) are what the painters cut per slice.

Coordinates: x to the patient's left (image columns), y posterior (image rows), and depth ``d``
in mm below the lung apex (z = -d in DICOM terms).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from hrct_triage.phantoms.geometry import Grid

__all__ = ["Patient", "Section", "cavity_axes", "draw_patient", "outline", "outline_xy"]

F32 = NDArray[np.floating[Any]]
Mask = NDArray[np.bool_]


# ------------------------------------------------------------------------------------------
# The patient
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Patient:
    """Everything random about one body, drawn once from the seed."""

    scale: float  # overall size
    cav_a: float  # thoracic cavity half-width at full size (mm)
    cav_b: float  # thoracic cavity half-depth (mm)
    lung_height: float  # apex to the deepest posterior recess (mm)
    fat: float  # subcutaneous fat (mm)
    female: bool
    breast: float  # breast projection (mm)
    arms_up: bool
    age: float
    lung_hu: float  # aerated lung, anterior (HU)
    gravity_hu: float  # anterior to posterior increase of aerated lung (HU)
    dome_right: float  # depth fraction of the right dome's top
    dome_left: float
    heart_shift: float  # mm to the left
    heart_size: float
    mediastinum: float  # half-width of the central mediastinal band (mm)
    fissure_tilt: float
    vessel_points: int  # terminal supply regions of the arterial tree (both lungs)
    calcified: bool  # vascular and costal cartilage calcification (older patients)
    blanket: bool

    @property
    def y_post(self) -> float:
        """y of the posterior inner rib cage (constant from apex to base)."""
        return self.cav_b

    def t(self, d: float) -> float:
        return d / self.lung_height


def draw_patient(rng: np.random.Generator) -> Patient:
    """A random adult: habitus, sex, age, arms, lung size and density."""
    scale = float(rng.uniform(0.88, 1.1))
    age = float(rng.uniform(25.0, 88.0))
    female = bool(rng.random() < 0.5)
    s = scale * (0.94 if female else 1.0)
    return Patient(
        scale=s,
        cav_a=float(rng.uniform(122.0, 140.0)) * s,
        cav_b=float(rng.uniform(90.0, 106.0)) * s,
        lung_height=float(rng.uniform(235.0, 275.0)) * s,
        fat=float(rng.gamma(2.5, 5.0)) + 3.0,
        female=female,
        breast=float(rng.uniform(15.0, 55.0)) if female else 0.0,
        arms_up=bool(rng.random() < 0.8),
        age=age,
        lung_hu=float(rng.uniform(-905.0, -865.0)) - 0.25 * (age - 50.0),
        gravity_hu=float(rng.uniform(25.0, 70.0)),
        dome_right=float(rng.uniform(0.72, 0.8)),
        dome_left=float(rng.uniform(0.77, 0.85)),
        heart_shift=float(rng.uniform(-6.0, 10.0)),
        heart_size=float(rng.uniform(0.92, 1.12)),
        mediastinum=float(rng.uniform(9.0, 15.0)) * s,
        fissure_tilt=float(rng.uniform(-0.1, 0.1)),
        vessel_points=int(rng.integers(4000, 6000)),
        calcified=bool(age > 60.0 and rng.random() < 0.6),
        blanket=bool(rng.random() < 0.45),
    )


# ------------------------------------------------------------------------------------------
# Outlines
# ------------------------------------------------------------------------------------------


def smoothstep(v: float | F32) -> F32:
    w = np.clip(v, 0.0, 1.0)
    return np.asarray(w * w * (3.0 - 2.0 * w), dtype=np.float32)


def cavity_axes(p: Patient, d: float) -> tuple[float, float, float]:
    """Half-width, half-depth and centre y of the inner rib cage at depth d."""
    t = p.t(d)
    grow = 0.42 + 0.58 * float(np.sin(0.5 * np.pi * min(max((t + 0.08) / 0.62, 0.0), 1.0)))
    a = p.cav_a * grow * (1.0 + 0.04 * max(t - 0.6, 0.0))
    b = p.cav_b * (0.62 + 0.38 * min(max((t + 0.05) / 0.55, 0.0), 1.0) ** 0.7)
    return a, b, p.y_post - b


def polar_radius(theta: F32, a: float, b: float, p_lat: float, p_ant: float) -> F32:
    """Superellipse radius at angle theta (y posterior): rounder behind, flatter in front."""
    c = np.abs(np.cos(theta))
    s = np.abs(np.sin(theta))
    exponent = np.where(np.sin(theta) < 0, p_ant, p_lat).astype(np.float32)
    r = ((c / a) ** exponent + (s / b) ** exponent) ** (-1.0 / exponent)
    return r.astype(np.float32)


def spine_notch(theta: F32, p: Patient, b: float) -> F32:
    """How far the vertebral column pushes the back of the cavity in, by angle."""
    depth = 44.0 * p.scale * min(1.0, b / (0.8 * p.cav_b))
    return np.asarray(depth * np.exp(-(((theta - np.pi / 2) / 0.2) ** 2)), dtype=np.float32)


@dataclass
class Section:
    """Per-slice geometry shared by the painters (all images are grid-shaped)."""

    d: float
    x: F32
    y: F32
    rho: F32
    theta: F32
    r_cav: F32
    r_body: F32
    cav_y: float
    spine_y: float
    lung: F32 = field(default_factory=lambda: np.zeros((0, 0), np.float32))
    lobes: NDArray[np.uint8] = field(default_factory=lambda: np.zeros((0, 0), np.uint8))
    below_dome: Mask = field(default_factory=lambda: np.zeros((0, 0), bool))
    mediastinum: Mask = field(default_factory=lambda: np.zeros((0, 0), bool))


def outline(p: Patient, grid: Grid, d: float) -> Section:
    x, y = grid.xy()
    return outline_xy(p, x, y, d)


def outline_xy(p: Patient, x: F32, y: F32, d: float) -> Section:
    """Body and cavity outlines (polar radii round the cavity centre) at the points x, y."""
    a, b, cy = cavity_axes(p, d)
    dy = y - np.float32(cy)
    rho = np.sqrt(x * x + dy * dy)
    theta = np.arctan2(dy, x).astype(np.float32)
    r_cav = polar_radius(theta, a, b, 2.1, 1.95) - spine_notch(theta, p, b)
    t = p.t(d)
    post = np.clip(np.sin(theta), 0.0, 1.0)
    ant = np.clip(-np.sin(theta), 0.0, 1.0)
    lateral = np.abs(np.cos(theta))
    wall = 13.0 * p.scale + 9.0 * ant * (1.0 - 0.5 * smoothstep((t - 0.5) / 0.3))
    wall = wall + 26.0 * p.scale * post**2
    shoulders = float(smoothstep((0.28 - t) / 0.3)) * (26.0 if p.arms_up else 48.0) * p.scale
    wall = wall + shoulders * lateral**3
    fat = p.fat * (0.7 + 0.5 * lateral + 0.4 * post)
    r_body = polar_radius(theta, a, b, 2.1, 1.95) + wall + fat
    # lying supine flattens the back against the table
    flat = p.y_post + 30.0 * p.scale + p.fat * 0.9 - cy
    r_body = np.where(
        np.sin(theta) > 0.05, np.minimum(r_body, flat / np.maximum(np.sin(theta), 0.05)), r_body
    )
    if p.breast > 0:
        envelope = float(smoothstep((t - 0.3) / 0.15) * smoothstep((0.95 - t) / 0.2))
        for side in (-1.0, 1.0):
            centre = -np.pi / 2 + side * 0.62
            bump = np.exp(-(((theta - centre) / 0.38) ** 2)) * np.clip(-np.sin(theta), 0, 1)
            r_body = r_body + p.breast * envelope * bump
    spine_y = p.y_post - 26.0 * p.scale
    return Section(d, x, y, rho, theta, r_cav, r_body.astype(np.float32), cy, spine_y)
