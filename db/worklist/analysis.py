"""Analysis: claims with leases, released holds, and the results (or failures) of an analysis."""

from __future__ import annotations

import dataclasses
import hashlib
import uuid
from collections.abc import Collection, Iterable, Sequence
from datetime import datetime, timedelta

from sqlalchemy import and_, case, literal, or_, select, update
from sqlalchemy.orm import Session

from hrct_triage.db.models import (
    Delivery,
    DeliveryState,
    Instance,
    InstanceReplacement,
    OutboxRow,
    Output,
    Series,
    Study,
    StudyStatus,
    UTCDateTime,
)
from hrct_triage.db.worklist.outbox import _retire_outbox
from hrct_triage.db.worklist.states import (
    _DELIVERABLE,
    DELIVER,
    TRIAGE,
    AnalysisRecord,
    Claim,
    InputRow,
    LateSeries,
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
            # A late wave's check keeps the verdict's stamps; ``start_generation`` sets them.
            analysis_started_at=case(
                (Study.analysed_input.is_(None), literal(now, UTCDateTime())),
                else_=Study.analysis_started_at,
            ),
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
        f"{'lease lapsed; ' if retaken else ''}"
        f"{'checking the late wave, ' if study.analysed_input else ''}"
        f"attempt {study.attempts} by {worker}",
    )
    return Claim(
        study.id, study.study_uid, token, study.generation, study.attempts, study.analysed_input
    )


def _held(session: Session, claim: Claim) -> Study | None:
    return session.scalars(
        select(Study)
        .where(
            Study.id == claim.study_id,
            Study.claim_token == claim.token,
            Study.status == StudyStatus.PROCESSING,
            Study.generation == claim.generation,  # ``start_generation`` moved it on
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


def input_rows(session: Session, study_id: int) -> list[InputRow]:
    """Every instance of the study, for the worker to decide what to analyse."""
    rows = session.execute(
        select(Instance.path, Instance.sop_class_uid, Instance.sop_instance_uid, Instance.sha256)
        .where(Instance.study_id == study_id)
        .order_by(Instance.id)
    ).all()
    return [InputRow(*row) for row in rows]


def held_input_rows(session: Session, claim: Claim) -> list[InputRow] | None:
    """``input_rows`` with the study locked, in the transaction that records the claim's
    outcome, so no instance is recorded between this read and that outcome; None when the
    claim was overtaken."""
    if _held(session, claim) is None:
        return None
    return input_rows(session, claim.study_id)


def instance_set_digest(rows: Iterable[InputRow]) -> str:
    """SHA-256 of a set of instances (SOP Instance UID and content hash each), in any order."""
    lines = sorted(f"{row.sop_instance_uid}:{row.sha256}" for row in rows)
    return hashlib.sha256("\n".join(lines).encode("ascii")).hexdigest()


def late_arrivals(session: Session, study_id: int, *, since: datetime) -> list[LateSeries]:
    """What was stored for the study at or after ``since`` (a late wave), series by series."""
    rows = session.execute(
        select(Series, Instance.sop_class_uid, Instance.sop_instance_uid)
        .join(Instance, Instance.series_id == Series.id)
        .where(Instance.study_id == study_id, Instance.received_at >= since)
        .order_by(Series.id, Instance.id)
    ).all()
    replaced = set(
        session.scalars(
            select(InstanceReplacement.sop_instance_uid).where(
                InstanceReplacement.study_id == study_id, InstanceReplacement.replaced_at >= since
            )
        ).all()
    )
    found: dict[int, tuple[Series, list[str], list[str]]] = {}
    for series, sop_class, sop_uid in rows:
        _, classes, uids = found.setdefault(series.id, (series, [], []))
        if sop_class not in classes:
            classes.append(sop_class)
        uids.append(sop_uid)
    return [
        LateSeries(
            series_uid=series.series_uid,
            series_number=series.series_number,
            description=series.description,
            modality=series.modality,
            sop_classes=tuple(classes),
            new=sum(uid not in replaced for uid in uids),
            replaced=sum(uid in replaced for uid in uids),
        )
        for series, classes, uids in found.values()
    ]


def keep_verdict(session: Session, claim: Claim, *, detail: str, now: datetime) -> bool:
    """A late wave's check found nothing new to analyse: the study goes back to the state the
    wave found it in, with its generation, result and outputs. Deliveries still owed resume.
    False if the claim was overtaken."""
    study = _held(session, claim)
    if study is None:
        return False
    _restore_verdict(session, study, detail=detail, now=now)
    return True


def _restore_verdict(session: Session, study: Study, *, detail: str, now: datetime) -> str:
    """Back to the state a late wave found the study in; deliveries still owed resume."""
    target = study.reopened_from or StudyStatus.DONE
    study.claim_token = None
    study.lease_until = None
    study.reopened_from = None
    study.reopened_at = None
    _retire_outbox(session, study.id, TRIAGE)
    if target in _DELIVERABLE and (target == StudyStatus.DELIVERING or _owes(session, study)):
        session.add(
            OutboxRow(study_id=study.id, task=DELIVER, generation=study.generation, created_at=now)
        )
    _transition(session, study, target, now, detail)
    return target


def _owes(session: Session, study: Study) -> bool:
    pending = session.scalar(
        select(Delivery.id)
        .join(Output, Output.id == Delivery.output_id)
        .where(
            Output.study_id == study.id,
            Output.generation == study.generation,
            Delivery.state == DeliveryState.PENDING,
        )
        .limit(1)
    )
    return pending is not None


def start_generation(session: Session, claim: Claim, *, detail: str, now: datetime) -> Claim | None:
    """A late wave's check found a new input: the claim goes on as the analysis of a new
    generation (its outputs supersede the verdict's). None if the claim was overtaken."""
    study = _held(session, claim)
    if study is None:
        return None
    study.generation += 1
    study.analysed_input = None
    study.reopened_from = None
    study.reopened_at = None
    study.reason = None
    study.input_received_at = study.last_instance_at
    study.completed_at = study.queued_at = study.analysis_started_at = now
    # The claim's message now announces the new generation (a lapsed lease republishes it).
    session.execute(
        update(OutboxRow)
        .where(
            OutboxRow.study_id == study.id,
            OutboxRow.task == TRIAGE,
            OutboxRow.done_at.is_(None),
        )
        .values(generation=study.generation)
    )
    _note(session, study, now, detail)
    return dataclasses.replace(claim, generation=study.generation, analysed_input=None)


def reopen(session: Session, claim: Claim, *, detail: str, now: datetime) -> bool:
    """Give the study back to receiving without recording an outcome: instances that arrived
    while the claim was held change what would be analysed (or may, and still arrive). It
    completes again after its quiet period: for a check again when the claim is a late wave's
    check, for one analysis otherwise. False if the claim was overtaken."""
    study = _held(session, claim)
    if study is None:
        return False
    study.claim_token = None
    study.lease_until = None
    if claim.analysed_input is None:
        study.analysed_input = None
        study.reopened_from = None
        study.reopened_at = None
    _retire_outbox(session, study.id, TRIAGE)
    _transition(session, study, StudyStatus.RECEIVING, now, detail)
    return True


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
    study.mode = analysis.mode
    study.domain_score = analysis.domain_score
    study.in_domain = analysis.in_domain
    study.input_stats = analysis.input_stats
    study.station_name = analysis.station_name
    study.convolution_kernel = analysis.convolution_kernel
    study.slice_thickness = analysis.slice_thickness
    study.analysed_at = now
    study.lease_until = None
    study.reason = None
    _settle_input(study, analysis.input_digest)
    _record_outputs(session, study, claim.generation, outputs, destinations, now)
    _retire_outbox(session, study.id, TRIAGE)
    shadow = analysis.mode == "shadow"
    if destinations:
        _owe_delivery(session, study, claim.generation, now, delivery_grace_seconds)
        where = "the shadow destinations only" if shadow else "deliver"
        _transition(
            session,
            study,
            StudyStatus.DELIVERING,
            now,
            f"p={analysis.probability:.3f}; {'shadow mode: ' if shadow else ''}"
            f"{len(outputs)} outputs to {where}",
        )
    else:
        study.delivered_at = now
        _transition(
            session,
            study,
            StudyStatus.DONE,
            now,
            f"p={analysis.probability:.3f}; "
            + (
                "shadow mode: result recorded, sent nowhere (no shadow destinations configured)"
                if shadow
                else "no destinations configured"
            ),
        )
    return True


def _settle_input(study: Study, input_digest: str | None) -> None:
    """The generation has its verdict, on ``input_digest``; a late wave is checked against it
    (None: a late wave starts a new analysis, as for a verdict recorded without a digest)."""
    study.analysed_input = input_digest
    study.reopened_from = None
    study.reopened_at = None


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
    input_digest: str | None = None,
    mode: str | None = None,
) -> bool:
    """End the analysis ``not_applicable`` with ``reason``; False if the claim was overtaken.

    ``input_digest`` is what the verdict was reached on, as for ``finish_analysis``; ``mode``
    the mode it was reached in (kept as it was when None).
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
    if mode is not None:
        study.mode = mode
    _settle_input(study, input_digest)
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
    """Record a failed attempt: queue it again, or end ``failed`` after the last attempt.

    A late wave's check that fails its last attempt leaves the verdict as it was (its outputs
    were delivered; a wave it could not check must not take them back), with an event saying so.
    """
    study = _held(session, claim)
    if study is None:
        return None
    if claim.analysed_input is not None and study.attempts >= max_attempts:
        detail = f"the late wave could not be checked in {study.attempts} attempts: {reason}"
        return _restore_verdict(session, study, detail=f"{detail}; the verdict stands", now=now)
    study.lease_until = None
    study.claim_token = None
    if claim.analysed_input is None:  # a check keeps the verdict's reason
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
    """End a study ``failed`` at once (a claim past the attempt limit: a poison study); a late
    wave's check past the limit leaves the verdict as it was instead."""
    study = _held(session, claim)
    if study is None:
        return False
    if claim.analysed_input is not None:
        _restore_verdict(session, study, detail=f"{reason}; the verdict stands", now=now)
        return True
    study.lease_until = None
    study.claim_token = None
    study.reason = reason
    _retire_outbox(session, study.id, TRIAGE)
    _transition(session, study, StudyStatus.FAILED, now, reason)
    return True
