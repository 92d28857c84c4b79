"""The domain guard with the shipped weights and their reference: phantoms made as the training
set was fall inside; extreme noise, a scan of the lung bases only and a head CT fall outside (or are
not analysed at all); the real series get a score, and the SR says what the score says."""

from __future__ import annotations

import os
from pathlib import Path

import pydicom
import pytest
from pydicom import Dataset

from hrct_triage.worker.method.checkpoints import DEMO_CHECKPOINT
from hrct_triage.worker.method.domain import reference_path
from hrct_triage.worker.method.domain_inputs import read_study_inputs
from hrct_triage.worker.method.model import LoadedModel, load_model
from hrct_triage.worker.method.pipeline import analyse_study
from hrct_triage.worker.method.results import NotApplicable
from hrct_triage.worker.outputs.sr import NO, WITHIN_VALIDATED_DOMAIN, YES, build_sr
from tests.helpers.domain_inputs import lung_bases_copy, noisy_copy, write_head_ct
from tests.helpers.fake_study import WHEN

pytestmark = pytest.mark.skipif(
    not reference_path(DEMO_CHECKPOINT).exists(), reason="the shipped weights have no reference"
)


@pytest.fixture(scope="module")
def model() -> LoadedModel:
    loaded = load_model(DEMO_CHECKPOINT, allow_untrained=False, device="cpu")
    assert loaded.domain is not None
    return loaded


@pytest.fixture(scope="module")
def training_like(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two phantoms with the training set's options under a seed of their own."""
    from hrct_triage.phantoms import write_phantom_studies

    out = tmp_path_factory.mktemp("training-like")
    write_phantom_studies(
        out, covid=1, healthy=1, slices=64, seed=4711, matrix=256, randomise_acquisition=True
    )
    return out


def test_phantoms_like_the_training_inputs_lie_inside(
    model: LoadedModel, training_like: Path
) -> None:
    for study in ("covid_001", "healthy_001"):
        score = read_study_inputs(training_like / study, model).domain_score
        assert score is not None and score <= 1.0, (study, score)


def test_extreme_noise_falls_outside(
    model: LoadedModel, training_like: Path, tmp_path: Path
) -> None:
    # the training phantoms reach ~170 HU of noise in the lung; 600 HU more is far beyond
    noisy = noisy_copy(training_like / "healthy_001", tmp_path / "noisy", sigma_hu=600.0)
    score = read_study_inputs(noisy, model).domain_score
    assert score is not None and score > 1.0


def test_lung_bases_alone_fall_outside(
    model: LoadedModel, training_like: Path, tmp_path: Path
) -> None:
    bases = lung_bases_copy(training_like / "healthy_001", tmp_path / "bases")
    try:
        score = read_study_inputs(bases, model).domain_score
    except NotApplicable:
        return  # not analysed at all is as safe as outside
    assert score is not None and score > 1.0


def test_a_head_ct_is_not_taken_for_a_chest(model: LoadedModel, tmp_path: Path) -> None:
    head = write_head_ct(tmp_path / "head")
    try:
        score = read_study_inputs(head, model).domain_score
    except NotApplicable as exc:
        assert "lung" in exc.reason
        return
    assert score is not None and score > 1.0


def _real_series() -> list[Path]:
    """Each real series folder (HRCT_REAL_CT, else a ``shared/real-ct`` above us)."""
    given = os.environ.get("HRCT_REAL_CT")
    roots = [Path(given)] if given else [p / "shared" / "real-ct" for p in Path(__file__).parents]
    for root in roots:
        if root.is_dir():
            return sorted({p.parent for p in root.glob("*/*/*.dcm")})
    return []


@pytest.mark.realct
def test_real_series_get_a_score_and_the_sr_states_it(model: LoadedModel) -> None:
    series = _real_series()
    if not series:
        pytest.skip("no real chest CT beside the checkout (HRCT_REAL_CT)")
    for folder in series:
        paths = sorted(folder.glob("*.dcm"))
        study_uid = str(pydicom.dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)
        analysis, headers = analyse_study(study_uid, paths, model, heatmaps=0)
        assert analysis.domain_score is not None
        assert analysis.in_domain == (analysis.domain_score <= 1.0)
        print(f"{folder.name}: domain score {analysis.domain_score}")
        sr = build_sr(analysis, headers, [], content_datetime=WHEN)
        said = [
            item.ConceptCodeSequence[0].CodeValue
            for group in sr.ContentSequence
            for item in _items(group)
            if "ConceptNameCodeSequence" in item
            and item.ConceptNameCodeSequence[0].CodeValue == WITHIN_VALIDATED_DOMAIN.value
        ]
        assert said == [(YES if analysis.in_domain else NO).value]


def _items(item: Dataset) -> list[Dataset]:
    found = [item]
    for child in item.get("ContentSequence", []):
        found.extend(_items(child))
    return found
