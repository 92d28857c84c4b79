"""Late waves in the worklist, on SQLite and PostgreSQL (real databases, migrated): a study with
a verdict is re-opened for a check within its generation, an instance that arrives during an
analysis leaves the claim alone, identical resends are noted, and the quiet period can differ
by scanner. tests/test_waves_e2e.py drives the same over real sockets and processes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from hrct_triage.common.settings import Settings
from hrct_triage.db import stats, worklist
from hrct_triage.db.models import (
    Delivery,
    DeliveryState,
    Event,
    OutboxRow,
    Output,
    Study,
    StudyStatus,
)
from hrct_triage.db.session import transaction
from hrct_triage.processes import settings_env

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
CT = "1.2.840.10008.5.1.4.1.1.2"
DOSE_SR = "1.2.840.10008.5.1.4.1.1.88.67"


def facts(
    sop: str,
    *,
    study: str = "1.2.3",
    series: int = 3,
    sha: str = "a" * 64,
    sop_class: str = CT,
    calling_ae: str | None = "CT1",
) -> worklist.InstanceFacts:
    return worklist.InstanceFacts(
        study_uid=study,
        series_uid=f"{study}.{series}",
        sop_instance_uid=sop,
        sop_class_uid=sop_class,
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        path=f"/spool/{sop}.dcm",
        size_bytes=10,
        sha256=sha,
        modality="CT" if sop_class == CT else "SR",
        series_number=series,
        series_description=f"series {series}",
        calling_ae=calling_ae,
    )


def record(sessions: sessionmaker[Session], item: worklist.InstanceFacts, at: datetime) -> None:
    with transaction(sessions) as session:
        worklist.record_instance(session, item, association_id=None, now=at)


def complete(sessions: sessionmaker[Session], at: datetime, **by_aet: float) -> list[int]:
    with transaction(sessions) as session:
        return worklist.complete_ready_studies(
            session, quiet_seconds=10, now=at, quiet_seconds_by_aet=by_aet
        )


def claim(sessions: sessionmaker[Session], study_id: int, at: datetime) -> worklist.Claim:
    with transaction(sessions) as session:
        taken = worklist.claim(session, study_id, worker="w", lease_seconds=60, now=at)
    assert taken is not None
    return taken


def study_row(sessions: sessionmaker[Session], uid: str = "1.2.3") -> Study:
    with transaction(sessions) as session:
        study = session.scalars(select(Study).where(Study.study_uid == uid)).one()
        session.expunge(study)
        return study


def events(sessions: sessionmaker[Session], study_id: int) -> list[str]:
    with transaction(sessions) as session:
        return [
            detail or ""
            for detail in session.scalars(
                select(Event.detail).where(Event.study_id == study_id).order_by(Event.id)
            ).all()
        ]


def analysed(
    sessions: sessionmaker[Session],
    *,
    digest: str | None = "d1",
    destinations: tuple[str, ...] = (),
) -> int:
    """A study of two instances analysed at T0+20 on input ``digest``."""
    record(sessions, facts("1.2.3.3.1"), T0)
    record(sessions, facts("1.2.3.3.2"), T0 + timedelta(seconds=1))
    (study_id,) = complete(sessions, T0 + timedelta(seconds=11))
    taken = claim(sessions, study_id, T0 + timedelta(seconds=12))
    output = worklist.OutputRecord("sr", "9.9.1", "1.2.840.10008.5.1.4.1.1.88.34", "9.9", "/o.dcm")
    with transaction(sessions) as session:
        assert worklist.finish_analysis(
            session,
            taken,
            analysis=worklist.AnalysisRecord(
                0.9, True, 0.8, "v", "1.2.3.3", [], {}, input_digest=digest
            ),
            outputs=[output] if destinations else [],
            destinations=list(destinations),
            now=T0 + timedelta(seconds=20),
            delivery_grace_seconds=60,
        )
    return study_id


LATE = T0 + timedelta(seconds=600)


def test_late_arrival_at_an_answered_study_is_checked_within_its_generation(
    sessions: sessionmaker[Session],
) -> None:
    # given a study analysed on input "d1"
    study_id = analysed(sessions)
    before = study_row(sessions)
    # when a dose SR arrives ten minutes later
    record(sessions, facts("1.2.3.997.1", series=997, sop_class=DOSE_SR), LATE)
    # then the study is re-opened, remembering the state to go back to
    reopened = study_row(sessions)
    assert (reopened.status, reopened.reopened_from, reopened.reopened_at) == (
        StudyStatus.RECEIVING,
        StudyStatus.DONE,
        LATE,
    )
    assert "late new instance of series 997; re-opened to check" in events(sessions, study_id)[-1]
    # and once quiet it is queued for a check, in the same generation, its stamps untouched
    assert complete(sessions, LATE + timedelta(seconds=10)) == [study_id]
    queued = study_row(sessions)
    assert (queued.status, queued.generation) == (StudyStatus.QUEUED, 1)
    assert (queued.completed_at, queued.queued_at) == (before.completed_at, before.queued_at)
    assert "checking the late wave" in events(sessions, study_id)[-1]
    # and the claim says it is a check, against the verdict's input
    check = claim(sessions, study_id, LATE + timedelta(seconds=11))
    assert (check.analysed_input, check.generation) == ("d1", 1)
    assert study_row(sessions).analysis_started_at == before.analysis_started_at
    # and the wave is the dose SR alone
    with transaction(sessions) as session:
        (late,) = worklist.late_arrivals(session, study_id, since=LATE)
    assert (late.series_number, late.sop_classes, late.new, late.replaced) == (
        997,
        (DOSE_SR,),
        1,
        0,
    )
    # when the worker finds nothing new to analyse, the verdict stands as it was
    with transaction(sessions) as session:
        kept_at = LATE + timedelta(seconds=12)
        assert worklist.keep_verdict(session, check, detail="no change", now=kept_at)
    kept = study_row(sessions)
    assert (kept.status, kept.generation, kept.probability) == (StudyStatus.DONE, 1, 0.9)
    assert (kept.reopened_from, kept.reopened_at, kept.analysed_input) == (None, None, "d1")
    assert kept.analysed_at == before.analysed_at
    assert events(sessions, study_id)[-1] == "no change"
    with transaction(sessions) as session:
        live = session.scalars(select(OutboxRow).where(OutboxRow.done_at.is_(None))).all()
    assert live == []


def test_check_of_a_delivering_study_resumes_its_deliveries(
    sessions: sessionmaker[Session],
) -> None:
    # given a study whose SR is still owed to a PACS when a late instance arrives
    study_id = analysed(sessions, destinations=("PACS@127.0.0.1:104",))
    assert study_row(sessions).status == StudyStatus.DELIVERING
    record(sessions, facts("1.2.3.1.1", series=1), LATE)
    complete(sessions, LATE + timedelta(seconds=10))
    check = claim(sessions, study_id, LATE + timedelta(seconds=11))
    # when the check keeps the verdict
    with transaction(sessions) as session:
        assert worklist.keep_verdict(session, check, detail="no change", now=LATE)
    # then the study delivers again at once, what it owed before
    assert study_row(sessions).status == StudyStatus.DELIVERING
    with transaction(sessions) as session:
        owed = session.scalars(
            select(OutboxRow).where(OutboxRow.done_at.is_(None), OutboxRow.task == "deliver")
        ).all()
        pending = session.scalars(
            select(Delivery).where(Delivery.state == DeliveryState.PENDING)
        ).all()
    assert [(row.generation, row.not_before) for row in owed] == [(1, None)]
    assert len(pending) == 1


def test_check_that_finds_another_input_analyses_a_new_generation(
    sessions: sessionmaker[Session],
) -> None:
    # given a check of a late wave
    study_id = analysed(sessions)
    record(sessions, facts("1.2.3.2.1", series=2), LATE)
    complete(sessions, LATE + timedelta(seconds=10))
    check = claim(sessions, study_id, LATE + timedelta(seconds=11))
    # when the worker finds that series selection would analyse something else
    started_at = LATE + timedelta(seconds=12)
    with transaction(sessions) as session:
        started = worklist.start_generation(session, check, detail="new input", now=started_at)
    # then the claim goes on as the analysis of generation 2, stamped from now
    assert started is not None
    assert (started.generation, started.analysed_input, started.token) == (2, None, check.token)
    study = study_row(sessions)
    assert (study.status, study.generation, study.analysed_input) == (
        StudyStatus.PROCESSING,
        2,
        None,
    )
    assert study.completed_at == study.queued_at == study.analysis_started_at == started_at
    assert study.input_received_at == LATE
    # and its message announces generation 2, so a lapsed lease publishes it again
    with transaction(sessions) as session:
        (message,) = session.scalars(select(OutboxRow).where(OutboxRow.done_at.is_(None))).all()
    assert (message.task, message.generation) == ("triage", 2)
    # and the result is recorded under the new claim, with the new input
    with transaction(sessions) as session:
        assert not worklist.keep_verdict(session, check, detail="stale", now=started_at)
        assert worklist.finish_analysis(
            session,
            started,
            analysis=worklist.AnalysisRecord(
                0.2, False, 0.8, "v", "1.2.3.2", [], {}, input_digest="d2"
            ),
            outputs=[],
            destinations=[],
            now=started_at,
            delivery_grace_seconds=60,
        )
    done = study_row(sessions)
    assert (done.status, done.generation, done.analysed_input) == (StudyStatus.DONE, 2, "d2")


def test_instance_during_the_analysis_leaves_the_claim_to_the_worker(
    sessions: sessionmaker[Session],
) -> None:
    # given a study being analysed on its two instances
    record(sessions, facts("1.2.3.3.1"), T0)
    record(sessions, facts("1.2.3.3.2"), T0)
    (study_id,) = complete(sessions, T0 + timedelta(seconds=10))
    taken = claim(sessions, study_id, T0 + timedelta(seconds=11))
    with transaction(sessions) as session:
        rows = worklist.held_input_rows(session, taken)
    assert rows is not None
    seen = worklist.instance_set_digest(rows)
    # when two instances of another series arrive meanwhile
    for n in (1, 2):
        record(sessions, facts(f"1.2.3.2.{n}", series=2), T0 + timedelta(seconds=11 + n))
    # then the claim stands, and one event says they will be compared
    study = study_row(sessions)
    assert (study.status, study.claim_token) == (StudyStatus.PROCESSING, taken.token)
    assert study.reopened_at == T0 + timedelta(seconds=12)
    notes = [e for e in events(sessions, study_id) if "during the analysis" in e]
    assert len(notes) == 1
    # and the worker sees them under the study's lock before it records anything
    with transaction(sessions) as session:
        rows = worklist.held_input_rows(session, taken)
    assert rows is not None and len(rows) == 4
    assert worklist.instance_set_digest(rows) != seen
    assert worklist.instance_set_digest(reversed(rows)) == worklist.instance_set_digest(rows)
    # when they change what would be analysed, the study completes again, for an analysis
    with transaction(sessions) as session:
        assert worklist.reopen(session, taken, detail="changed", now=T0 + timedelta(seconds=20))
    study = study_row(sessions)
    assert (study.status, study.claim_token, study.reopened_at) == (
        StudyStatus.RECEIVING,
        None,
        None,
    )
    complete(sessions, T0 + timedelta(seconds=30))
    again = claim(sessions, study_id, T0 + timedelta(seconds=31))
    assert (again.generation, again.analysed_input) == (2, None)


def test_changed_instance_during_the_analysis_takes_the_claim_back(
    sessions: sessionmaker[Session],
) -> None:
    # given a study being analysed
    record(sessions, facts("1.2.3.3.1"), T0)
    (study_id,) = complete(sessions, T0 + timedelta(seconds=10))
    taken = claim(sessions, study_id, T0 + timedelta(seconds=11))
    # when one of its instances arrives again with other bytes (its file is replaced)
    record(sessions, facts("1.2.3.3.1", sha="b" * 64), T0 + timedelta(seconds=12))
    # then the analysis records nothing and the study is analysed again once quiet
    assert study_row(sessions).status == StudyStatus.RECEIVING
    with transaction(sessions) as session:
        assert worklist.held_input_rows(session, taken) is None
    assert "instance replaced with different content" in events(sessions, study_id)[-1]


def test_a_check_given_back_is_checked_again(sessions: sessionmaker[Session]) -> None:
    study_id = analysed(sessions)
    record(sessions, facts("1.2.3.1.1", series=1), LATE)
    complete(sessions, LATE + timedelta(seconds=10))
    check = claim(sessions, study_id, LATE + timedelta(seconds=11))
    # when instances kept arriving during the check and the worker gives it back
    with transaction(sessions) as session:
        assert worklist.reopen(session, check, detail="still arriving", now=LATE)
    # then the verdict's input and state to return to are kept, for the next check
    study = study_row(sessions)
    assert (study.status, study.analysed_input, study.reopened_from, study.reopened_at) == (
        StudyStatus.RECEIVING,
        "d1",
        StudyStatus.DONE,
        LATE,
    )
    complete(sessions, LATE + timedelta(seconds=20))
    assert claim(sessions, study_id, LATE + timedelta(seconds=21)).analysed_input == "d1"
    assert study_row(sessions).generation == 1


def test_a_check_that_keeps_failing_leaves_the_verdict_as_it_was(
    sessions: sessionmaker[Session],
) -> None:
    # given a not-applicable study whose late wave's check fails (an unreadable spool, say)
    record(sessions, facts("1.2.3.3.1"), T0)
    (study_id,) = complete(sessions, T0 + timedelta(seconds=10))
    with transaction(sessions) as session:
        taken = worklist.claim(session, study_id, worker="w", lease_seconds=60, now=T0)
        assert taken is not None
        worklist.mark_not_applicable(
            session, taken, reason="too few slices", now=T0, input_digest="none"
        )
    record(sessions, facts("1.2.3.1.1", series=1), LATE)
    complete(sessions, LATE + timedelta(seconds=10))
    for attempt in (1, 2):
        check = claim(sessions, study_id, LATE + timedelta(seconds=10 + attempt))
        with transaction(sessions) as session:
            outcome = worklist.fail_analysis(
                session,
                check,
                reason="OSError: spool unreadable",
                max_attempts=2,
                retry_after_seconds=0,
                now=LATE + timedelta(seconds=10 + attempt),
            )
        # then it is tried again, keeping the verdict's reason, and after the last attempt
        # the study is back where the wave found it
        study = study_row(sessions)
        assert study.reason == "too few slices"
        assert (outcome, study.status) == (
            (StudyStatus.QUEUED, StudyStatus.QUEUED)
            if attempt == 1
            else (StudyStatus.NOT_APPLICABLE, StudyStatus.NOT_APPLICABLE)
        )
    assert (study.generation, study.analysed_input, study.reopened_from) == (1, "none", None)
    assert events(sessions, study_id)[-1] == (
        "the late wave could not be checked in 2 attempts: OSError: spool unreadable; "
        "the verdict stands"
    )


def test_requeue_analyses_again_whatever_the_input(sessions: sessionmaker[Session]) -> None:
    study_id = analysed(sessions)
    with transaction(sessions) as session:
        study = session.get(Study, study_id)
        assert study is not None
        assert worklist.requeue(session, study, now=LATE, detail="requeued by operator")
    forced = claim(sessions, study_id, LATE + timedelta(seconds=1))
    assert (forced.generation, forced.analysed_input) == (2, None)


def test_verdict_without_an_input_digest_is_analysed_again_as_before(
    sessions: sessionmaker[Session],
) -> None:
    # a verdict recorded before input digests existed (or by a caller that gives none)
    study_id = analysed(sessions, digest=None)
    record(sessions, facts("1.2.3.1.1", series=1), LATE)
    assert "will analyse again" in events(sessions, study_id)[-1]
    assert study_row(sessions).reopened_from is None
    complete(sessions, LATE + timedelta(seconds=10))
    assert claim(sessions, study_id, LATE + timedelta(seconds=11)).generation == 2


def test_quiet_period_by_calling_ae(sessions: sessionmaker[Session]) -> None:
    # given studies from a scanner with a longer quiet period, one without, one unnamed
    record(sessions, facts("1.2.4.3.1", study="1.2.4", calling_ae="CT_SLOW"), T0)
    record(sessions, facts("1.2.5.3.1", study="1.2.5", calling_ae="CT_FAST"), T0)
    record(sessions, facts("1.2.6.3.1", study="1.2.6", calling_ae=None), T0)
    # when ten seconds pass, only the default quiet period is over
    done = complete(sessions, T0 + timedelta(seconds=10), CT_SLOW=60)
    assert {study_row(sessions, uid).status for uid in ("1.2.5", "1.2.6")} == {"queued"}
    assert study_row(sessions, "1.2.4").status == StudyStatus.RECEIVING and len(done) == 2
    # then the slow scanner's study completes after its own
    assert complete(sessions, T0 + timedelta(seconds=59), CT_SLOW=60) == []
    (slow,) = complete(sessions, T0 + timedelta(seconds=60), CT_SLOW=60)
    assert events(sessions, slow)[-1] == "quiet for 60 s"


def test_identical_resend_is_noted_when_its_association_closes(
    sessions: sessionmaker[Session],
) -> None:
    # given an analysed study, and one still in its first reception
    study_id = analysed(sessions)
    record(sessions, facts("1.2.7.3.1", study="1.2.7"), LATE)
    with transaction(sessions) as session:
        association = worklist.open_association(
            session,
            calling_ae="CT1",
            called_ae="HRCT_TRIAGE",
            peer_address="127.0.0.1",
            peer_port=1,
            now=LATE,
        )
    # when an association sends instances of both again, unchanged
    tally = worklist.AssociationTally()
    for item in (facts("1.2.3.3.1"), facts("1.2.3.3.2"), facts("1.2.7.3.1", study="1.2.7")):
        with transaction(sessions) as session:
            outcome = worklist.record_instance(session, item, association_id=association, now=LATE)
        assert outcome is worklist.Recorded.IDENTICAL
        tally.resend(item.study_uid)
    with transaction(sessions) as session:
        worklist.close_association(session, association, state="released", now=LATE, tally=tally)
    # then the analysed study notes the late wave and stays as it was
    assert events(sessions, study_id)[-1] == (
        f"late wave: 2 instances sent again unchanged by CT1 (association {association}); "
        "nothing to analyse, not re-opened"
    )
    assert (study_row(sessions).status, study_row(sessions).generation) == ("done", 1)
    # and the one still receiving notes nothing (a retry in its first reception)
    other = study_row(sessions, "1.2.7")
    assert not [e for e in events(sessions, other.id) if "sent again" in e]


def test_a_wave_is_settled_once_quiet_and_no_association_feeds_it(
    sessions: sessionmaker[Session],
) -> None:
    record(sessions, facts("1.2.3.3.1"), T0)
    (study_id,) = complete(sessions, T0 + timedelta(seconds=10))
    claim(sessions, study_id, T0 + timedelta(seconds=11))
    with transaction(sessions) as session:
        association = worklist.open_association(
            session, calling_ae="CT1", called_ae="X", peer_address="h", peer_port=1, now=T0
        )
        worklist.record_instance(
            session, facts("1.2.3.2.1", series=2), association_id=association, now=T0
        )

    def settled(at: datetime) -> bool:
        with transaction(sessions) as session:
            return worklist.wave_settled(session, study_id, quiet_seconds=10, now=at)

    assert not settled(T0 + timedelta(hours=1))  # an association still feeds it
    with transaction(sessions) as session:
        worklist.close_association(session, association, state="released", now=T0)
    assert not settled(T0 + timedelta(seconds=5)) and settled(T0 + timedelta(seconds=10))


def test_time_to_notification_ignores_a_late_wave_that_changed_nothing(
    sessions: sessionmaker[Session],
) -> None:
    # given a study whose SR the PACS acknowledged 60 s after its last instance
    study_id = analysed(sessions, destinations=("PACS@127.0.0.1:104",))
    with transaction(sessions) as session:
        (delivery,) = session.scalars(select(Delivery)).all()
        worklist.record_delivery(
            session,
            delivery.id,
            status_code=0,
            error=None,
            max_attempts=3,
            now=T0 + timedelta(seconds=61),
        )
        worklist.settle_delivery(session, study_id, now=T0 + timedelta(seconds=61), retry_at=T0)
    # when a dose SR arrives later and changes nothing
    record(sessions, facts("1.2.3.997.1", series=997, sop_class=DOSE_SR), LATE)
    complete(sessions, LATE + timedelta(seconds=10))
    check = claim(sessions, study_id, LATE + timedelta(seconds=11))
    with transaction(sessions) as session:
        worklist.keep_verdict(session, check, detail="no change", now=LATE)
    # then the time to notification is still counted from the analysed input's last instance
    with transaction(sessions) as session:
        timeline = stats.load_timeline(session, "1.2.3")
        outputs = session.scalars(select(Output)).all()
    assert timeline is not None and timeline.time_to_notification == 60.0
    assert study_row(sessions).last_instance_at == LATE and len(outputs) == 1


def test_quiet_seconds_by_aet_setting() -> None:
    settings = Settings(_env_file=None, quiet_seconds_by_aet="CT1=60, CT_ER=0")
    assert settings.listener.quiet_seconds_by_aet == {"CT1": 60.0, "CT_ER": 0.0}
    assert [settings.listener.quiet_seconds_for(ae) for ae in ("CT1", "CT_ER", "CT9", None)] == [
        60.0,
        0.0,
        10.0,
        10.0,
    ]
    # the child processes of `up` read the same value back
    env = settings_env(settings)
    assert env["HRCT_QUIET_SECONDS_BY_AET"] == "CT1=60.0,CT_ER=0.0"
    for bad, says in (
        ("CT1", "is not AE=seconds"),
        ("CT1=soon", "is not a number of seconds"),
        ("CT1=-5", "is below 0"),
        ("=5", "is not an AE title"),
    ):
        with pytest.raises(ValidationError, match=says):
            Settings(_env_file=None, quiet_seconds_by_aet=bad)
