"""The outbox: rows announcing queued work, found and marked published by the dispatcher."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from hrct_triage.db.models import (
    OutboxRow,
    Study,
    StudyStatus,
)
from hrct_triage.db.worklist.states import _DELIVERABLE, DELIVER, TRIAGE, _transition


@dataclass(frozen=True)
class Publication:
    outbox_id: int
    study_id: int
    task: str


def due_publications(
    session: Session, *, now: datetime, republish_seconds: float, limit: int = 100
) -> list[Publication]:
    """Outbox rows to hand to the broker now: never published, or published long ago and still
    not taken (a broker that lost the message, a worker that died holding it)."""
    stale = now - timedelta(seconds=republish_seconds)
    rows = session.execute(
        select(OutboxRow, Study)
        .join(Study, Study.id == OutboxRow.study_id)
        .where(
            OutboxRow.done_at.is_(None),
            or_(OutboxRow.not_before.is_(None), OutboxRow.not_before <= now),
            or_(OutboxRow.published_at.is_(None), OutboxRow.published_at <= stale),
        )
        .order_by(Study.priority.desc(), OutboxRow.id)
        .limit(limit)
    ).all()
    due: list[Publication] = []
    for row, study in rows:
        wanted = _DELIVERABLE if row.task == DELIVER else (StudyStatus.QUEUED,)
        lease_lapsed = (
            row.task == TRIAGE
            and study.status == StudyStatus.PROCESSING
            and (study.lease_until is None or study.lease_until <= now)
        )
        if row.generation != study.generation or (study.status not in wanted and not lease_lapsed):
            if study.status != StudyStatus.PROCESSING:
                row.done_at = now  # overtaken: nothing left for this row to announce
            continue
        due.append(Publication(row.id, study.id, row.task))
    return due


def mark_published(session: Session, outbox_ids: Iterable[int], *, now: datetime) -> None:
    ids = list(outbox_ids)
    if ids:
        session.execute(
            update(OutboxRow)
            .where(OutboxRow.id.in_(ids))
            .values(published_at=now, publish_count=OutboxRow.publish_count + 1)
        )


def _queue(session: Session, study: Study, now: datetime, detail: str) -> None:
    """Start a new analysis generation: the worker analyses whatever the study holds."""
    study.generation += 1
    study.analysed_input = None
    study.reopened_from = None
    study.reopened_at = None
    study.input_received_at = study.last_instance_at
    study.reason = None
    study.queued_at = now
    _queue_within_generation(session, study, now, detail)


def _queue_check(session: Session, study: Study, now: datetime, detail: str) -> None:
    """Queue a late wave's check within the study's generation: the worker compares what
    series selection would analyse now with what the verdict was computed on. The verdict's
    reason and stamps stay; they are the study's until the check decides to analyse again."""
    _queue_within_generation(session, study, now, detail)


def _queue_within_generation(session: Session, study: Study, now: datetime, detail: str) -> None:
    study.attempts = 0
    study.claim_token = None
    study.lease_until = None
    _retire_outbox(session, study.id)
    session.add(
        OutboxRow(study_id=study.id, task=TRIAGE, generation=study.generation, created_at=now)
    )
    _transition(session, study, StudyStatus.QUEUED, now, detail)


def _retire_outbox(session: Session, study_id: int, task: str | None = None) -> None:
    where = [OutboxRow.study_id == study_id, OutboxRow.done_at.is_(None)]
    if task is not None:
        where.append(OutboxRow.task == task)
    session.execute(update(OutboxRow).where(*where).values(done_at=OutboxRow.created_at))
