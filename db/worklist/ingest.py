"""Ingest: one instance recorded per C-STORE, and studies completed after their quiet period."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, and_, bindparam, exists, func, insert, or_, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import Session

from hrct_triage.db.models import (
    Association,
    Instance,
    InstanceReplacement,
    Refusal,
    Series,
    Study,
    StudyStatus,
    UTCDateTime,
)
from hrct_triage.db.priority import priority_for
from hrct_triage.db.raw_statements import Prepared
from hrct_triage.db.worklist.outbox import _queue, _queue_check
from hrct_triage.db.worklist.states import (
    _ANSWERED,
    InstanceFacts,
    Recorded,
    _insert_ignore,
    _note,
    _transition,
)


def record_instance(
    session: Session, facts: InstanceFacts, *, association_id: int | None, now: datetime
) -> Recorded:
    session.flush()  # the statements below run on the connection, past the ORM's autoflush
    recorded = record_instance_quickly(
        session.connection(), facts, association_id=association_id, now=now
    )
    if recorded is not None:
        return recorded
    return _record_instance_in_full(session, facts, association_id=association_id, now=now)


def record_instance_quickly(
    connection: Connection, facts: InstanceFacts, *, association_id: int | None, now: datetime
) -> Recorded | None:
    """``record_instance`` for the two common cases, on a bare connection in a transaction (the
    listener's group commit holds one, with no ORM session to pay for): an identical resend, and
    a new instance of a study still receiving. None, with at most the study's last-instance time
    changed, when the instance needs the full transition of ``record_instance``."""
    existing = _ingest_statements(connection).existing_sha.one(
        connection, {"sop_instance_uid": facts.sop_instance_uid}
    )
    existing_sha = existing[0] if existing is not None else None
    if existing_sha == facts.sha256:
        return Recorded.IDENTICAL
    if existing_sha is None and _record_new_in_receiving_study(
        connection, facts, association_id, now
    ):
        return Recorded.NEW
    return None


def forget_instance(session: Session, sop_instance_uid: str, sha256: str) -> bool:
    """Delete the row of an instance the listener committed but could not make durable (its
    sender was answered with a failure); False when the row now names another version."""
    found = session.scalar(
        select(Instance).where(
            Instance.sop_instance_uid == sop_instance_uid, Instance.sha256 == sha256
        )
    )
    if found is None:
        return False
    session.delete(found)
    session.flush()
    return True


def _upsert(session: Session, model: type[Any]) -> Any:
    dialect = session.get_bind().dialect.name
    module: Any = postgresql if dialect == "postgresql" else sqlite
    return module.insert(model)


@dataclass(frozen=True)
class _IngestStatements:
    """The hot path's statements, built and compiled once per dialect (``db.raw_statements``):
    building an upsert cost more than running it, and so did SQLAlchemy's per-execution work."""

    existing_sha: Prepared
    study: Prepared
    series: Prepared
    instance: Prepared


# Per dialect, driver and parameter style: the compiled text depends on all three.
_INGEST_STATEMENTS: dict[tuple[str, str, str], _IngestStatements] = {}


def _ingest_statements(connection: Connection) -> _IngestStatements:
    dialect = connection.dialect
    key = (dialect.name, dialect.driver, dialect.paramstyle)
    built = _INGEST_STATEMENTS.get(key)
    if built is None:  # two threads may both build it; either copy is the same
        built = _INGEST_STATEMENTS[key] = _build_ingest_statements(dialect)
    return built


def _build_ingest_statements(dialect: Dialect) -> _IngestStatements:
    module: Any = postgresql if dialect.name == "postgresql" else sqlite
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
    return _IngestStatements(
        Prepared.of(existing_sha, dialect),
        Prepared.of(study, dialect),
        Prepared.of(series_upsert, dialect),
        Prepared.of(instance, dialect),
    )


def _record_new_in_receiving_study(
    connection: Connection, facts: InstanceFacts, association_id: int | None, now: datetime
) -> bool:
    """The common case in three statements (the listener's hot path): a new instance of a study
    that is still receiving. False, with nothing but the study's last-instance time changed,
    when the study has moved on and needs the full transition in ``_record_instance_in_full``.

    The study upsert locks the study row like ``SELECT ... FOR UPDATE`` would, so completion
    cannot slip between it and the instance insert. Core statements compiled once
    (``_ingest_statements``), run on the connection's cursor: the ORM adds nothing here but time.
    """
    statements = _ingest_statements(connection)
    study_id, status = _returned(
        statements.study,
        connection,
        {
            "study_uid": facts.study_uid,
            "priority": priority_for(StudyStatus.RECEIVING, None, None),
            "calling_ae": facts.calling_ae,
            "accession_number": facts.accession_number,
            "first_at": now,
            "last_at": now,
            "updated_at": now,
        },
    )
    if status != StudyStatus.RECEIVING:
        return False
    (series_id,) = _returned(
        statements.series,
        connection,
        {
            "study_id": study_id,
            "series_uid": facts.series_uid,
            "modality": facts.modality,
            "series_number": facts.series_number,
            "description": (facts.series_description or "")[:64],
        },
    )
    statements.instance.one(
        connection,
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


def _returned(statement: Prepared, connection: Connection, values: dict[str, Any]) -> Any:
    row = statement.one(connection, values)
    if row is None:
        raise RuntimeError("an upsert with RETURNING returned no row")
    return row


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
        _late(session, study, series, outcome, now)
    session.flush()
    return outcome


def _late(session: Session, study: Study, series: Series, outcome: Recorded, now: datetime) -> None:
    """A new or changed instance of a study past receiving: the start of a late wave.

    A study with a verdict is re-opened to be checked once the wave is quiet: the worker then
    analyses again only if series selection would now analyse something else (its decision is
    an event of its own). A study being analysed keeps its claim for a new instance: the worker
    compares the instances before it records its result. A changed one takes the claim back, as
    the file the worker may be reading is replaced. Any other study is analysed again, as it has
    no verdict to keep.
    """
    what = "changed instance" if outcome is Recorded.REPLACED else "new instance"
    where = f"series {series.series_number if series.series_number is not None else '?'}"
    if study.status == StudyStatus.PROCESSING and outcome is Recorded.NEW:
        if study.reopened_at is None:
            study.reopened_at = now
            _note(
                session,
                study,
                now,
                f"{what} of {where} during the analysis; compared with "
                "what is analysed before the result is recorded",
            )
        return
    if study.status in (*_ANSWERED, StudyStatus.DELIVERING) and study.analysed_input:
        study.reopened_from = study.status
        study.reopened_at = now
        detail = f"late {what} of {where}; re-opened to check whether it changes what is analysed"
    elif study.reopened_from is not None:
        detail = f"{what} of {where} while the late wave was being checked; checked again"
    else:
        detail = (
            "instance replaced with different content"
            if outcome is Recorded.REPLACED
            else "instance arrived after completion"
        ) + "; will analyse again"
    study.claim_token = None
    _transition(session, study, StudyStatus.RECEIVING, now, detail)


def complete_ready_studies(
    session: Session,
    *,
    quiet_seconds: float,
    now: datetime,
    quiet_seconds_by_aet: Mapping[str, float] | None = None,
) -> list[int]:
    """Queue every study whose quiet period has passed and that no open association feeds.

    ``quiet_seconds_by_aet`` overrides the quiet period for the studies of the calling AE
    titles it names. A study re-opened by a late wave, whose generation has a verdict, is
    queued within that generation to have the wave checked (``_queue_check``); any other starts
    a new generation.
    """
    by_aet = dict(quiet_seconds_by_aet or {})
    ready = session.scalars(
        select(Study)
        .where(
            Study.status == StudyStatus.RECEIVING,
            _quiet_passed(now, quiet_seconds, by_aet),
            *_nothing_pending(),
        )
        .with_for_update(skip_locked=True)
    ).all()
    for study in ready:
        quiet = f"quiet for {by_aet.get(study.calling_ae or '', quiet_seconds):g} s"
        if study.analysed_input is not None and study.reopened_from is not None:
            _queue_check(session, study, now, f"{quiet}; checking the late wave")
        else:
            _queue(session, study, now, quiet)
            study.completed_at = now
    return [study.id for study in ready]


def wave_settled(session: Session, study_id: int, *, quiet_seconds: float, now: datetime) -> bool:
    """Whether the study's instances would count as complete now (``complete_ready_studies``'
    rules, whatever the study's state): for a worker that saw instances arrive during its
    analysis and must know whether more of them may follow."""
    found = session.scalar(
        select(Study.id).where(
            Study.id == study_id,
            Study.last_instance_at <= now - timedelta(seconds=quiet_seconds),
            *_nothing_pending(),
        )
    )
    return found is not None


def _quiet_passed(now: datetime, quiet_seconds: float, by_aet: dict[str, float]) -> Any:
    default = Study.last_instance_at <= now - timedelta(seconds=quiet_seconds)
    if not by_aet:
        return default
    named = [
        and_(Study.calling_ae == ae, Study.last_instance_at <= now - timedelta(seconds=seconds))
        for ae, seconds in by_aet.items()
    ]
    unnamed = or_(Study.calling_ae.is_(None), Study.calling_ae.not_in(list(by_aet)))
    return or_(*named, and_(unnamed, default))


def _nothing_pending() -> tuple[Any, ...]:
    """No open association feeds the study, and no transient refusal of one of its instances
    waits for the sender's retry."""
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
    return (~fed_by_open_association, ~awaits_a_refused_instance)
