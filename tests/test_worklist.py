"""The worklist's state transitions on SQLite and PostgreSQL (real databases, migrated)."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from pydantic import ValidationError
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from hrct_triage.common.settings import Settings
from hrct_triage.db import queries, worklist
from hrct_triage.db.models import Event, Instance, OutboxRow, Study, StudyStatus
from hrct_triage.db.priority import reprioritise
from hrct_triage.db.session import transaction
from tests.helpers.worklist import T0, complete, facts, study_row
from tests.helpers.worklist import queued_study as _queued


def test_identical_resend_changes_nothing_and_new_bytes_replace(
    sessions: sessionmaker[Session],
) -> None:
    # given one recorded instance
    with transaction(sessions) as session:
        first = worklist.record_instance(session, facts("1.2.3.1.1"), association_id=None, now=T0)
    # when the same instance arrives again, then with other bytes
    with transaction(sessions) as session:
        again = worklist.record_instance(
            session, facts("1.2.3.1.1"), association_id=None, now=T0 + timedelta(seconds=5)
        )
    with transaction(sessions) as session:
        changed = worklist.record_instance(
            session,
            facts("1.2.3.1.1", sha="b" * 64),
            association_id=None,
            now=T0 + timedelta(seconds=6),
        )
    # then one row, the newest bytes, and the identical resend did not move the quiet period
    assert (first, again, changed) == (
        worklist.Recorded.NEW,
        worklist.Recorded.IDENTICAL,
        worklist.Recorded.REPLACED,
    )
    with transaction(sessions) as session:
        rows = session.scalars(select(Instance)).all()
        assert [r.sha256 for r in rows] == ["b" * 64]
    assert study_row(sessions).last_instance_at == T0 + timedelta(seconds=6)


def test_study_completes_after_quiet_period_and_not_before(
    sessions: sessionmaker[Session],
) -> None:
    with transaction(sessions) as session:
        for i in range(3):
            worklist.record_instance(session, facts(f"1.2.3.1.{i}"), association_id=None, now=T0)
    assert complete(sessions, T0 + timedelta(seconds=9.9)) == []
    assert study_row(sessions).status == StudyStatus.RECEIVING
    assert len(complete(sessions, T0 + timedelta(seconds=10))) == 1
    study = study_row(sessions)
    assert (study.status, study.generation) == (StudyStatus.QUEUED, 1)
    with transaction(sessions) as session:
        outbox = session.scalars(select(OutboxRow)).all()
        assert [(r.task, r.generation) for r in outbox] == [("triage", 1)]


def test_open_association_holds_completion(sessions: sessionmaker[Session]) -> None:
    with transaction(sessions) as session:
        assoc = worklist.open_association(
            session,
            calling_ae="CT1",
            called_ae="HRCT_TRIAGE",
            peer_address="127.0.0.1",
            peer_port=1,
            now=T0,
        )
        worklist.record_instance(session, facts("1.2.3.1.1"), association_id=assoc, now=T0)
    assert complete(sessions, T0 + timedelta(hours=1)) == []
    with transaction(sessions) as session:
        worklist.close_association(session, assoc, state="released", now=T0)
    assert len(complete(sessions, T0 + timedelta(hours=1))) == 1


def test_late_instance_reopens_a_finished_study(sessions: sessionmaker[Session]) -> None:
    with transaction(sessions) as session:
        worklist.record_instance(session, facts("1.2.3.1.1"), association_id=None, now=T0)
    complete(sessions, T0 + timedelta(seconds=10))
    with transaction(sessions) as session:
        worklist.record_instance(
            session, facts("1.2.3.1.2"), association_id=None, now=T0 + timedelta(seconds=20)
        )
    assert study_row(sessions).status == StudyStatus.RECEIVING
    complete(sessions, T0 + timedelta(seconds=30))
    assert study_row(sessions).generation == 2


def test_claim_is_exclusive_until_its_lease_lapses(sessions: sessionmaker[Session]) -> None:
    study_id = _queued(sessions)
    now = T0 + timedelta(seconds=11)
    with transaction(sessions) as session:
        first = worklist.claim(session, study_id, worker="w1", lease_seconds=60, now=now)
    with transaction(sessions) as session:
        second = worklist.claim(session, study_id, worker="w2", lease_seconds=60, now=now)
    with transaction(sessions) as session:
        after_lease = worklist.claim(
            session, study_id, worker="w3", lease_seconds=60, now=now + timedelta(seconds=61)
        )
    assert first is not None and second is None and after_lease is not None
    assert after_lease.attempts == 2
    # the first worker's late result is refused: its claim was overtaken
    record = worklist.AnalysisRecord(0.9, True, 0.8, "v", "1.2.3.1", [], {})
    with transaction(sessions) as session:
        assert not worklist.finish_analysis(
            session,
            first,
            analysis=record,
            outputs=[],
            destinations=[],
            now=now,
            delivery_grace_seconds=60,
        )


def test_concurrent_claims_give_the_study_to_one_worker(sessions: sessionmaker[Session]) -> None:
    study_id = _queued(sessions)
    claims: list[worklist.Claim | None] = []
    barrier = threading.Barrier(4)

    def take(name: str) -> None:
        barrier.wait()
        with transaction(sessions) as session:
            claims.append(
                worklist.claim(
                    session, study_id, worker=name, lease_seconds=60, now=T0 + timedelta(seconds=11)
                )
            )

    threads = [threading.Thread(target=take, args=(f"w{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(c is not None for c in claims) == 1


def test_failed_attempts_retry_then_fail_with_reason(sessions: sessionmaker[Session]) -> None:
    study_id = _queued(sessions)
    outcomes = []
    for attempt in range(2):
        now = T0 + timedelta(minutes=attempt + 1)
        with transaction(sessions) as session:
            claim = worklist.claim(session, study_id, worker="w", lease_seconds=60, now=now)
            assert claim is not None
        with transaction(sessions) as session:
            outcomes.append(
                worklist.fail_analysis(
                    session,
                    claim,
                    reason="ValueError: bad pixels",
                    max_attempts=2,
                    retry_after_seconds=0,
                    now=now,
                )
            )
    assert outcomes == [StudyStatus.QUEUED, StudyStatus.FAILED]
    study = study_row(sessions)
    assert study.reason == "ValueError: bad pixels"


def test_published_once_then_again_only_when_nobody_took_it(
    sessions: sessionmaker[Session],
) -> None:
    _queued(sessions)
    now = T0 + timedelta(seconds=11)
    with transaction(sessions) as session:
        due = worklist.due_publications(session, now=now, republish_seconds=120)
        worklist.mark_published(session, [d.outbox_id for d in due], now=now)
    with transaction(sessions) as session:
        soon = worklist.due_publications(
            session, now=now + timedelta(seconds=60), republish_seconds=120
        )
        later = worklist.due_publications(
            session, now=now + timedelta(seconds=121), republish_seconds=120
        )
    assert len(due) == 1 and soon == [] and [d.outbox_id for d in later] == [due[0].outbox_id]


def test_requeue_starts_a_new_generation_and_worklist_puts_positives_first(
    sessions: sessionmaker[Session],
) -> None:
    # given a negative, a positive and a not-yet-complete study
    ids = {}
    for uid, probability in (("1.2.3", 0.1), ("1.2.4", 0.95)):
        with transaction(sessions) as session:
            worklist.record_instance(
                session, facts(f"{uid}.1.1", study=uid), association_id=None, now=T0
            )
        ids[uid] = complete(sessions, T0 + timedelta(seconds=10))[0]
        with transaction(sessions) as session:
            claim = worklist.claim(session, ids[uid], worker="w", lease_seconds=60, now=T0)
            assert claim is not None
            worklist.finish_analysis(
                session,
                claim,
                now=T0,
                destinations=[],
                outputs=[],
                delivery_grace_seconds=60,
                analysis=worklist.AnalysisRecord(
                    probability, probability >= 0.8, 0.8, "v", f"{uid}.1", [], {}
                ),
            )
    with transaction(sessions) as session:
        worklist.record_instance(
            session, facts("1.2.5.1.1", study="1.2.5"), association_id=None, now=T0
        )
    with transaction(sessions) as session:
        order = [row["study_uid"] for row in queries.worklist_rows(session)]
    assert order == ["1.2.4", "1.2.5", "1.2.3"]
    # when the negative is requeued
    with transaction(sessions) as session:
        study = session.get(Study, ids["1.2.3"])
        assert study is not None
        assert worklist.requeue(session, study, now=T0, detail="test")
    study_after = study_row(sessions)
    assert (study_after.status, study_after.generation) == (StudyStatus.QUEUED, 2)
    with transaction(sessions) as session:
        events = session.scalar(
            select(func.count()).select_from(Event).where(Event.study_id == ids["1.2.3"])
        )
        assert events and events >= 4


def test_priority_bands_follow_the_setting_and_reprioritise_applies_a_new_order(
    sessions: sessionmaker[Session],
) -> None:
    # given a positive, an unanswered and a negative study under the default band order
    # (the unanswered one last, so completing the others does not queue it)
    results = {"1.2.3": 0.95, "1.2.5": 0.7, "1.2.4": None}
    for uid, probability in results.items():
        with transaction(sessions) as session:
            worklist.record_instance(
                session, facts(f"{uid}.1.1", study=uid), association_id=None, now=T0
            )
        if probability is None:
            continue
        study_id = complete(sessions, T0 + timedelta(seconds=10))[0]
        with transaction(sessions) as session:
            claim = worklist.claim(session, study_id, worker="w", lease_seconds=60, now=T0)
            assert claim is not None
            worklist.finish_analysis(
                session,
                claim,
                now=T0,
                destinations=[],
                outputs=[],
                delivery_grace_seconds=60,
                analysis=worklist.AnalysisRecord(
                    probability, probability >= 0.8, 0.8, "v", f"{uid}.1", [], {}
                ),
            )

    def order() -> list[str]:
        with transaction(sessions) as session:
            return [row["study_uid"] for row in queries.worklist_rows(session)]

    assert order() == ["1.2.3", "1.2.4", "1.2.5"]
    # when a site wants studies the AI has not answered on top, and reprioritises
    with transaction(sessions) as session:
        changed = reprioritise(session, ["unanswered", "positive", "negative"])
    # then the stored priorities follow the new order
    assert changed == 2  # the negative stays in the bottom band with the same value
    assert order() == ["1.2.4", "1.2.3", "1.2.5"]


def test_band_order_setting_must_name_each_band_once() -> None:
    assert Settings(
        _env_file=None, priority_bands="negative, positive,unanswered"
    ).worklist.priority_bands == [  # type: ignore[call-arg]
        "negative",
        "positive",
        "unanswered",
    ]
    with pytest.raises(ValidationError, match="HRCT_PRIORITY_BANDS"):
        Settings(_env_file=None, priority_bands="positive,positive,negative")  # type: ignore[call-arg]
