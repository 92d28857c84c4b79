"""Analysis: claims with leases, released holds, and the results (or failures) of an analysis."""

from __future__ import annotations

import uuid
from collections.abc import Collection, Sequence
from datetime import datetime, timedelta

from sqlalchemy import and_, or_, select, update
from sqlalchemy.orm import Session

from hrct_triage.db.models import (
    Delivery,
    DeliveryState,
    Instance,
    OutboxRow,
    Output,
    Study,
    StudyStatus,
)
from hrct_triage.db.worklist.outbox import _retire_outbox
from hrct_triage.db.worklist.states import (
    _DELIVERABLE,
    DELIVER,
    TRIAGE,
    AnalysisRecord,
    Claim,
    OutputRecord,
    _insert_ignore,
    _note,
    _transition,
)


def claim(
    session: Session, study_id: int, *, worker: str, lease_seconds: float, now: datetime
) -> Claim | None:
    """Take the study for analysis, or return None when it is not ours to take."""
    token = str(uuid.uuid4())
    result = session.execute(
        update(Study)
        .where(
            Study.id == study_id,
            or_(
                Study.status == StudyStatus.QUEUED,
                and_(Study.status == StudyStatus.PROCESSING, Study.lease_until <= now),
            ),
        )
        .values(
            claim_token=token,
            claimed_by=worker[:200],
            lease_until=now + timedelta(seconds=lease_seconds),
            attempts=Study.attempts + 1,
            analysis_started_at=now,
        )
        .execution_options(synchronize_session=False)
    )
    if getattr(result, "rowcount", 0) != 1:
        return None
    study = session.get(Study, study_id, populate_existing=True)
    assert study is not None
    retaken = study.status == StudyStatus.PROCESSING
    _transition(
        session,
        study,
        StudyStatus.PROCESSING,
        now,
        f"{'lease lapsed; ' if retaken else ''}attempt {study.attempts} by {worker}",
    )
    return Claim(study.id, study.study_uid, token, study.generation, study.attempts)


def _held(session: Session, claim: Claim) -> Study | None:
    return session.scalars(
        select(Study)
        .where(
            Study.id == claim.study_id,
            Study.claim_token == claim.token,
            Study.status == StudyStatus.PROCESSING,
        )
        .with_for_update()
    ).one_or_none()


# States in which ``lease_until`` is a live hold: an analysis claim or a delivery hold.
_HELD = (StudyStatus.PROCESSING, *_DELIVERABLE)


def live_holder(session: Session, study_id: int, *, now: datetime) -> str | None:
    """The worker name (``claimed_by``) whose claim or delivery hold on the study is live."""
    return session.scalar(
        select(Study.claimed_by).where(
            Study.id == study_id, Study.status.in_(_HELD), Study.lease_until > now
        )
    )


def live_holders(session: Session, *, now: datetime) -> list[str]:
    """Every worker name that holds a live claim or delivery hold on some study."""
    names = session.scalars(
        select(Study.claimed_by)
        .where(Study.status.in_(_HELD), Study.lease_until > now, Study.claimed_by.is_not(None))
        .distinct()
    ).all()
    return [name for name in names if name]


def release_holds(
    session: Session,
    holders: Collection[str],
    *,
    now: datetime,
    study_id: int | None = None,
    republish: bool = False,
) -> list[int]:
    """Lapse the claims and delivery holds of worker processes known to be gone; the studies.

    A lease exists so that a killed worker's study is taken over, but it lapses only after
    ``HRCT_LEASE_SECONDS`` (15 minutes by default, the triage target itself). A worker that
    *knows* the holder is dead (a pool process of its own host that is gone, see
    ``worker.jobs.holder_is_gone``) lapses the hold now, so the study is claimed again at once
    instead of sitting in ``processing`` (tests/faults: test_pool_process_killed_mid_analysis,
    test_whole_worker_killed_and_restarted_later and
    test_poison_study_fails_after_the_attempt_limit_and_blocks_nothing). The next claim counts as a
    new attempt, so a study that kills every process ends ``failed``.

    ``republish`` makes the studies' outbox rows due at once, for a caller that holds no
    message of them (a worker starting up after the whole worker was killed); the claim token
    stays, so a gone holder's late write, were it still running after all, records nothing once
    a new claim replaced it.
    """
    names = [name for name in holders if name]
    if not names:
        return []
    where = [Study.status.in_(_HELD), Study.lease_until > now, Study.claimed_by.in_(names)]
    if study_id is not None:
        where.append(Study.id == study_id)
    studies = session.scalars(select(Study).where(*where).with_for_update()).all()
    for study in studies:
        study.lease_until = now
        _note(session, study, now, f"hold of {study.claimed_by} released: that process is gone")
    ids = [study.id for study in studies]
    if republish and ids:
        session.execute(
            update(OutboxRow)
            .where(OutboxRow.study_id.in_(ids), OutboxRow.done_at.is_(None))
            .values(published_at=None, not_before=None)
        )
    return ids


def analysis_inputs(session: Session, study_id: int) -> list[tuple[str, str]]:
    """(path, SOP Class UID) of every instance of the study, for series selection."""
    rows = session.execute(
        select(Instance.path, Instance.sop_class_uid)
        .where(Instance.study_id == study_id)
        .order_by(Instance.id)
    ).all()
    return [(path, sop_class) for path, sop_class in rows]


def note_analysis(session: Session, claim: Claim, *, detail: str, now: datetime) -> bool:
    """Log something the analysis did that its result does not show (text read in a substituted
    character set) as an event of the study; False if the claim was overtaken."""
    study = _held(session, claim)
    if study is None:
        return False
    _note(session, study, now, detail)
    return True


def finish_analysis(
    session: Session,
    claim: Claim,
    *,
    analysis: AnalysisRecord,
    outputs: Sequence[OutputRecord],
    destinations: Sequence[str],
    now: datetime,
    delivery_grace_seconds: float,
) -> bool:
    """Record the result and what must be delivered. False if the claim was overtaken."""
    study = _held(session, claim)
    if study is None:
        return False
    study.probability = analysis.probability
    study.positive = analysis.positive
    study.threshold = analysis.threshold
    study.trim_fraction = analysis.trim_fraction
    study.model_version = analysis.model_version
    study.analysed_series_uid = analysis.series_uid
    study.slice_probabilities = analysis.slice_probabilities
    study.timings = analysis.timings
    study.analysed_at = now
    study.lease_until = None
    study.reason = None
    _record_outputs(session, study, claim.generation, outputs, destinations, now)
    _retire_outbox(session, study.id, TRIAGE)
    if destinations:
        _owe_delivery(session, study, claim.generation, now, delivery_grace_seconds)
        _transition(
            session,
            study,
            StudyStatus.DELIVERING,
            now,
            f"p={analysis.probability:.3f}; {len(outputs)} outputs to deliver",
        )
    else:
        study.delivered_at = now
        _transition(
            session,
            study,
            StudyStatus.DONE,
            now,
            f"p={analysis.probability:.3f}; no destinations configured",
        )
    return True


def _record_outputs(
    session: Session,
    study: Study,
    generation: int,
    outputs: Sequence[OutputRecord],
    destinations: Sequence[str],
    now: datetime,
) -> None:
    """An output row per object and a pending delivery per object and destination.

    Idempotent: an object already recorded (a redelivered task rebuilt the same UID) keeps its
    row, and a delivery that exists is left as it is.
    """
    for record in outputs:
        output = session.scalar(
            select(Output).where(Output.sop_instance_uid == record.sop_instance_uid)
        )
        if output is None:
            output = Output(
                study_id=study.id,
                generation=generation,
                kind=record.kind,
                sop_instance_uid=record.sop_instance_uid,
                sop_class_uid=record.sop_class_uid,
                series_uid=record.series_uid,
                path=record.path,
                created_at=now,
            )
            session.add(output)
            session.flush()
        for destination in destinations:
            _insert_ignore(
                session,
                Delivery,
                {
                    "output_id": output.id,
                    "destination": destination,
                    "state": DeliveryState.PENDING,
                    "attempts": 0,
                },
            )


def _owe_delivery(
    session: Session, study: Study, generation: int, now: datetime, grace_seconds: float
) -> None:
    """A safety net: if this worker dies before delivering, the dispatcher hands the delivery
    to another worker once the grace period is over."""
    session.add(
        OutboxRow(
            study_id=study.id,
            task=DELIVER,
            generation=generation,
            created_at=now,
            not_before=now + timedelta(seconds=grace_seconds),
        )
    )


def mark_not_applicable(
    session: Session,
    claim: Claim,
    *,
    reason: str,
    now: datetime,
    outputs: Sequence[OutputRecord] = (),
    destinations: Sequence[str] = (),
    delivery_grace_seconds: float = 60.0,
) -> bool:
    """End the analysis ``not_applicable`` with ``reason``; False if the claim was overtaken.

    ``outputs`` (a not-analysed SR) are recorded and owed to ``destinations`` like an
    analysis' outputs, but the study stays ``not_applicable`` while they travel: that is the
    verdict the reading worklist needs at once. Delivery shows in the outputs' states and in
    ``delivered_at``; ``settle_delivery`` never moves such a study to ``done`` or ``failed``.
    """
    study = _held(session, claim)
    if study is None:
        return False
    study.reason = reason
    study.lease_until = None
    study.analysed_at = now
    _retire_outbox(session, study.id, TRIAGE)
    if outputs and destinations:
        study.delivered_at = None
        _record_outputs(session, study, claim.generation, outputs, destinations, now)
        _owe_delivery(session, study, claim.generation, now, delivery_grace_seconds)
    _transition(session, study, StudyStatus.NOT_APPLICABLE, now, reason)
    return True


def fail_analysis(
    session: Session,
    claim: Claim,
    *,
    reason: str,
    max_attempts: int,
    retry_after_seconds: float,
    now: datetime,
) -> str | None:
    """Record a failed attempt: queue it again, or end ``failed`` after the last attempt."""
    study = _held(session, claim)
    if study is None:
        return None
    study.lease_until = None
    study.claim_token = None
    study.reason = reason
    if study.attempts >= max_attempts:
        _retire_outbox(session, study.id, TRIAGE)
        _transition(
            session,
            study,
            StudyStatus.FAILED,
            now,
            f"attempt {study.attempts} of {max_attempts} failed: {reason}",
        )
        return StudyStatus.FAILED
    _retire_outbox(session, study.id, TRIAGE)
    session.add(
        OutboxRow(
            study_id=study.id,
            task=TRIAGE,
            generation=study.generation,
            created_at=now,
            not_before=now + timedelta(seconds=retry_after_seconds),
        )
    )
    _transition(
        session,
        study,
        StudyStatus.QUEUED,
        now,
        f"attempt {study.attempts} of {max_attempts} failed: {reason}",
    )
    return StudyStatus.QUEUED


def give_up(session: Session, claim: Claim, *, reason: str, now: datetime) -> bool:
    """End a study ``failed`` at once (a claim past the attempt limit: a poison study)."""
    study = _held(session, claim)
    if study is None:
        return False
    study.lease_until = None
    study.claim_token = None
    study.reason = reason
    _retire_outbox(session, study.id, TRIAGE)
    _transition(session, study, StudyStatus.FAILED, now, reason)
    return True
