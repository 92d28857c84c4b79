"""COVID-19-like opacities and the confounders that imitate them, drawn for one patient.

Positive studies get the pattern Yang et al. 2020 trained on (peripheral, posterior, bilateral,
multifocal ground glass, consolidation, crazy paving) at a severity drawn from a cohort mix;
confounders the paper names (dependent atelectasis, partial-volume vessel blobs) are not lesions
in the ground truth, so a model must learn to tell them apart.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from hrct_triage.phantoms.anatomy import (
    CHEST_LENGTH_MM,
    Anatomy,
    Lesion,
    Vessels,
    point_in_lung,
    sections,
)

_SEVERITY = {  # lesion count range, in-plane radius range (mm), share with consolidation/crazy
    "focal": ((1, 1), (6.0, 10.0), 0.0),
    "mild": ((3, 5), (9.0, 15.0), 0.2),
    "moderate": ((5, 8), (14.0, 26.0), 0.45),
    "severe": ((8, 14), (22.0, 40.0), 0.7),
}


# The paper's positives were admitted patients with lesions on HRCT; the two it missed (of 70)
# each had one solitary focal GGO. Focal disease is as rare here; the rest is multilobar.
SEVERITY_MIX = {"focal": 0.03, "mild": 0.22, "moderate": 0.4, "severe": 0.35}


def check_severity_mix(mix: Mapping[str, float]) -> None:
    """Refuse shares that name an unknown severity, are negative, or do not sum to 1."""
    unknown = sorted(set(mix) - set(_SEVERITY))
    if unknown:
        raise ValueError(f"unknown severity {', '.join(unknown)}; known: {', '.join(SEVERITY_MIX)}")
    if any(not math.isfinite(v) or v < 0 for v in mix.values()):
        raise ValueError("severity shares must be finite and >= 0")
    if abs(sum(mix.values()) - 1.0) > 1e-6:
        raise ValueError(f"severity shares must sum to 1, got {sum(mix.values()):g}")


def parse_severity_mix(text: str) -> dict[str, float]:
    """``"focal=0.05,mild=0.5,moderate=0.25,severe=0.2"`` as shares, checked; unnamed ones are 0.

    The order is always SEVERITY_MIX's, so the same shares written in another order draw the
    same patients.
    """
    given: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        if not sep:
            raise ValueError(f"severity share {part!r} is not NAME=SHARE")
        try:
            given[name.strip()] = float(value)
        except ValueError as exc:
            raise ValueError(f"severity share {part!r}: {value!r} is not a number") from exc
    check_severity_mix(given)
    return {name: given.get(name, 0.0) for name in SEVERITY_MIX}


_MULTILOBAR_T = (0.12, 0.9)  # share of the scan length (apex end 0) that multifocal disease spans


def covid_lesions(
    anat: Anatomy, rng: np.random.Generator, severity: str, snap: int
) -> list[Lesion]:
    """Peripheral, posterior, bilateral opacities; more and larger with severity.

    A focal study has one small GGO, mostly basal. Otherwise the lesions are multilobar: one
    per craniocaudal stratum of ``_MULTILOBAR_T``, alternating sides, each reaching far enough
    along the pleura to meet the next, so that (as in admitted patients) most lung slices
    show disease; severity sets how many and how large in the axial plane.
    """
    (lo, hi), (r_lo, r_hi), mixed = _SEVERITY[severity]
    count = int(rng.integers(lo, hi + 1))
    side = int(rng.choice([-1, 1]))
    t_lo, t_hi = _MULTILOBAR_T
    stratum = (t_hi - t_lo) / count
    out: list[Lesion] = []
    for k in range(count):
        for _ in range(50):  # a placement can fail (no lung there); never loop forever
            if severity == "focal":
                t = 0.18 + 0.74 * float(rng.beta(2.4, 1.5))
            else:
                t = t_lo + (k + float(rng.uniform(0.35, 0.65))) * stratum
            z = _slice_z(anat, t, snap)
            r = float(rng.uniform(r_lo, r_hi))
            point = _lung_point(anat, rng, z, side, depth=0.4 * r, posterior=1.0)
            if point is not None:
                break
        else:
            continue
        kind = "ggo"
        if rng.random() < mixed:
            kind = str(rng.choice(["consolidation", "crazy"]))
        along, across = r * float(rng.uniform(1.0, 1.5)), r * float(rng.uniform(0.55, 0.85))
        depth = r * float(rng.uniform(0.7, 1.1))
        if severity != "focal":
            depth = max(depth, float(rng.uniform(0.7, 0.9)) * stratum * CHEST_LENGTH_MM)
        out.append(
            Lesion(
                center=(point[0], point[1], z),
                radii=(along, across, depth),
                kind=kind,
                level=float(rng.uniform(-640.0, -420.0)),
                core_level=float(rng.uniform(-60.0, 40.0)),
                in_mask=True,
                phase=float(rng.uniform(0, 2 * math.pi)),
                angle=point[2] + math.pi / 2,
            )
        )
        side = -side
    return out


def atelectasis(anat: Anatomy, rng: np.random.Generator) -> list[Lesion]:
    """Dependent (posterior, basal, subpleural) atelectasis: a thin dense band, not COVID."""
    out: list[Lesion] = []
    for side in (-1, 1):
        z = anat.z_top - float(rng.uniform(0.78, 0.9)) * CHEST_LENGTH_MM
        point = _lung_point(anat, rng, z, side, depth=3.0, posterior=4.0)
        if point is None:
            continue
        out.append(
            Lesion(
                center=(point[0], point[1] + 2.0, z),
                radii=(
                    float(rng.uniform(22, 38)),
                    float(rng.uniform(4, 7)),
                    float(rng.uniform(14, 28)),
                ),
                kind="atelectasis",
                level=float(rng.uniform(-350.0, -150.0)),
                core_level=0.0,
                in_mask=False,
                phase=float(rng.uniform(0, 2 * math.pi)),
                angle=point[2] + math.pi / 2,
            )
        )
    return out


def vessel_blobs(anat: Anatomy, rng: np.random.Generator, vessels: Vessels) -> list[Lesion]:
    """Like-GGO blobs where a vessel runs obliquely through the slab (partial volume)."""
    mid = np.flatnonzero((vessels.radius > 0.8) & (vessels.radius < 2.2))
    if mid.size == 0:
        return []
    out: list[Lesion] = []
    for i in rng.choice(mid, size=min(int(rng.integers(2, 6)), mid.size), replace=False):
        c = (vessels.p0[i] + vessels.p1[i]) / 2.0
        r = float(rng.uniform(2.5, 4.5))
        out.append(
            Lesion(
                center=(float(c[0]), float(c[1]), float(c[2])),
                radii=(r, r * 0.9, r * 1.4),
                kind="blob",
                level=float(rng.uniform(-620.0, -450.0)),
                core_level=0.0,
                in_mask=False,
                phase=float(rng.uniform(0, 2 * math.pi)),
            )
        )
    return out


def _lung_point(
    anat: Anatomy, rng: np.random.Generator, z: float, side: int, depth: float, posterior: float
) -> tuple[float, float, float] | None:
    """A point ``depth`` mm inside the pleura of one lung, biased posterolaterally.

    Also returns the direction (radians) from the lung centre, i.e. the pleura's normal there.
    """
    sec = sections(anat, z)
    lung = sec.lungs[0 if side < 0 else 1]
    if lung is None:
        return None
    base = math.atan2(posterior, side * 0.8)
    for _ in range(12):
        theta = base + float(rng.normal(0.0, 0.7))
        dx, dy = math.cos(theta), math.sin(theta)
        cx, cy = lung.cx, lung.cy
        last: tuple[float, float] | None = None
        for step in range(1, 200):
            x, y = cx + dx * step, cy + dy * step
            if point_in_lung(sec, x, y):
                last = (x, y)
            elif last is not None:
                break
        if last is None:
            continue
        x, y = last[0] - dx * depth, last[1] - dy * depth
        if point_in_lung(sec, x, y):
            return x, y, theta
    return None


def _slice_z(anat: Anatomy, t: float, snap: int) -> float:
    """Table position at fraction t, snapped to a thin-slice centre so small lesions are seen."""
    k = min(max(int(t * snap), 0), snap - 1)
    return anat.z_top - (k + 0.5) * CHEST_LENGTH_MM / snap
