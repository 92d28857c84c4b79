"""Drawing one patient at random: body, vessel trees, then lesions and confounders.

The order of the random draws fixes every phantom's bytes for a seed: change it and every study
changes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import numpy as np

from hrct_triage.phantoms.anatomy import LUNG, Anatomy, Label, Lesion
from hrct_triage.phantoms.lesions import SEVERITY_MIX, atelectasis, covid_lesions, vessel_blobs
from hrct_triage.phantoms.vessels import grow_vessels


def draw_anatomy(
    rng: np.random.Generator,
    *,
    label: Label,
    slices: int,
    mix: Mapping[str, float] | None = None,
) -> Anatomy:
    """One patient of ``label``; ``slices`` snaps small lesions to thin-slice centres."""
    base = Anatomy(
        label=label,
        size=float(rng.uniform(0.9, 1.08)),
        aspect=float(rng.uniform(0.94, 1.06)),
        fat_mm=float(rng.uniform(7.0, 22.0)),
        z_top=round(float(rng.uniform(-40.0, 60.0)), 1),
        pixel_spacing=round(float(rng.uniform(0.66, 0.76)), 4),
        lung_level=LUNG + float(rng.uniform(-20.0, 15.0)),
        noise_sigma=float(rng.uniform(15.0, 25.0)),
        dome_right=float(rng.uniform(0.66, 0.74)),
        dome_left=float(rng.uniform(0.72, 0.79)),
        heart_shift=float(rng.uniform(-6.0, 8.0)),
        signed_pixels=bool(rng.random() < 0.5),
    )
    vessels = grow_vessels(base, rng)
    lesions: list[Lesion] = []
    severity = "none"
    motion = 0
    # Confounders go mostly to healthy studies (where they cause the paper's false positives)
    # but sometimes to positive ones too, so that they never give the label away by themselves.
    confound = 0.5 if label == "healthy" else 0.2
    if label == "covid":
        shares = SEVERITY_MIX if mix is None else mix
        severity = str(rng.choice(list(shares), p=list(shares.values())))
        lesions += covid_lesions(base, rng, severity, slices)
    if rng.random() < confound:
        lesions += atelectasis(base, rng)
    if rng.random() < confound:
        lesions += vessel_blobs(base, rng, vessels)
    if rng.random() < confound * 0.8:
        motion = int(rng.integers(2, 6))
    return replace(
        base, lesions=tuple(lesions), vessels=vessels, motion_px=motion, severity=severity
    )
