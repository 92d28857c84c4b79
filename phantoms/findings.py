"""COVID-19 pneumonia and the lung findings a triage model must not mistake for it.

Why this exists: a model that has only ever seen empty lungs beside COVID-19 lungs will call
any abnormal lung COVID-19, and in a hospital most abnormal chest CTs are something else. So
the positives follow the typical appearance radiologists describe (bilateral, peripheral,
posterior and lower-lobe ground glass with vessels visible through it, crazy paving,
consolidation, reverse halo, perilobular/organising arcades, subpleural bands; from one focus
to diffuse), and the negatives carry their own findings, each with its own label: nodules and
masses, dependent and plate atelectasis, pleural effusion, fibrosis with honeycombing,
bronchiectasis, emphysema, mosaic attenuation, motion, and lobar or segmental bacterial
consolidation ("other pneumonia").

A finding is a 3-D object drawn once per study (centre, extent, texture seeds) from a lung
atlas; ``lesion_painting`` paints it per thin slice into whatever HU image it is given.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from hrct_triage.phantoms.geometry import Tubes

__all__ = [
    "CONFOUNDERS",
    "CONFOUNDER_WEIGHTS",
    "COVID_KINDS",
    "FINDINGS",
    "SEVERITY_MIX",
    "WHOLE_LUNG",
    "Atlas",
    "Finding",
    "Plan",
    "draw_findings",
]

F64 = NDArray[np.floating[Any]]

COVID_KINDS = (
    "ggo",
    "crazy_paving",
    "consolidation",
    "reverse_halo",
    "perilobular",
    "subpleural_band",
)
CONFOUNDERS = (
    "nodule",
    "mass",
    "atelectasis",
    "plate_atelectasis",
    "effusion",
    "fibrosis",
    "bronchiectasis",
    "emphysema",
    "mosaic",
    "motion",
    "other_pneumonia",
)
# How often each confounder is drawn, relative to the others
CONFOUNDER_WEIGHTS = {
    "nodule": 1.2,
    "mass": 0.6,
    "atelectasis": 1.0,
    "plate_atelectasis": 0.6,
    "effusion": 0.6,
    "fibrosis": 0.6,
    "bronchiectasis": 0.6,
    "emphysema": 0.8,
    "mosaic": 0.5,
    "motion": 0.7,
    "other_pneumonia": 1.3,
}
# Findings drawn over the whole lung (or all its bases), not round a centre
WHOLE_LUNG = ("fibrosis", "mosaic", "emphysema", "effusion", "atelectasis", "bronchiectasis")
FINDINGS: dict[str, int] = {name: i + 1 for i, name in enumerate(COVID_KINDS + CONFOUNDERS)}
# Lesion count range and envelope radius range (mm). Apart from a solitary focus, the COVID-19
# pneumonia of admitted patients is multilobar and bilateral from apex to base; severity is how
# large and confluent the lesions are, not how few slices they touch.
SEVERITIES = {
    "focal": ((1, 1), (8.0, 18.0)),
    "mild": ((10, 16), (10.0, 20.0)),
    "moderate": ((12, 20), (14.0, 30.0)),
    "severe": ((16, 26), (22.0, 50.0)),
}
# The positives of a run follow the paper's cohort of admitted patients: a few solitary foci,
# the rest multilobar disease of every extent.
SEVERITY_MIX = {"focal": 0.03, "mild": 0.22, "moderate": 0.40, "severe": 0.35}


@dataclass(frozen=True)
class Atlas:
    """Where the lung is: coarse lung voxels (x, y, d in mm) with their lobe (1-5, 0 unknown),
    distance to the pleura (mm, in plane) and relative position (0 anterior/apex .. 1
    posterior/base)."""

    points: F64
    lobe: NDArray[np.int64]
    pleura: F64
    posterior: F64
    lower: F64
    height: float  # lung height (mm)

    def side(self) -> NDArray[np.int64]:
        return np.where(self.lobe > 0, np.where(self.lobe <= 3, -1, 1), np.sign(self.points[:, 0]))


@dataclass(frozen=True)
class Finding:
    kind: str
    covid: bool
    centre: tuple[float, float, float]  # x, y, d
    radii: tuple[float, float, float]
    angle: float  # in-plane rotation (long axis along the pleura)
    level: float  # main HU
    level2: float  # second HU (core, ring, septa, walls)
    seed: int
    lobe: int = 0
    spheres: F64 | None = None  # (n, 4) x, y, d, r: cysts, holes
    tubes: Tubes | None = None  # spicules or dilated bronchi
    extra: float = 0.0  # kind-specific (band depth, effusion thickness, septal spacing)

    def d_range(self) -> tuple[float, float]:
        """Depths (mm below the apex) of the slices the finding may show in."""
        if self.kind in WHOLE_LUNG:
            return -1e9, 1e9
        return self.centre[2] - self.radii[2] * 1.6, self.centre[2] + self.radii[2] * 1.6


@dataclass(frozen=True)
class Plan:
    items: tuple[Finding, ...]
    severity: str
    motion: float


# ------------------------------------------------------------------------------------------
# Drawing the findings of one study
# ------------------------------------------------------------------------------------------


def _pick(rng: np.random.Generator, weights: F64) -> int:
    w = np.clip(weights, 0.0, None)
    return int(rng.choice(w.size, p=w / w.sum()))


def _along_pleura(atlas: Atlas, i: int) -> float:
    """In-plane angle along the pleura at atlas point i (perpendicular to the outward ray)."""
    x, y, _ = atlas.points[i]
    side = -1.0 if x < 0 else 1.0
    return math.atan2(y - 0.0, x - side * 60.0) + math.pi / 2


def draw_findings(
    rng: np.random.Generator,
    atlas: Atlas,
    *,
    label: str,
    findings: tuple[str, ...] | None = None,
    severity: str | None = None,
    age: float = 50.0,
) -> Plan:
    """The findings of one study: COVID-19 lesions for "covid", confounders drawn (or forced
    by ``findings``) for both labels, so that no confounder gives the label away."""
    items: list[Finding] = []
    sev = "none"
    if label == "covid":
        sev = severity or str(rng.choice(list(SEVERITY_MIX), p=list(SEVERITY_MIX.values())))
        items += _covid(rng, atlas, sev)
    if findings is None:
        chosen: list[str] = []
        chance = 0.6 if label != "covid" else 0.2
        if rng.random() < chance:
            k = 1 + int(rng.random() < 0.3)
            weights = np.array([CONFOUNDER_WEIGHTS[name] for name in CONFOUNDERS])
            chosen = [CONFOUNDERS[_pick(rng, weights)] for _ in range(k)]
        if age > 65 and rng.random() < 0.35 and "emphysema" not in chosen:
            chosen.append("emphysema")
    else:
        chosen = list(findings)
    motion = 0.0
    for kind in chosen:
        if kind == "motion":
            motion = float(rng.uniform(2.0, 6.0))
            items.append(Finding("motion", False, (0, 0, 0), (0, 0, 0), 0, 0, 0, 0))
            continue
        items += _confounder(rng, atlas, kind)
    return Plan(tuple(items), sev, motion)


def _covid(rng: np.random.Generator, atlas: Atlas, severity: str) -> list[Finding]:
    (lo, hi), (r_lo, r_hi) = SEVERITIES[severity]
    count = int(rng.integers(lo, hi + 1))
    mixed = {"focal": 0.1, "mild": 0.3, "moderate": 0.5, "severe": 0.65}[severity]
    base = np.exp(-atlas.pleura / 9.0) * (0.25 + atlas.posterior) * (0.2 + atlas.lower**1.5)
    sides = atlas.side()
    side = int(rng.choice([-1, 1]))
    out: list[Finding] = []
    # multilobar disease: each lesion in its own band of lung height, apex to base, so that the
    # lesions spread over the lungs' length (a solitary focus goes where the weights put it)
    bands = rng.permutation(count)
    for k in range(count):
        w = base * (sides == side)
        if count > 1:
            band = (atlas.lower >= bands[k] / count) & (atlas.lower < (bands[k] + 1) / count)
            if np.any(w * band > 0):
                w = w * band
        i = _pick(rng, w)
        x, y, d = atlas.points[i]
        r = float(rng.uniform(r_lo, r_hi))
        kind = "ggo"
        if rng.random() < mixed:
            kind = str(
                rng.choice(
                    [
                        "crazy_paving",
                        "consolidation",
                        "reverse_halo",
                        "perilobular",
                        "subpleural_band",
                    ],
                    p=[0.36, 0.3, 0.1, 0.12, 0.12],
                )
            )
        angle = _along_pleura(atlas, i)
        radii = (
            r * float(rng.uniform(1.1, 1.6)),
            r * float(rng.uniform(0.55, 0.85)),
            r * float(rng.uniform(0.6, 1.1)),
        )
        level = float(rng.uniform(-720.0, -480.0))
        level2 = float(rng.uniform(-80.0, 40.0))
        extra = 0.0
        if kind == "crazy_paving":
            level2 = float(rng.uniform(-450.0, -250.0))
            extra = float(rng.uniform(5.0, 9.0))
        elif kind == "subpleural_band":
            radii = (r * 1.4, r * 0.5, float(rng.uniform(6.0, 16.0)))
            level = float(rng.uniform(-350.0, -100.0))
            extra = float(rng.uniform(4.0, 12.0))
        elif kind == "perilobular":
            level = float(rng.uniform(-780.0, -650.0))
            level2 = float(rng.uniform(-300.0, -100.0))
            extra = float(rng.uniform(10.0, 16.0))
        out.append(
            Finding(
                kind,
                True,
                (float(x), float(y), float(d)),
                radii,
                angle,
                level,
                level2,
                int(rng.integers(1 << 30)),
                int(atlas.lobe[i]),
                extra=extra,
            )
        )
        if rng.random() < 0.8:  # mostly bilateral: alternate
            side = -side
    if severity == "severe":  # confluent lower-lobe ground glass on both sides
        for sd in (-1, 1):
            w = (
                np.exp(-atlas.pleura / 20.0)
                * atlas.lower**2
                * (0.3 + atlas.posterior)
                * (sides == sd)
            )
            i = _pick(rng, w)
            x, y, d = atlas.points[i]
            r = float(rng.uniform(45.0, 70.0))
            out.append(
                Finding(
                    "ggo",
                    True,
                    (float(x), float(y), float(d)),
                    (r * 1.3, r, r),
                    _along_pleura(atlas, i),
                    float(rng.uniform(-700.0, -560.0)),
                    0.0,
                    int(rng.integers(1 << 30)),
                    int(atlas.lobe[i]),
                )
            )
    return out


def _confounder(rng: np.random.Generator, atlas: Atlas, kind: str) -> list[Finding]:
    seed = int(rng.integers(1 << 30))
    if kind == "mass":
        return [_mass(rng, atlas)]
    if kind == "nodule":
        n = int(rng.integers(1, 4))
        out = []
        for _ in range(n):
            i = _pick(rng, np.ones(len(atlas.lobe)) * (atlas.pleura > 4))
            x, y, d = atlas.points[i]
            r = float(rng.uniform(3.0, 10.0))
            calcified = rng.random() < 0.2
            level = float(rng.uniform(350, 700)) if calcified else float(rng.uniform(15, 55))
            out.append(
                Finding(
                    kind,
                    False,
                    (float(x), float(y), float(d)),
                    (r * float(rng.uniform(0.9, 1.2)), r, r * 0.95),
                    0.0,
                    level,
                    0.0,
                    int(rng.integers(1 << 30)),
                )
            )
        return out
    if kind == "atelectasis":
        return [
            Finding(
                kind,
                False,
                (0, 0, atlas.height * float(rng.uniform(0.55, 0.75))),
                (0, 0, 0),
                0.0,
                float(rng.uniform(-520, -250)),
                0.0,
                seed,
                extra=float(rng.uniform(4.0, 12.0)),
            )
        ]
    if kind == "plate_atelectasis":
        out = []
        for _ in range(int(rng.integers(1, 4))):
            i = _pick(rng, atlas.lower**2 * (atlas.pleura > 5))
            x, y, d = atlas.points[i]
            out.append(
                Finding(
                    kind,
                    False,
                    (float(x), float(y), float(d)),
                    (float(rng.uniform(15, 35)),) * 3,
                    float(rng.uniform(0, math.pi)),
                    float(rng.uniform(-150, 0)),
                    float(rng.uniform(-0.35, 0.35)),
                    int(rng.integers(1 << 30)),
                    extra=float(rng.uniform(2.0, 4.0)),
                )
            )
        return out
    if kind == "effusion":
        side = int(rng.choice([-1, 1, 0]))
        top = atlas.height * float(rng.uniform(0.45, 0.75))
        return [
            Finding(
                kind,
                False,
                (float(side), 0, top),
                (0, 0, 0),
                0.0,
                float(rng.uniform(0, 20)),
                float(rng.uniform(-400, -150)),
                seed,
                extra=float(rng.uniform(15.0, 60.0)),
            )
        ]
    if kind == "fibrosis":
        w = np.exp(-atlas.pleura / 6.0) * atlas.lower**2 * (0.2 + atlas.posterior)
        n = int(rng.integers(120, 500))
        idx = rng.choice(len(w), size=n, p=w / w.sum())
        pts = atlas.points[idx] + rng.uniform(-2.0, 2.0, (n, 3))
        radius = rng.uniform(1.5, 4.0, n)
        return [
            Finding(
                kind,
                False,
                (0, 0, 0),
                (0, 0, 0),
                0.0,
                float(rng.uniform(-350, -150)),
                -960.0,
                seed,
                spheres=np.concatenate([pts, radius[:, None]], 1),
                extra=float(rng.uniform(6.0, 14.0)),
            )
        ]
    if kind == "emphysema":
        w = (1.2 - atlas.lower) ** 2 * (0.6 + 0.4 * np.exp(-atlas.pleura / 15.0))
        n = int(rng.integers(150, 1200))
        idx = rng.choice(len(w), size=n, p=w / w.sum())
        pts = atlas.points[idx] + rng.uniform(-2.0, 2.0, (n, 3))
        radius = np.clip(rng.gamma(2.0, 1.2, n), 1.0, 9.0)
        return [
            Finding(
                kind,
                False,
                (0, 0, 0),
                (0, 0, 0),
                0.0,
                float(rng.uniform(-990, -960)),
                0.0,
                seed,
                spheres=np.concatenate([pts, radius[:, None]], 1),
            )
        ]
    if kind == "mosaic":
        return [
            Finding(
                kind,
                False,
                (0, 0, 0),
                (0, 0, 0),
                0.0,
                float(rng.uniform(-130, -60)),
                float(rng.uniform(10, 35)),
                seed,
                extra=float(rng.uniform(25, 45)),
            )
        ]
    if kind == "bronchiectasis":
        lobes = tuple(
            sorted(
                {int(v) for v in rng.choice([1, 2, 3, 4, 5], size=2, p=[0.1, 0.2, 0.3, 0.1, 0.3])}
            )
        )
        return [
            Finding(
                kind,
                False,
                (0, 0, 0),
                (0, 0, 0),
                0.0,
                20.0,
                -1000.0,
                seed,
                lobe=lobes[0] * 10 + (lobes[-1] if len(lobes) > 1 else 0),
                extra=float(rng.uniform(1.8, 2.8)),
            )
        ]
    if kind == "other_pneumonia":
        lobe = int(rng.choice([1, 2, 3, 4, 5], p=[0.2, 0.15, 0.3, 0.1, 0.25]))
        members = np.flatnonzero(atlas.lobe == lobe)
        if members.size == 0:
            members = np.arange(len(atlas.lobe))
        i = int(rng.choice(members))
        x, y, d = atlas.points[i]
        lobar = rng.random() < 0.4
        r = 200.0 if lobar else float(rng.uniform(35.0, 60.0))
        return [
            Finding(
                kind,
                False,
                (float(x), float(y), float(d)),
                (r, r, r),
                0.0,
                float(rng.uniform(-40, 45)),
                float(rng.uniform(-650, -450)),
                seed,
                lobe=lobe,
            )
        ]
    raise ValueError(f"unknown finding {kind!r}")


def _mass(rng: np.random.Generator, atlas: Atlas) -> Finding:
    """A lung cancer: lobulated and spiculated, abutting the pleura or mediastinum about half the
    time, and in about half of cases wrapped in ground glass or obstructive change (``level2``
    its HU, ``extra`` how far beyond the solid edge it reaches, as a fraction of the radius).

    Real masses carry exactly the hazy, irregular margins a COVID-19 model might mistake for
    ground glass, so the negatives must show them."""
    attached = rng.random() < 0.5
    near = np.exp(-atlas.pleura / 5.0) if attached else (atlas.pleura > 4).astype(np.float64)
    i = _pick(rng, near)
    x, y, d = atlas.points[i]
    r = float(rng.uniform(12.0, 35.0))
    halo = rng.random() < 0.5
    return Finding(
        "mass",
        False,
        (float(x), float(y), float(d)),
        (r * float(rng.uniform(0.85, 1.3)), r, r * float(rng.uniform(0.8, 1.1))),
        float(rng.uniform(0.0, math.pi)),
        float(rng.uniform(15, 55)),
        float(rng.uniform(-650.0, -350.0)) if halo else 0.0,
        int(rng.integers(1 << 30)),
        tubes=_spicules(rng, (x, y, d), r),
        extra=float(rng.uniform(0.15, 0.4)) if halo else 0.0,
    )


def _spicules(rng: np.random.Generator, c: tuple[float, float, float], r: float) -> Tubes:
    n = int(rng.integers(6, 16))
    dirs = rng.normal(size=(n, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    centre = np.array([c[0], c[1], -c[2]])
    length = rng.uniform(6.0, 22.0, n)
    p0 = centre + dirs * r * 0.85
    p1 = centre + dirs * (r + length)[:, None]
    return Tubes(p0, p1, rng.uniform(0.8, 1.6, n), np.full(n, 0.3)).subdivided(10.0)
