"""Delivery: claims on a study's outputs and the settling of each attempt to send them."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime, timedelta

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from hrct_triage.db.models import (
    Delivery,
    DeliveryState,
    OutboxRow,
    Output,
    Study,
    StudyStatus,
)
from hrct_triage.db.worklist.outbox import _retire_outbox
from hrct_triage.db.worklist.states import _DELIVERABLE, DELIVER, _transition


def claim_delivery(
    session: Session, study_id: int, *, worker: str, lease_seconds: float, now: datetime
) -> str | None:
    """Hold the study's delivery round; None when another worker holds it or nothing is owed.

    Two workers can be handed one study at once (the worker that just analysed it, the
    safety-net outbox row, a broker redelivery); without a hold each would send every object.
    The hold reuses the analysis lease columns, free while a study is not being analysed, and
    lapses after ``lease_seconds`` so a killed worker's round is taken over.
    """
    token = str(uuid.uuid4())
    result = session.execute(
        update(Study)
        .where(
            Study.id == study_id,
            Study.status.in_(_DELIVERABLE),
            or_(Study.lease_until.is_(None), Study.lease_until <= now),
        )
        .values(
            claim_token=token,
            claimed_by=worker[:200],
            lease_until=now + timedelta(seconds=lease_seconds),
        )
        .execution_options(synchronize_session=False)
    )
    return token if getattr(result, "rowcount", 0) == 1 else None


def release_delivery(session: Session, study_id: int, token: str) -> None:
    """Give the hold back (a no-op when it was overtaken or the study moved on)."""
    session.execute(
        update(Study)
        .where(Study.id == study_id, Study.claim_token == token, Study.status.in_(_DELIVERABLE))
        .values(lease_until=None)
        .execution_options(synchronize_session=False)
    )


def pending_deliveries(session: Session, study_id: int) -> list[tuple[Delivery, Output]]:
    """Deliveries of the study's current analysis that no destination has acknowledged yet."""
    study = session.get(Study, study_id)
    if study is None or study.status not in _DELIVERABLE:
        return []
    rows = session.execute(
        select(Delivery, Output)
        .join(Output, Output.id == Delivery.output_id)
        .where(
            Output.study_id == study_id,
            Output.generation == study.generation,
            Delivery.state == DeliveryState.PENDING,
        )
        .order_by(Output.kind, Output.id, Delivery.id)  # "sc" < "sr": SCs before the SR citing them
    ).all()
    return [(delivery, output) for delivery, output in rows]


def record_delivery(
    session: Session,
    delivery_id: int,
    *,
    status_code: int | None,
    error: str | None,
    max_attempts: int,
    now: datetime,
    permanent: bool = False,
    sop_class_uid: str | None = None,
    sop_instance_uid: str | None = None,
) -> str:
    """Record one attempt: sent when ``error`` is None, failed once ``max_attempts`` are spent
    or at once when the failure is ``permanent`` (retrying cannot help), else still pending.
    ``sop_class_uid`` and ``sop_instance_uid`` say what went out, when something did."""
    delivery = session.get(Delivery, delivery_id)
    assert delivery is not None
    delivery.attempts += 1
    delivery.last_attempt_at = now
    delivery.status_code = status_code
    delivery.error = error
    if sop_class_uid is not None:
        delivery.sop_class_uid = sop_class_uid
        delivery.sop_instance_uid = sop_instance_uid
    if error is None:
        delivery.state = DeliveryState.SENT
        delivery.acknowledged_at = now
    elif permanent or delivery.attempts >= max_attempts:
        delivery.state = DeliveryState.FAILED
    return delivery.state


def settle_delivery(
    session: Session,
    study_id: int,
    *,
    now: datetime,
    retry_at: datetime,
    token: str | None = None,
) -> str | None:
    """After a round of sending: ``done`` when every output reached every destination,
    ``failed`` when one gave up, otherwise another round at ``retry_at``. A not_applicable
    study stays so either way (the outcome is in its event log). ``token`` (from
    ``claim_delivery``) gives the hold back."""
    study = session.scalars(select(Study).where(Study.id == study_id).with_for_update()).one()
    if study.status not in _DELIVERABLE:
        return None
    if token is not None and study.claim_token == token:
        study.lease_until = None
    states = session.scalars(
        select(Delivery.state)
        .join(Output, Output.id == Delivery.output_id)
        .where(Output.study_id == study_id, Output.generation == study.generation)
    ).all()
    if study.status == StudyStatus.NOT_APPLICABLE:
        return _settle_not_analysed(session, study, states, now=now, retry_at=retry_at)
    if all(state == DeliveryState.SENT for state in states):
        study.delivered_at = now
        _retire_outbox(session, study_id, DELIVER)
        _transition(session, study, StudyStatus.DONE, now, f"{len(states)} deliveries acknowledged")
        return StudyStatus.DONE
    if DeliveryState.PENDING not in states:
        failed = session.scalars(
            select(Delivery)
            .join(Output, Output.id == Delivery.output_id)
            .where(
                Output.study_id == study_id,
                Output.generation == study.generation,
                Delivery.state == DeliveryState.FAILED,
            )
        ).first()
        reason = (
            f"delivery to {failed.destination} failed after {failed.attempts} "
            f"attempt{'' if failed.attempts == 1 else 's'}: {failed.error}"
            if failed
            else "delivery failed"
        )
        study.reason = reason
        _retire_outbox(session, study_id, DELIVER)
        _transition(session, study, StudyStatus.FAILED, now, reason)
        return StudyStatus.FAILED
    _retry_delivery(session, study, now, retry_at)
    return StudyStatus.DELIVERING


def _retry_delivery(session: Session, study: Study, now: datetime, retry_at: datetime) -> None:
    """The next round, as an outbox row: it survives worker restarts, the dispatcher
    publishes it at ``retry_at``."""
    _retire_outbox(session, study.id, DELIVER)
    session.add(
        OutboxRow(
            study_id=study.id,
            task=DELIVER,
            generation=study.generation,
            created_at=now,
            not_before=retry_at,
        )
    )


def _settle_not_analysed(
    session: Session, study: Study, states: Sequence[str], *, now: datetime, retry_at: datetime
) -> str:
    """Settle the not-analysed SR of a not_applicable study, which keeps its state and reason:
    delivered sets ``delivered_at``, a final failure is logged as an event (and shows as the
    outputs' ``failed`` state), anything else waits for the next round."""
    if DeliveryState.PENDING in states:
        _retry_delivery(session, study, now, retry_at)
        return StudyStatus.NOT_APPLICABLE
    _retire_outbox(session, study.id, DELIVER)
    if not states or study.delivered_at is not None:
        return StudyStatus.NOT_APPLICABLE  # nothing owed (a stale round): record nothing
    if all(state == DeliveryState.SENT for state in states):
        study.delivered_at = now
        detail = f"not-analysed SR: {len(states)} deliveries acknowledged"
    else:
        detail = f"not-analysed SR: {states.count(DeliveryState.FAILED)} deliveries failed"
    _transition(session, study, StudyStatus.NOT_APPLICABLE, now, detail)
    return StudyStatus.NOT_APPLICABLE
