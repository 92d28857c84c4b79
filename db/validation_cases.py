"""The analysed studies that have a reference label, for local validation: each study's recorded
probability beside what the hospital's radiologists said it was.

A label matches a study by Study Instance UID, else by accession number. ``covid`` is a positive
reference, ``other`` and ``normal`` negative; ``unknown`` is left out and counted. Shadow-mode
results count like live ones: checking them against the site's truth is what shadow mode is for.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from hrct_triage.db.models import ReferenceLabel, Study

POSITIVE_LABELS = frozenset({"covid"})
NEGATIVE_LABELS = frozenset({"other", "normal"})


@dataclass(frozen=True)
class CaseFilter:
    """Which recorded results to validate: analysed at or after ``since``, from scanner AE
    ``scanner``, by model ``model_version``."""

    since: datetime | None = None
    scanner: str | None = None
    model_version: str | None = None

    def as_dict(self) -> dict[str, str | None]:
        return {
            "since": self.since.isoformat() if self.since else None,
            "scanner": self.scanner,
            "model_version": self.model_version,
        }


@dataclass(frozen=True)
class Case:
    """One labelled, analysed study."""

    study_uid: str
    probability: float
    truth: bool  # COVID-19 by the reference
    label: str
    threshold: float | None
    mode: str | None
    model_version: str | None


@dataclass
class Cases:
    """The labelled results and what was left out, and why."""

    cases: list[Case] = field(default_factory=list)
    analysed: int = 0  # analysed studies that passed the filter
    unlabelled: int = 0  # of them, with no label
    unknown: int = 0  # of them, labelled ``unknown``
    labels: int = 0  # labels held in the worklist
    modes: dict[str, int] = field(default_factory=dict)
    model_versions: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return {
            "analysed": self.analysed,
            "labelled": len(self.cases),
            "unlabelled": self.unlabelled,
            "unknown_excluded": self.unknown,
            "labels_held": self.labels,
            "modes": self.modes,
            "model_versions": self.model_versions,
        }


def labelled_cases(session: Session, selection: CaseFilter) -> Cases:
    """Every analysed study with a probability that passes ``selection``, matched to its label."""
    by_uid: dict[str, str] = {}
    by_accession: dict[str, str] = {}
    found = Cases()
    for uid, accession, held in session.execute(
        select(ReferenceLabel.study_uid, ReferenceLabel.accession_number, ReferenceLabel.label)
    ):
        found.labels += 1
        if uid is not None:
            by_uid[uid] = held
        if accession is not None:
            by_accession[accession] = held
    query = select(Study).where(Study.probability.is_not(None), Study.analysed_at.is_not(None))
    if selection.since is not None:
        query = query.where(Study.analysed_at >= selection.since)
    if selection.scanner is not None:
        query = query.where(Study.calling_ae == selection.scanner)
    if selection.model_version is not None:
        query = query.where(Study.model_version == selection.model_version)
    versions: set[str] = set()
    for study in session.scalars(query.order_by(Study.id)):
        found.analysed += 1
        label: str | None = by_uid.get(study.study_uid)
        if label is None and study.accession_number:
            label = by_accession.get(study.accession_number)
        if label is None:
            found.unlabelled += 1
            continue
        if label not in POSITIVE_LABELS | NEGATIVE_LABELS:
            found.unknown += 1
            continue
        assert study.probability is not None
        mode = study.mode or "live"
        found.modes[mode] = found.modes.get(mode, 0) + 1
        if study.model_version:
            versions.add(study.model_version)
        found.cases.append(
            Case(
                study_uid=study.study_uid,
                probability=float(study.probability),
                truth=label in POSITIVE_LABELS,
                label=label,
                threshold=study.threshold,
                mode=mode,
                model_version=study.model_version,
            )
        )
    found.model_versions = sorted(versions)
    return found
