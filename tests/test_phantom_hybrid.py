"""Tests of hybrids: synthetic COVID-19 lesions painted into a given HU volume (phantoms.hybrid).

Hybrids put the generator's lesions on real backgrounds for evaluation; here a phantom stands in
for the real series, so the test needs no real data and knows the lung exactly.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from hrct_triage.phantoms import COVID_KINDS, Phantom, StudySpec, generate, insert_covid


@pytest.fixture(scope="module")
def background() -> Phantom:
    """A normal chest without findings, 5 mm lung kernel, as the real development series is."""
    spec = StudySpec(slices=16, thickness=5.0, matrix=256, kernel="LUNG")
    return generate(21, spec, label="healthy", findings=())


def _insert(ph: Phantom, seed: int, severity: str = "moderate") -> tuple[object, ...]:
    hybrid = insert_covid(
        ph.hu,
        ph.lung,
        pixel_spacing=ph.pixel_spacing,
        slice_thickness=ph.thickness,
        z=ph.z,
        seed=seed,
        severity=severity,
    )
    return hybrid.hu, hybrid.lesion, hybrid.plan, hybrid.severity


def test_lesions_are_painted_in_the_lung_and_raise_its_density(background: Phantom) -> None:
    # when moderate COVID-19 is inserted into the normal chest
    hu, lesion, plan, severity = _insert(background, seed=4)
    assert isinstance(hu, np.ndarray) and isinstance(lesion, np.ndarray)
    # then there are lesions of that severity, COVID-19 patterns only
    assert severity == "moderate"
    assert {f.kind for f in plan.items} <= set(COVID_KINDS)  # type: ignore[attr-defined]
    assert lesion.any() and lesion.shape == background.hu.shape
    # the mask lies inside the lung
    assert not (lesion & ~background.lung).any()
    # where the mask is, the lung is denser: ground glass or consolidation
    rise = hu[lesion] - background.hu[lesion]
    assert float(np.mean(rise)) > 150.0
    assert float(np.median(hu[lesion])) > -750.0


def test_everything_but_the_lesions_is_left_as_it_was(background: Phantom) -> None:
    # when a solitary focus is inserted (multifocal disease reaches every slice of 16)
    hu, lesion, _, _ = _insert(background, seed=4, severity="focal")
    assert isinstance(hu, np.ndarray) and isinstance(lesion, np.ndarray)
    # then nothing outside the lung changes
    assert np.array_equal(hu[~background.lung], background.hu[~background.lung])
    # nor the lung slices far from the lesion
    rows = np.flatnonzero(lesion.any(axis=(1, 2)))
    far = [k for k in range(len(hu)) if np.abs(rows - k).min() > 2 and background.lung[k].any()]
    assert far
    assert np.array_equal(hu[far], background.hu[far])
    # and in the lung, away from the lesions (their soft margins aside), it barely changes
    near = np.stack([ndimage.binary_dilation(m, iterations=4) for m in lesion])
    away = background.lung & ~near
    changed = hu[away] != background.hu[away]
    assert float(np.mean(changed)) < 0.05
    assert float(np.mean(np.abs(hu[away] - background.hu[away]))) < 5.0


def test_hybrids_are_reproducible_by_seed(background: Phantom) -> None:
    # when the same seed is inserted twice, and another seed once
    first, again, other = (_insert(background, seed=s) for s in (4, 4, 5))
    # then the same seed paints the same lesions, another seed others
    assert np.array_equal(first[0], again[0]) and np.array_equal(first[1], again[1])
    assert not np.array_equal(first[1], other[1])
