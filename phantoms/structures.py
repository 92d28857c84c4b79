"""The fixed 3-D anatomy of one patient: great vessels, airways, heart, ribs and other bones.

Why this exists: the mediastinum, the central airways and the skeleton are what a chest CT shows
around the lungs, and they must be the same solid objects in every slice (and in the thin and
thick series of one study), so they are drawn once per patient as tapered tubes and ellipsoids
in (x, y, z = -d) mm and cut per slice by the painters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from hrct_triage.phantoms.geometry import Tubes
from hrct_triage.phantoms.patient import Patient, cavity_axes, polar_radius, spine_notch

__all__ = ["Structures", "draw_structures"]

F64 = NDArray[np.floating[Any]]


@dataclass(frozen=True)
class Structures:
    """Tubes and solids of one patient, in (x, y, z = -d) mm."""

    aorta: Tubes
    great_vessels: Tubes  # pulmonary trunk and arteries, cavae, arch branches (blood)
    trachea_lumen: Tubes
    trachea_wall: Tubes
    oesophagus: Tubes
    rib_outer: Tubes
    rib_inner: Tubes
    cartilage: Tubes
    clavicle_outer: Tubes
    clavicle_inner: Tubes
    humerus: Tubes
    arms: Tubes
    heart_centre: F64
    heart_axes: F64
    heart_rot: F64  # rows are the ellipsoid's axes in patient space
    atrium_centre: F64  # left atrium: behind the heart, in front of oesophagus and spine
    atrium_axes: F64
    hila: F64  # (2, 3) right, left
    calcifications: F64  # (n, 4): x, y, z, radius


def _poly(points: list[tuple[float, float, float]], r0: float, r1: float) -> Tubes:
    pts = np.array([(x, y, -d) for x, y, d in points], dtype=np.float64)
    n = len(pts) - 1
    radii = np.linspace(r0, r1, n + 1)
    return Tubes(pts[:-1], pts[1:], radii[:-1], radii[1:]).subdivided(20.0)


def _rotation(yaw: float, pitch: float) -> F64:
    cz, sz = math.cos(yaw), math.sin(yaw)
    cx, sx = math.cos(pitch), math.sin(pitch)
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    return np.asarray(rz @ rx)


def draw_structures(p: Patient, rng: np.random.Generator) -> Structures:
    s = p.scale
    h = p.lung_height
    sy = p.y_post - 26.0 * s  # vertebral body centre
    front = p.y_post - 2.0 * p.cav_b  # inner anterior chest wall at full size
    aorta = Tubes.concat(
        [
            _poly(
                [
                    (-4 * s, front + 62 * s, 0.64 * h),
                    (-10 * s, front + 52 * s, 0.5 * h),
                    (-8 * s, front + 55 * s, 0.34 * h),
                    (-2 * s, front + 66 * s, 0.27 * h),
                    (10 * s, sy - 50 * s, 0.245 * h),
                    (20 * s, sy - 30 * s, 0.27 * h),
                    (22 * s, sy - 22 * s, 0.34 * h),
                ],
                16.5 * s,
                14.0 * s,
            ),
            _poly(
                [
                    (22 * s, sy - 22 * s, 0.34 * h),
                    (18 * s, sy - 24 * s, 0.7 * h),
                    (8 * s, sy - 26 * s, 1.3 * h),
                ],
                13.0 * s,
                12.0 * s,
            ),
        ]
    )
    hil_r = np.array([-44.0 * s, sy - 62.0 * s, -0.43 * h])
    hil_l = np.array([44.0 * s, sy - 56.0 * s, -0.41 * h])
    bif = (8 * s, front + 72 * s, 0.43 * h)
    great = Tubes.concat(
        [
            _poly(
                [(16 * s, front + 48 * s, 0.6 * h), (14 * s, front + 58 * s, 0.5 * h), bif],
                15.5 * s,
                14.5 * s,
            ),
            _poly(
                [
                    bif,
                    (-14 * s, front + 80 * s, 0.44 * h),
                    (float(hil_r[0]) + 8 * s, float(hil_r[1]), 0.44 * h),
                ],
                12.0 * s,
                10.0 * s,
            ),
            _poly(
                [
                    bif,
                    (28 * s, float(hil_l[1]) - 8 * s, 0.41 * h),
                    (float(hil_l[0]) - 6 * s, float(hil_l[1]), 0.42 * h),
                ],
                12.0 * s,
                10.0 * s,
            ),
            _poly(
                [(-28 * s, front + 58 * s, -0.15 * h), (-28 * s, front + 60 * s, 0.56 * h)],
                10.5 * s,
                12.0 * s,
            ),  # superior vena cava
            _poly(
                [(38 * s, front + 40 * s, 0.02 * h), (-22 * s, front + 52 * s, 0.16 * h)],
                6.5 * s,
                7.5 * s,
            ),  # left brachiocephalic vein
            _poly(
                [
                    (-2 * s, front + 64 * s, 0.26 * h),
                    (-12 * s, front + 58 * s, 0.1 * h),
                    (-16 * s, front + 60 * s, -0.2 * h),
                ],
                6.5 * s,
                5.5 * s,
            ),
            _poly(
                [(6 * s, sy - 52 * s, 0.25 * h), (8 * s, sy - 50 * s, -0.2 * h)], 4.5 * s, 4.0 * s
            ),
            _poly(
                [
                    (16 * s, sy - 38 * s, 0.25 * h),
                    (24 * s, sy - 34 * s, 0.05 * h),
                    (34 * s, sy - 34 * s, -0.2 * h),
                ],
                5.5 * s,
                5.0 * s,
            ),
            _poly(
                [(-4 * s, sy - 18 * s, 0.9 * h), (-6 * s, sy - 16 * s, 1.3 * h)], 11.0 * s, 12.0 * s
            ),  # inferior vena cava
        ]
    )
    carina = (0.0, sy - 42 * s, 0.3 * h)
    trachea = [(0.0, sy - 46 * s, -0.3 * h), (0.0, sy - 44 * s, 0.2 * h), carina]
    bronchi_r = [
        carina,
        (float(hil_r[0]) * 0.5, float(hil_r[1]) + 4, 0.37 * h),
        (float(hil_r[0]), float(hil_r[1]) + 6, -float(hil_r[2])),
    ]
    bronchi_l = [
        carina,
        (float(hil_l[0]) * 0.55, float(hil_l[1]) + 2, 0.36 * h),
        (float(hil_l[0]), float(hil_l[1]) + 6, -float(hil_l[2])),
    ]
    lumen = Tubes.concat(
        [
            _poly(trachea, 8.5 * s, 8.0 * s),
            _poly(bronchi_r, 6.5 * s, 5.5 * s),
            _poly(bronchi_l, 6.0 * s, 5.0 * s),
        ]
    )
    wall = Tubes.concat(
        [
            _poly(trachea, 10.5 * s, 10.0 * s),
            _poly(bronchi_r, 8.0 * s, 7.0 * s),
            _poly(bronchi_l, 7.5 * s, 6.5 * s),
        ]
    )
    oes = _poly(
        [
            (4 * s, sy - 26 * s, -0.3 * h),
            (10 * s, sy - 28 * s, 0.6 * h),
            (22 * s, sy - 40 * s, 1.1 * h),
        ],
        7.5 * s,
        8.0 * s,
    )
    ribs_o, ribs_i, cart = _ribs(p, rng)
    clav = [
        _poly(
            [
                (side * 16 * s, front + 6 * s, -0.02 * h),
                (side * 75 * s, front + 10 * s, -0.1 * h),
                (side * 130 * s, front + 50 * s, -0.14 * h),
            ],
            7.0 * s,
            6.0 * s,
        )
        for side in (-1, 1)
    ]
    clav_o = Tubes.concat(clav)
    clav_i = clav_o.grown(-2.0)
    humerus: list[Tubes] = []
    arms: list[Tubes] = []
    for side in (-1, 1):
        if p.arms_up:  # humeral heads above the scan; only the shoulder girdle shows
            continue
        else:
            xa = side * (p.cav_a + 60 * s + 1.7 * p.fat)
            humerus.append(
                _poly([(xa * 0.93, 0.0, 0.0), (xa, 10.0 * s, 1.1 * h)], 20.0 * s, 11.0 * s)
            )
            arms.append(
                _poly(
                    [(xa * 0.95, 0.0, -0.05 * h), (xa, 10.0 * s, 1.3 * h)],
                    45.0 * s + 0.5 * p.fat,
                    38.0 * s + 0.5 * p.fat,
                )
            )
    heart_c = np.array([(14.0 + p.heart_shift) * s, front + 60.0 * s, -0.68 * h])
    axes = np.array([60.0, 50.0, 50.0]) * s * p.heart_size
    rot = _rotation(math.radians(-38.0), math.radians(25.0))
    calc = np.zeros((0, 4))
    if p.calcified:
        pts = [aorta.p0[rng.integers(0, len(aorta), 8)], great.p0[rng.integers(0, 6, 2)]]
        base = np.concatenate(pts)
        jitter = rng.normal(0.0, 1.0, base.shape)
        jitter /= np.linalg.norm(jitter, axis=1, keepdims=True)
        base = base + jitter * 13.0 * s
        calc = np.concatenate([base, rng.uniform(0.8, 2.2, (len(base), 1))], axis=1)
    return Structures(
        aorta=aorta,
        great_vessels=great,
        trachea_lumen=lumen,
        trachea_wall=wall,
        oesophagus=oes,
        rib_outer=ribs_o,
        rib_inner=ribs_i,
        cartilage=cart,
        clavicle_outer=clav_o,
        clavicle_inner=clav_i,
        humerus=Tubes.concat(humerus),
        arms=Tubes.concat(arms),
        heart_centre=heart_c,
        heart_axes=axes,
        heart_rot=rot,
        atrium_centre=np.array([2.0 * s, sy - 44.0 * s, -0.6 * h]),
        atrium_axes=np.array([34.0, 20.0, 26.0]) * s * p.heart_size,
        hila=np.stack([hil_r, hil_l]),
        calcifications=calc,
    )


def _ribs(p: Patient, rng: np.random.Generator) -> tuple[Tubes, Tubes, Tubes]:
    """Twelve pairs of ribs: from beside the spine, round the cavity, down to the front."""
    s = p.scale
    outer: list[Tubes] = []
    inner: list[Tubes] = []
    cart: list[Tubes] = []
    gap = 23.5 * s
    for k in range(12):
        d0 = -0.07 * p.lung_height + k * gap + float(rng.normal(0, 1.5))
        reach = 1.0 if k < 7 else (0.8 if k < 10 else 0.45)
        drop = (115.0 + 3.0 * k) * s if k > 0 else 50.0 * s
        u = np.linspace(0.0, reach, max(10, int(26 * reach)))
        for side in (-1, 1):
            theta = np.pi / 2 + side * (0.22 + u * (np.pi - 0.44 - (0.25 if k == 0 else 0.05)))
            theta = np.where(side < 0, theta, theta)
            dd = d0 + drop * (1.0 - np.cos(np.pi * u)) / 2.0
            pts = []
            for th, dk in zip(theta, dd, strict=True):
                a, b, cy = cavity_axes(p, float(dk))
                r = float(polar_radius(np.array([th], np.float32), a, b, 2.1, 1.95)[0])
                r -= float(spine_notch(np.array([th], np.float32), p, b)[0]) * 0.2
                r += 6.0 * s
                x = side * abs(r * math.cos(th)) if side > 0 else -abs(r * math.cos(th))
                pts.append((x, cy + r * math.sin(th), -float(dk)))
            arr = np.array(pts)
            radius = np.linspace(4.6, 3.6, len(arr)) * s
            tube = Tubes(arr[:-1], arr[1:], radius[:-1], radius[1:])
            bone = np.ones(len(tube), dtype=bool)
            if k < 7:  # the anterior quarter is costal cartilage
                bone = u[:-1] < 0.78
            outer.append(tube.take(bone))
            inner.append(tube.take(bone).grown(-1.5))
            cart.append(tube.take(~bone).grown(0.3))
    return Tubes.concat(outer), Tubes.concat(inner), Tubes.concat(cart)
