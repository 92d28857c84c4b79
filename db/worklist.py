"""The named state transitions of a study.

Every function here runs inside the caller's transaction (``db.session.transaction``) and never
commits by itself, so a state change and the outbox row announcing it land together or not at all.
The contract each transition keeps:

* ``record_instance``: the instance row exists when it returns; an identical resend changes
  nothing; a changed one keeps the newest version and an ``instance_replacements`` row for the
  old one; a new or changed instance of a study that was already complete re-opens it.
* ``complete_ready_studies``: a study moves to ``queued`` only after the quiet period, only when
  no open association has fed it and no transient refusal of one of its instances is outstanding;
  the same transaction writes its ``triage`` outbox row.
* ``claim``: at most one worker holds a study at a time; a lease that lapses (worker killed) lets
  another take it. Everything a worker records afterwards is checked against its claim token, so
  a superseded analysis records nothing.
"""

from __future__ import annotations

import uuid
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import Enum
from typing import Any

from sqlalchemy import and_, bindparam, exists, func, insert, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from db.models import (
    Association,
    Delivery,
    DeliveryState,
    Event,
    Instance,
    InstanceReplacement,
    OutboxRow,
    Output,
    Refusal,
    Series,
    Study,
    StudyStatus,
    UTCDateTime,
)
from db.priority import URGENT_MARK, is_urgent, priority_for

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
    """A worker's hold on one analysis of a study."""

    study_id: int
    study_uid: str
    token: str
    generation: int
    attempts: int


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


def _transition(
    session: Session, study: Study, to_status: str, now: datetime, detail: str | None = None
) -> None:
    session.add(
        Event(
            study_id=study.id, at=now, from_status=study.status, to_status=to_status, detail=detail
        )
    )
    study.status = to_status
    study.priority = priority_for(to_status, study.positive, study.probability)


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


# --- associations -------------------------------------------------------------------------


def open_association(
    session: Session,
    *,
    calling_ae: str,
    called_ae: str,
    peer_address: str,
    peer_port: int,
    now: datetime,
    state: str = "open",
    rejection_reason: str | None = None,
    tls: bool = False,
) -> int:
    row = Association(
        calling_ae=calling_ae[:16],
        called_ae=called_ae[:16],
        peer_address=peer_address[:64],
        peer_port=peer_port,
        state=state,
        started_at=now,
        rejection_reason=rejection_reason,
        ended_at=now if state != "open" else None,
        tls=tls,
    )
    session.add(row)
    session.flush()
    return row.id


@dataclass
class AssociationTally:
    """What one association did, kept in the listener's memory and written when it closes
    (one UPDATE per association instead of one per instance)."""

    instances: int = 0
    bytes: int = 0
    failures: int = 0
    statuses: dict[str, int] = field(default_factory=dict)

    def count(self, status: int, size: int) -> None:
        key = f"0x{status:04X}"
        self.statuses[key] = self.statuses.get(key, 0) + 1
        if status == 0:
            self.instances += 1
            self.bytes += size
        else:
            self.failures += 1


def close_association(
    session: Session,
    association_id: int,
    *,
    state: str,
    now: datetime,
    tally: AssociationTally | None = None,
) -> None:
    values: dict[str, Any] = {"state": state, "ended_at": now}
    if tally is not None:
        values.update(
            instances=tally.instances,
            bytes=tally.bytes,
            failures=tally.failures,
            statuses=dict(tally.statuses),
        )
    session.execute(
        update(Association)
        .where(Association.id == association_id, Association.state == "open")
        .values(**values)
    )


def close_orphaned_associations(session: Session, *, now: datetime) -> int:
    """At listener start: associations still 'open' belonged to a process that died. Their
    instance counts are rebuilt from the instance rows they committed."""
    orphans = session.scalars(select(Association.id).where(Association.state == "open")).all()
    for association_id in orphans:
        count, size = session.execute(
            select(func.count(Instance.id), func.coalesce(func.sum(Instance.size_bytes), 0)).where(
                Instance.association_id == association_id
            )
        ).one()
        session.execute(
            update(Association)
            .where(Association.id == association_id)
            .values(state="orphaned", ended_at=now, instances=int(count), bytes=int(size))
        )
    if orphans:
        # Their senders were cut off mid-transfer and could not go on while the listener was
        # down: the quiet period of a study they fed starts now, not at its last instance before
        # the crash, so a scanner that sends again at once is in before the study completes.
        # It used to complete at the first dispatcher round after the restart, on a partial set,
        # and again after the resend (found by tests/faults, fault 6).
        fed = select(Instance.study_id).where(Instance.association_id.in_(orphans))
        session.execute(
            update(Study)
            .where(Study.id.in_(fed), Study.status == StudyStatus.RECEIVING)
            .values(last_instance_at=now)
            .execution_options(synchronize_session=False)
        )
    return len(orphans)


def record_refusal(
    session: Session,
    *,
    association_id: int | None,
    study_uid: str,
    sop_instance_uid: str,
    status: int,
    transient: bool,
    reason: str,
    now: datetime,
) -> None:
    """Keep a refused C-STORE whose study is known; a transient one holds the study open."""
    session.add(
        Refusal(
            association_id=association_id,
            study_uid=study_uid,
            sop_instance_uid=sop_instance_uid,
            status=status,
            transient=transient,
            reason=reason[:2000],
            at=now,
        )
    )


def spooled_paths(session: Session) -> set[str]:
    """Every spool path the worklist knows, for the listener's start-up reconciliation."""
    return set(session.scalars(select(Instance.path)))


def replaced_path(session: Session, sop_instance_uid: str) -> str | None:
    """The file of the version most recently replaced for this SOP instance, if any."""
    return session.scalar(
        select(InstanceReplacement.old_path)
        .where(InstanceReplacement.sop_instance_uid == sop_instance_uid)
        .order_by(InstanceReplacement.id.desc())
        .limit(1)
    )


# --- ingest -------------------------------------------------------------------------------


def record_instance(
    session: Session, facts: InstanceFacts, *, association_id: int | None, now: datetime
) -> Recorded:
    session.flush()  # the statements below run on the connection, past the ORM's autoflush
    existing_sha = (
        session.connection()
        .execute(
            _ingest_statements(session).existing_sha,
            {"sop_instance_uid": facts.sop_instance_uid},
        )
        .scalar_one_or_none()
    )
    if existing_sha == facts.sha256:
        return Recorded.IDENTICAL
    if existing_sha is None and _record_new_in_receiving_study(session, facts, association_id, now):
        return Recorded.NEW
    return _record_instance_in_full(session, facts, association_id=association_id, now=now)


def _upsert(session: Session, model: type[Any]) -> Any:
    dialect = session.get_bind().dialect.name
    module: Any = postgresql if dialect == "postgresql" else sqlite
    return module.insert(model)


@dataclass(frozen=True)
class _IngestStatements:
    """The hot path's statements, built once per dialect with bound parameters: building an
    upsert (its ``excluded`` alias, its cache key) cost more than running it."""

    existing_sha: Any
    study: Any
    series: Any
    instance: Any


_INGEST_STATEMENTS: dict[str, _IngestStatements] = {}


def _ingest_statements(session: Session) -> _IngestStatements:
    dialect = session.get_bind().dialect.name
    built = _INGEST_STATEMENTS.get(dialect)
    if built is None:  # two threads may both build it; either copy is the same
        built = _INGEST_STATEMENTS[dialect] = _build_ingest_statements(dialect)
    return built


def _build_ingest_statements(dialect: str) -> _IngestStatements:
    module: Any = postgresql if dialect == "postgresql" else sqlite
    tables = Study.metadata.tables
    studies, series, instances = tables["studies"], tables["series"], tables["instances"]
    study_insert = module.insert(studies).values(
        study_uid=bindparam("study_uid"),
        status=StudyStatus.RECEIVING,
        priority=bindparam("priority"),
        generation=0,
        attempts=0,
        calling_ae=bindparam("calling_ae"),
        accession_number=bindparam("accession_number"),
        first_instance_at=bindparam("first_at", type_=UTCDateTime()),
        last_instance_at=bindparam("last_at", type_=UTCDateTime()),
        updated_at=bindparam("updated_at", type_=UTCDateTime()),
    )
    study = study_insert.on_conflict_do_update(
        index_elements=[studies.c.study_uid],
        set_={
            "last_instance_at": study_insert.excluded.last_instance_at,
            "updated_at": study_insert.excluded.updated_at,
            "calling_ae": func.coalesce(study_insert.excluded.calling_ae, studies.c.calling_ae),
            "accession_number": func.coalesce(
                study_insert.excluded.accession_number, studies.c.accession_number
            ),
        },
    ).returning(studies.c.id, studies.c.status)
    series_insert = module.insert(series).values(
        study_id=bindparam("study_id"),
        series_uid=bindparam("series_uid"),
        modality=bindparam("modality"),
        series_number=bindparam("series_number"),
        description=bindparam("description"),
    )
    series_upsert = series_insert.on_conflict_do_update(
        index_elements=[series.c.series_uid],
        set_={"series_uid": series_insert.excluded.series_uid},  # no change; returns the id
    ).returning(series.c.id)
    instance = insert(instances).values(
        study_id=bindparam("study_id"),
        series_id=bindparam("series_id"),
        association_id=bindparam("association_id"),
        sop_instance_uid=bindparam("sop_instance_uid"),
        sop_class_uid=bindparam("sop_class_uid"),
        transfer_syntax_uid=bindparam("transfer_syntax_uid"),
        path=bindparam("path"),
        size_bytes=bindparam("size_bytes"),
        sha256=bindparam("sha256"),
        received_at=bindparam("received_at", type_=UTCDateTime()),
    )
    existing_sha = select(instances.c.sha256).where(
        instances.c.sop_instance_uid == bindparam("sop_instance_uid")
    )
    return _IngestStatements(existing_sha, study, series_upsert, instance)


def _record_new_in_receiving_study(
    session: Session, facts: InstanceFacts, association_id: int | None, now: datetime
) -> bool:
    """The common case in three statements (the listener's hot path): a new instance of a study
    that is still receiving. False, with nothing but the study's last-instance time changed,
    when the study has moved on and needs the full transition in ``_record_instance_in_full``.

    The study upsert locks the study row like ``SELECT ... FOR UPDATE`` would, so completion
    cannot slip between it and the instance insert. Core statements on the session's connection,
    prepared once (``_ingest_statements``): the ORM adds nothing here but time.
    """
    statements = _ingest_statements(session)
    connection = session.connection()
    study_id, status = connection.execute(
        statements.study,
        {
            "study_uid": facts.study_uid,
            "priority": priority_for(StudyStatus.RECEIVING, None, None),
            "calling_ae": facts.calling_ae,
            "accession_number": facts.accession_number,
            "first_at": now,
            "last_at": now,
            "updated_at": now,
        },
    ).one()
    if status != StudyStatus.RECEIVING:
        return False
    series_id = connection.execute(
        statements.series,
        {
            "study_id": study_id,
            "series_uid": facts.series_uid,
            "modality": facts.modality,
            "series_number": facts.series_number,
            "description": (facts.series_description or "")[:64],
        },
    ).scalar_one()
    connection.execute(
        statements.instance,
        {
            "study_id": study_id,
            "series_id": series_id,
            "association_id": association_id,
            "sop_instance_uid": facts.sop_instance_uid,
            "sop_class_uid": facts.sop_class_uid,
            "transfer_syntax_uid": facts.transfer_syntax_uid,
            "path": facts.path,
            "size_bytes": facts.size_bytes,
            "sha256": facts.sha256,
            "received_at": now,
        },
    )
    return True


def _record_instance_in_full(
    session: Session, facts: InstanceFacts, *, association_id: int | None, now: datetime
) -> Recorded:
    existing = session.scalar(
        select(Instance).where(Instance.sop_instance_uid == facts.sop_instance_uid)
    )
    if existing is not None and existing.sha256 == facts.sha256:
        return Recorded.IDENTICAL

    _insert_ignore(
        session,
        Study,
        {
            "study_uid": facts.study_uid,
            "status": StudyStatus.RECEIVING,
            "priority": priority_for(StudyStatus.RECEIVING, None, None),
            "generation": 0,
            "attempts": 0,
            "updated_at": now,
        },
    )
    study = session.scalars(
        select(Study).where(Study.study_uid == facts.study_uid).with_for_update()
    ).one()
    _insert_ignore(
        session,
        Series,
        {
            "study_id": study.id,
            "series_uid": facts.series_uid,
            "modality": facts.modality,
            "series_number": facts.series_number,
            "description": (facts.series_description or "")[:64],
        },
    )
    series = session.scalars(select(Series).where(Series.series_uid == facts.series_uid)).one()

    if existing is None:
        outcome = Recorded.NEW
        session.add(
            Instance(
                study_id=study.id,
                series_id=series.id,
                association_id=association_id,
                sop_instance_uid=facts.sop_instance_uid,
                sop_class_uid=facts.sop_class_uid,
                transfer_syntax_uid=facts.transfer_syntax_uid,
                path=facts.path,
                size_bytes=facts.size_bytes,
                sha256=facts.sha256,
                received_at=now,
            )
        )
    else:
        outcome = Recorded.REPLACED
        session.add(
            InstanceReplacement(
                study_id=existing.study_id,
                sop_instance_uid=existing.sop_instance_uid,
                old_sha256=existing.sha256,
                old_size_bytes=existing.size_bytes,
                old_association_id=existing.association_id,
                old_received_at=existing.received_at,
                old_path=existing.path,
                new_sha256=facts.sha256,
                new_association_id=association_id,
                replaced_at=now,
            )
        )
        existing.association_id = association_id
        existing.transfer_syntax_uid = facts.transfer_syntax_uid
        existing.sop_class_uid = facts.sop_class_uid
        existing.path = facts.path
        existing.size_bytes = facts.size_bytes
        existing.sha256 = facts.sha256
        existing.received_at = now

    if study.first_instance_at is None:
        study.first_instance_at = now
    study.last_instance_at = now
    study.calling_ae = facts.calling_ae or study.calling_ae
    study.accession_number = facts.accession_number or study.accession_number
    if study.status != StudyStatus.RECEIVING:
        detail = (
            "instance replaced with different content"
            if outcome is Recorded.REPLACED
            else "instance arrived after completion"
        )
        study.claim_token = None
        _transition(session, study, StudyStatus.RECEIVING, now, f"{detail}; will analyse again")
    session.flush()
    return outcome


def complete_ready_studies(session: Session, *, quiet_seconds: float, now: datetime) -> list[int]:
    """Queue every study whose quiet period has passed and that no open association feeds."""
    fed_by_open_association = exists().where(
        Instance.study_id == Study.id,
        Instance.association_id == Association.id,
        Association.state == "open",
    )
    stored_since_refusal = exists().where(
        Instance.sop_instance_uid == Refusal.sop_instance_uid, Instance.received_at >= Refusal.at
    )
    awaits_a_refused_instance = exists().where(
        Refusal.study_uid == Study.study_uid, Refusal.transient.is_(True), ~stored_since_refusal
    )
    ready = session.scalars(
        select(Study)
        .where(
            Study.status == StudyStatus.RECEIVING,
            Study.last_instance_at <= now - timedelta(seconds=quiet_seconds),
            ~fed_by_open_association,
            ~awaits_a_refused_instance,
        )
        .with_for_update(skip_locked=True)
    ).all()
    for study in ready:
        _queue(session, study, now, f"quiet for {quiet_seconds:g} s")
        study.completed_at = now
    return [study.id for study in ready]


def _queue(session: Session, study: Study, now: datetime, detail: str) -> None:
    study.generation += 1
    study.attempts = 0
    study.claim_token = None
    study.lease_until = None
    study.reason = None
    study.queued_at = now
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


# --- the outbox -----------------------------------------------------------------------------


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


# --- analysis -------------------------------------------------------------------------------


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
    instead of sitting in ``processing`` (found by tests/faults, faults 1, 2 and 8). The next
    claim counts as a new attempt, so a study that kills every process ends ``failed``.

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


# --- delivery -------------------------------------------------------------------------------


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
) -> str:
    delivery = session.get(Delivery, delivery_id)
    assert delivery is not None
    delivery.attempts += 1
    delivery.last_attempt_at = now
    delivery.status_code = status_code
    delivery.error = error
    if error is None:
        delivery.state = DeliveryState.SENT
        delivery.acknowledged_at = now
    elif delivery.attempts >= max_attempts:
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
            f"delivery to {failed.destination} failed after {failed.attempts} attempts: "
            f"{failed.error}"
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


# --- operator actions ---------------------------------------------------------------------


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
    """Send the stored outputs of the latest analysis again, to every destination.

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

    ``failed`` because SPEC's states have no "cancelled" and every consumer already treats
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
