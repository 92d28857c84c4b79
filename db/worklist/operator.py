"""Operator actions: requeue, resend, urgent publishing, cancel and purge."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from sqlalchemy import exists, or_, select
from sqlalchemy.orm import Session

from hrct_triage.db.models import (
    Delivery,
    DeliveryState,
    Event,
    Instance,
    OutboxRow,
    Output,
    Study,
    StudyStatus,
)
from hrct_triage.db.priority import URGENT_MARK, is_urgent
from hrct_triage.db.worklist.outbox import Publication, _queue, _retire_outbox
from hrct_triage.db.worklist.states import DELIVER, _note, _transition


def requeue(session: Session, study: Study, *, now: datetime, detail: str) -> bool:
    """Analyse again and deliver again (a new analysis generation, so new output UIDs)."""
    if study.status == StudyStatus.RECEIVING:
        return False
    _queue(session, study, now, detail)
    return True


# A study being received or analysed gets new outputs soon; resending the old ones would take it
# out of the flow that analyses its late instances.
_RESENDABLE = (
    StudyStatus.DELIVERING,
    StudyStatus.DONE,
    StudyStatus.FAILED,
    StudyStatus.NOT_APPLICABLE,
)


def resend(session: Session, study: Study, *, now: datetime) -> int:
    """Send the stored outputs of the latest analysis again, to every destination they were
    owed to when it was recorded (a shadow result's: the shadow destinations, never the clinical
    ones, whatever the mode is now).

    A not_applicable study stays so (its not-analysed SR is sent again); any other goes back
    to ``delivering``. Returns how many deliveries were reset (0: nothing to send).
    """
    if study.status not in _RESENDABLE:
        return 0
    rows = session.scalars(
        select(Delivery)
        .join(Output, Output.id == Delivery.output_id)
        .where(Output.study_id == study.id, Output.generation == study.generation)
    ).all()
    for delivery in rows:
        delivery.state = DeliveryState.PENDING
        delivery.attempts = 0
        delivery.error = None
    if not rows:
        return 0
    _retire_outbox(session, study.id, DELIVER)
    session.add(
        OutboxRow(study_id=study.id, task=DELIVER, generation=study.generation, created_at=now)
    )
    if study.status == StudyStatus.NOT_APPLICABLE:
        study.delivered_at = None
    else:
        study.reason = None
    target = StudyStatus.NOT_APPLICABLE if study.status == StudyStatus.NOT_APPLICABLE else None
    _transition(session, study, target or StudyStatus.DELIVERING, now, "resend requested")
    return len(rows)


# --- operations: urgent queue, cancel, purge --------------------------------------------------


def urgent_publications(
    session: Session, publications: Sequence[Publication], *, urgent_aets: Sequence[str]
) -> dict[int, str]:
    """Outbox id -> why it goes to the urgent queue, for the publications that do.

    Read at publish time, from the study row and its event log, so a republished message goes
    to the same queue as the first copy.
    """
    if not publications:
        return {}
    study_ids = {publication.study_id for publication in publications}
    studies = {
        study.id: study
        for study in session.scalars(select(Study).where(Study.id.in_(study_ids))).all()
    }
    operator_urgent = set(
        session.scalars(
            select(Event.study_id)
            .join(Study, Study.id == Event.study_id)
            .where(
                Event.study_id.in_(study_ids),
                Event.to_status == StudyStatus.QUEUED,
                Event.at >= Study.queued_at,
                Event.detail.contains(URGENT_MARK, autoescape=True),
            )
        ).all()
    )
    wanted = set(urgent_aets)
    reasons: dict[int, str] = {}
    for publication in publications:
        study = studies.get(publication.study_id)
        if study is None:
            continue
        reason = is_urgent(
            task=publication.task,
            calling_ae=study.calling_ae,
            positive=study.positive,
            operator_urgent=study.id in operator_urgent,
            urgent_aets=wanted,
            mode=study.mode,
        )
        if reason is not None:
            reasons[publication.outbox_id] = reason
    return reasons


CANCELLED_REASON = "cancelled by operator"
# Final states: nothing left to cancel.
_FINAL = (StudyStatus.DONE, StudyStatus.FAILED, StudyStatus.NOT_APPLICABLE)


def cancel(session: Session, study: Study, *, now: datetime) -> bool:
    """Stop a study: it ends ``failed`` with reason "cancelled by operator" and is neither
    analysed nor delivered. False when it was already in a final state.

    ``failed`` because the study states have no "cancelled" and every consumer already treats
    ``failed`` as "the AI will not answer for this study; read it without help". The claim is
    dropped, so a worker in the middle of it records nothing; undelivered outputs are marked
    failed; ``requeue`` undoes a cancel. A new instance of the study re-opens it, as for any
    finished study.
    """
    if study.status in _FINAL:
        return False
    study.claim_token = None
    study.lease_until = None
    study.reason = CANCELLED_REASON
    _retire_outbox(session, study.id)
    pending = session.scalars(
        select(Delivery)
        .join(Output, Output.id == Delivery.output_id)
        .where(Output.study_id == study.id, Delivery.state == DeliveryState.PENDING)
    ).all()
    for delivery in pending:
        delivery.state = DeliveryState.FAILED
        delivery.error = CANCELLED_REASON
    _transition(session, study, StudyStatus.FAILED, now, CANCELLED_REASON)
    return True


@dataclass(frozen=True)
class PurgeCandidate:
    """A finished study whose spooled instances and outputs may be deleted."""

    study_id: int
    study_uid: str
    status: str
    paths: list[str] = field(default_factory=list)


# Studies in these states owe nothing more (a not_applicable study still owing its
# not-analysed SR is excluded by the pending-delivery test below).
PURGEABLE = (StudyStatus.DONE, StudyStatus.FAILED, StudyStatus.NOT_APPLICABLE)


def purge_candidates(
    session: Session, *, older_than: datetime, statuses: Sequence[str] = PURGEABLE
) -> list[PurgeCandidate]:
    """Finished studies untouched since ``older_than``, with every file path they hold.

    Never a study still to deliver: one with a pending delivery or an outbox message not yet
    retired is left alone whatever its state says.
    """
    unsafe = [s for s in statuses if s not in PURGEABLE]
    if unsafe:
        raise ValueError(f"statuses {unsafe} are not final; only {PURGEABLE} may be purged")
    owes_delivery = exists().where(
        Output.study_id == Study.id,
        Delivery.output_id == Output.id,
        Delivery.state == DeliveryState.PENDING,
    )
    owes_message = exists().where(OutboxRow.study_id == Study.id, OutboxRow.done_at.is_(None))
    studies = session.scalars(
        select(Study)
        .where(
            Study.status.in_(statuses),
            Study.updated_at <= older_than,
            or_(Study.last_instance_at.is_(None), Study.last_instance_at <= older_than),
            ~owes_delivery,
            ~owes_message,
        )
        .order_by(Study.id)
    ).all()
    if not studies:
        return []
    ids = [study.id for study in studies]
    paths: dict[int, list[str]] = {study_id: [] for study_id in ids}
    for study_id, path in session.execute(
        select(Instance.study_id, Instance.path).where(Instance.study_id.in_(ids))
    ).all():
        paths[study_id].append(path)
    for study_id, path in session.execute(
        select(Output.study_id, Output.path).where(Output.study_id.in_(ids))
    ).all():
        paths[study_id].append(path)
    # An SR a destination got in another class lies beside the output, named by its own UID.
    for study_id, path, sent_uid in session.execute(
        select(Output.study_id, Output.path, Delivery.sop_instance_uid)
        .join(Delivery, Delivery.output_id == Output.id)
        .where(
            Output.study_id.in_(ids),
            Delivery.sop_instance_uid.is_not(None),
            Delivery.sop_instance_uid != Output.sop_instance_uid,
        )
        .distinct()
    ).all():
        paths[study_id].append(str(Path(path).with_name(f"{sent_uid}.dcm")))
    return [PurgeCandidate(s.id, s.study_uid, s.status, paths[s.id]) for s in studies]


def record_purge(
    session: Session, study_id: int, *, files: int, size_bytes: int, now: datetime
) -> None:
    """Log a purge in the study's events (its state does not change: the rows stay, the
    audit trail and the result stay; only the files are gone, so ``resend`` has nothing to
    send and ``requeue`` ends ``failed``)."""
    study = session.get(Study, study_id)
    if study is None:
        return
    _note(session, study, now, f"spool purged: {files} files, {size_bytes} bytes deleted")
