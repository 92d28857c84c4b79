"""What the domain guard reads of one study folder, as the worker would analyse it: the mean pooled
feature of the kept lung slices, the input statistics and the study probability. Used to build a
checkpoint's reference and to measure where other series fall."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hrct_triage.worker.method.decision import decision_rule
from hrct_triage.worker.method.input_statistics import input_statistics
from hrct_triage.worker.method.model import LoadedModel
from hrct_triage.worker.method.pipeline import score_volume, study_domain_score
from hrct_triage.worker.method.series import select_series
from hrct_triage.worker.method.volume import load_volume

__all__ = ["StudyInputs", "read_study_inputs"]


@dataclass(frozen=True)
class StudyInputs:
    """One study as the domain guard sees it; ``domain_score`` against the model's reference."""

    name: str
    feature: list[float]
    input_stats: dict[str, Any]
    probability: float
    domain_score: float | None


def read_study_inputs(folder: Path, model: LoadedModel, *, min_slices: int = 20) -> StudyInputs:
    """Select, load and score the study in ``folder`` with the checkpoint's decision rule.

    Raises ``NotApplicable`` (no series fits, no lung) as the worker would.
    """
    rule = decision_rule(model.metadata)
    series = select_series(sorted(folder.rglob("*.dcm")), min_slices=min_slices)
    volume = load_volume(series)
    scored = score_volume(volume, model, trim_fraction=rule.trim_fraction)
    stats = input_statistics(
        volume.hu,
        scored.lung,
        pixel_spacing=volume.pixel_spacing,
        slice_spacing=volume.slice_spacing,
    )
    kept = scored.scores.features[list(scored.study.kept)]
    return StudyInputs(
        name=folder.name,
        feature=[float(v) for v in kept.mean(axis=0)],
        input_stats=stats,
        probability=scored.study.probability,
        domain_score=study_domain_score(model, scored, stats),
    )
