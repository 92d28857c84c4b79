"""What every transition shares: task names, status groups, the records transitions take and
return, and the helpers that change a study's state and log it as an event."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import Enum
from typing import Any

from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from hrct_triage.db.models import (
    Event,
    Study,
    StudyStatus,
)
from hrct_triage.db.priority import priority_for

TRIAGE = "triage"
DELIVER = "deliver"

_ANSWERED = (StudyStatus.DONE, StudyStatus.FAILED, StudyStatus.NOT_APPLICABLE)
# A not_applicable study may still owe its not-analysed SR; it is delivered without leaving
# not_applicable (see ``mark_not_applicable``).
_DELIVERABLE = (StudyStatus.DELIVERING, StudyStatus.NOT_APPLICABLE)


class Recorded(Enum):
    NEW = "new"
    IDENTICAL = "identical"  # same SOP Instance UID, same bytes: nothing changed
    REPLACED = "replaced"  # same SOP Instance UID, different bytes: newest kept


@dataclass(frozen=True)
class InstanceFacts:
    """What the listener learned from one stored instance (no patient identifiers)."""

    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    path: str
    size_bytes: int
    sha256: str
    modality: str | None = None
    series_number: int | None = None
    series_description: str | None = None
    accession_number: str | None = None
    calling_ae: str | None = None


@dataclass(frozen=True)
class Claim:
    """A worker's hold on one analysis of a study.

    ``analysed_input`` is set when the claim is a late wave's check: the digest of what the
    generation's verdict was computed on, for the worker to compare with what it would
    analyse now (None: analyse).
    """

    study_id: int
    study_uid: str
    token: str
    generation: int
    attempts: int
    analysed_input: str | None = None


@dataclass(frozen=True)
class OutputRecord:
    kind: str
    sop_instance_uid: str
    sop_class_uid: str
    series_uid: str
    path: str


@dataclass(frozen=True)
class AnalysisRecord:
    probability: float
    positive: bool
    threshold: float
    model_version: str
    series_uid: str
    slice_probabilities: list[Any]
    timings: dict[str, float]
    trim_fraction: float | None = None  # with ``threshold``, the decision rule applied
    input_digest: str | None = None  # what was analysed (see ``Study.analysed_input``)
    mode: str | None = None  # "live" or "shadow" (see ``Study.mode``)
    domain_score: float | None = None
    in_domain: bool | None = None
    input_stats: dict[str, Any] | None = None
    station_name: str | None = None
    convolution_kernel: str | None = None
    slice_thickness: float | None = None


@dataclass(frozen=True)
class InputRow:
    """One instance of a study as the worker reads it to decide what to analyse."""

    path: str
    sop_class_uid: str
    sop_instance_uid: str
    sha256: str


@dataclass(frozen=True)
class LateSeries:
    """What a late wave brought to one series: for the event that records the decision."""

    series_uid: str
    series_number: int | None
    description: str | None
    modality: str | None
    sop_classes: tuple[str, ...]
    new: int
    replaced: int


def _transition(
    session: Session, study: Study, to_status: str, now: datetime, detail: str | None = None
) -> None:
    session.add(
        Event(
            study_id=study.id, at=now, from_status=study.status, to_status=to_status, detail=detail
        )
    )
    study.status = to_status
    study.priority = priority_for(
        to_status,
        study.positive,
        study.probability,
        mode=study.mode,
        in_domain=study.in_domain,
    )


def _note(session: Session, study: Study, now: datetime, detail: str) -> None:
    """An event that leaves the study's state as it is (a released hold, a purge)."""
    session.add(
        Event(
            study_id=study.id,
            at=now,
            from_status=study.status,
            to_status=study.status,
            detail=detail,
        )
    )


def _insert_ignore(session: Session, model: type[Any], values: dict[str, Any]) -> None:
    """INSERT that does nothing when a unique key already exists (two associations racing)."""
    dialect = session.get_bind().dialect.name
    module: Any = postgresql if dialect == "postgresql" else sqlite
    session.execute(module.insert(model).values(**values).on_conflict_do_nothing())
