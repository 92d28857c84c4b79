"""Turnaround statistics (db.stats) and the ``stats`` command, on SQLite and PostgreSQL.

The rows are built by hand with chosen stamps, so every expected number is known; percentiles are
checked against numpy on the same values.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
import typer
from sqlalchemy.orm import Session, sessionmaker
from typer.testing import CliRunner

from hrct_triage.cli import operations as ops_cli
from hrct_triage.common.settings import get_settings
from hrct_triage.db import stats
from hrct_triage.db.models import Delivery, DeliveryState, Output, Study, StudyStatus
from hrct_triage.db.session import transaction

T0 = datetime(2026, 3, 2, 8, 0, tzinfo=UTC)
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"


def add_study(
    session: Session,
    uid: str,
    *,
    last: datetime,
    scanner: str | None = "CT1",
    status: str = StudyStatus.DONE,
    generation: int = 1,
    stage_seconds: tuple[float, float, float, float] = (30, 10, 5, 60),
) -> Study:
    """A study whose stamps follow ``last`` (receiving, quiet, waiting, analysis seconds)."""
    receiving, quiet, waiting, analysis = stage_seconds
    completed = last + timedelta(seconds=quiet)
    started = completed + timedelta(seconds=waiting)
    study = Study(
        study_uid=uid,
        status=status,
        calling_ae=scanner,
        accession_number=f"A{uid[-4:]}",
        generation=generation,
        first_instance_at=last - timedelta(seconds=receiving),
        last_instance_at=last,
        completed_at=completed,
        queued_at=completed,
        analysis_started_at=started,
        analysed_at=started + timedelta(seconds=analysis),
    )
    session.add(study)
    session.flush()
    return study


def add_output(
    session: Session,
    study: Study,
    *,
    kind: str = "sr",
    generation: int | None = None,
    acks: dict[str, datetime | None],
) -> None:
    """One output and a delivery per destination; None: not acknowledged yet."""
    output = Output(
        study_id=study.id,
        generation=study.generation if generation is None else generation,
        kind=kind,
        sop_instance_uid=f"{study.study_uid}.{kind}.{generation}.{len(acks)}",
        sop_class_uid=SR_CLASS if kind == "sr" else SC_CLASS,
        series_uid=f"{study.study_uid}.9",
        path=f"/outputs/{study.study_uid}.dcm",
    )
    session.add(output)
    session.flush()
    for destination, at in acks.items():
        session.add(
            Delivery(
                output_id=output.id,
                destination=destination,
                state=DeliveryState.SENT if at else DeliveryState.PENDING,
                attempts=1,
                acknowledged_at=at,
            )
        )


def notified_study(
    session: Session, uid: str, *, last: datetime, ttn: float, scanner: str = "CT1"
) -> None:
    study = add_study(session, uid, last=last, scanner=scanner)
    add_output(session, study, acks={"PACS@pacs:104": last + timedelta(seconds=ttn)})


def test_percentiles_per_day_and_scanner_match_numpy(sessions: sessionmaker[Session]) -> None:
    # given 40 notified studies over two days from two scanners, with known times
    rng = np.random.default_rng(3)
    expected: dict[str, list[float]] = {}
    with transaction(sessions) as session:
        for i in range(40):
            day = T0 + timedelta(days=i % 2, minutes=i)
            scanner = "CT_NORTH" if i % 3 else "CT_SOUTH"
            ttn = float(rng.integers(60, 3600))
            notified_study(session, f"1.2.840.99.{i:04d}", last=day, ttn=ttn, scanner=scanner)
            for key in ("all", day.date().isoformat(), scanner):
                expected.setdefault(key, []).append(ttn)
    # when the report is built
    with transaction(sessions) as session:
        timelines = stats.load_timelines(session)
    report = stats.build_report(timelines, target_seconds=900, now=T0 + timedelta(days=3))
    # then every group's p50/p95 is numpy's over the same values
    groups = [report.overall, *report.days, *report.scanners]
    assert [g.key for g in report.days] == ["2026-03-02", "2026-03-03"]
    assert [g.key for g in report.scanners] == ["CT_NORTH", "CT_SOUTH"]
    for group in groups:
        values = np.asarray(expected[group.key])
        p50, p95 = np.percentile(values, [50, 95])
        assert group.studies == group.notified == len(values)
        assert group.time_to_notification == stats.Percentiles(len(values), p50, p95)


def test_stage_durations_come_from_the_stamps(sessions: sessionmaker[Session]) -> None:
    # given studies with known stage durations, one not yet analysed
    with transaction(sessions) as session:
        for i, analysis in enumerate((40.0, 80.0, 120.0)):
            study = add_study(
                session, f"1.2.3.{i}", last=T0, stage_seconds=(20, 10 + i, 2, analysis)
            )
            add_output(session, study, acks={"PACS@pacs:104": study.analysed_at})
        waiting = add_study(
            session, "1.2.3.9", last=T0, status=StudyStatus.QUEUED, stage_seconds=(20, 10, 2, 0)
        )
        waiting.analysis_started_at = waiting.analysed_at = None
    # when summarised
    with transaction(sessions) as session:
        summary = stats.summarise(stats.load_timelines(session), "all")
    # then each stage's percentiles are numpy's over the studies that reached it
    assert summary.stages["receiving"] == stats.Percentiles(4, 20.0, 20.0)
    analysis_p50, analysis_p95 = np.percentile([40.0, 80.0, 120.0], [50, 95])
    assert summary.stages["analysis"] == stats.Percentiles(3, analysis_p50, analysis_p95)
    assert summary.stages["quiet"].count == 4
    assert summary.stages["delivery"] == stats.Percentiles(3, 0.0, 0.0)
    assert summary.notified == 3


def test_notification_is_the_latest_sr_acknowledged_by_every_destination(
    sessions: sessionmaker[Session],
) -> None:
    # given a re-analysed study: an old SR acknowledged early, the new SR acknowledged by two
    # destinations at different times, and a heat map acknowledged later still
    with transaction(sessions) as session:
        study = add_study(session, "1.2.5", last=T0, generation=2)
        add_output(
            session, study, generation=1, acks={"PACS@pacs:104": T0 + timedelta(seconds=100)}
        )
        add_output(
            session,
            study,
            acks={
                "PACS@pacs:104": T0 + timedelta(seconds=300),
                "ARCHIVE@arch:104": T0 + timedelta(seconds=500),
            },
        )
        add_output(session, study, kind="sc", acks={"PACS@pacs:104": T0 + timedelta(seconds=900)})
    # when its timeline is read
    with transaction(sessions) as session:
        timeline = stats.load_timeline(session, "1.2.5")
    # then the clock stops when the last destination acknowledged the newest SR
    assert timeline is not None
    assert timeline.time_to_notification == 500.0
    assert timeline.as_dict()["time_to_notification_seconds"] == 500.0


def test_alarms_name_slow_and_still_waiting_studies_only(
    sessions: sessionmaker[Session], caplog: pytest.LogCaptureFixture
) -> None:
    # given a fast study, a slow one, one whose SR a destination has not acknowledged, and two
    # that owe no SR at all
    now = T0 + timedelta(seconds=2000)
    with transaction(sessions) as session:
        notified_study(session, "1.2.6.1", last=T0, ttn=120)
        notified_study(session, "1.2.6.2", last=T0, ttn=1200)
        pending = add_study(session, "1.2.6.3", last=T0, status=StudyStatus.DELIVERING)
        add_output(
            session,
            pending,
            acks={"PACS@pacs:104": T0 + timedelta(seconds=60), "ARCHIVE@arch:104": None},
        )
        add_study(session, "1.2.6.4", last=T0, status=StudyStatus.NOT_APPLICABLE)
        add_study(session, "1.2.6.5", last=T0, status=StudyStatus.DONE)  # no destinations
    # when the alarms against a 900 s target are listed and logged
    with transaction(sessions) as session:
        found = stats.alarms(stats.load_timelines(session), target_seconds=900, now=now)
    with caplog.at_level(logging.WARNING, logger="hrct_triage.db.stats"):
        logged = stats.log_alarms(found, target_seconds=900)
    # then the still-waiting study leads, the slow one follows, nothing else is named
    assert [(a.study_uid, a.seconds, a.notified) for a in found] == [
        ("1.2.6.3", 2000.0, False),
        ("1.2.6.2", 1200.0, True),
    ]
    assert logged == 2
    assert "study 1.2.6.3 from CT1 (delivering) still waiting after 2000 s" in caplog.text


def test_since_keeps_studies_whose_last_image_came_after_it(
    sessions: sessionmaker[Session],
) -> None:
    # given studies on two days
    with transaction(sessions) as session:
        notified_study(session, "1.2.7.1", last=T0, ttn=100)
        notified_study(session, "1.2.7.2", last=T0 + timedelta(days=1), ttn=100)
    # when only the second day is asked for
    with transaction(sessions) as session:
        timelines = stats.load_timelines(session, since=T0 + timedelta(hours=12))
    # then only its study is counted
    assert [t.study_uid for t in timelines] == ["1.2.7.2"]


@pytest.fixture
def cli_database(database_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The command reads HRCT_DATABASE_URL through the process-wide cached settings."""
    monkeypatch.setenv("HRCT_DATABASE_URL", database_url)
    get_settings.cache_clear()
    yield database_url
    get_settings.cache_clear()


def _cli() -> typer.Typer:
    """A CLI with the command registered as hrct_triage.cli.app registers it."""
    app = typer.Typer()
    app.command("stats")(ops_cli.stats_command)
    app.command("noop")(lambda: None)  # two commands, so typer keeps the sub-command name
    return app


def test_stats_command_prints_json_and_tables(
    cli_database: str, sessions: sessionmaker[Session]
) -> None:
    # given one slow notified study
    with transaction(sessions) as session:
        notified_study(session, "1.2.8.1", last=T0, ttn=1500, scanner="CT_EAST")
    # when stats runs with --json, then as tables
    as_json = CliRunner().invoke(_cli(), ["stats", "--json", "--target-seconds", "600"])
    tables = CliRunner().invoke(_cli(), ["stats", "--since", "2026-03-01"])
    # then both exit 0; the JSON carries the summary and the alarm, the tables the scanner
    assert as_json.exit_code == 0, as_json.output
    document = json.loads(as_json.output)
    assert document["target_seconds"] == 600
    assert document["by_scanner"][0]["key"] == "CT_EAST"
    assert document["overall"]["time_to_notification"] == {"count": 1, "p50": 1500, "p95": 1500}
    assert [a["study_uid"] for a in document["alarms"]] == ["1.2.8.1"]
    assert tables.exit_code == 0, tables.output
    assert "CT_EAST" in tables.output and "25 min" in tables.output


def test_format_seconds_reads_like_a_clock() -> None:
    seconds = (None, 42.4, 185, 900, 7620, 7200, 90000)
    assert [stats.format_seconds(s) for s in seconds] == [
        "—",
        "42 s",
        "3 min 05 s",
        "15 min",
        "2 h 07 min",
        "2 h",
        "1 d 1 h",
    ]
