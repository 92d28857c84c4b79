"""Admin CLI on a real worklist (SQLite and PostgreSQL): worklist filters, cancel, purge, doctor.

Commands run through typer's CliRunner on the real app, with the settings read from the
environment like a shell would give them.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from typer.testing import CliRunner, Result

from hrct_triage.cli.app import app
from hrct_triage.common.settings import get_settings
from hrct_triage.db.models import (
    Delivery,
    DeliveryState,
    Event,
    Instance,
    Output,
    Series,
    Study,
    StudyStatus,
)
from hrct_triage.db.priority import priority_for
from hrct_triage.db.session import transaction
from tests.helpers.checkpoints import shipped_model_version
from tests.helpers.ports import free_port

NOW = datetime.now(UTC)
OLD = NOW - timedelta(days=60)


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, database_url: str) -> Iterator[Path]:
    """HRCT_* for the CLI: this test's database and data folder; settings read afresh."""
    data_dir = tmp_path / "var"
    monkeypatch.setenv("HRCT_DATA_DIR", str(data_dir))
    monkeypatch.setenv("HRCT_DATABASE_URL", database_url)
    monkeypatch.setenv("HRCT_MIN_FREE_DISK_BYTES", "1")
    monkeypatch.setenv("HRCT_ALLOW_UNTRAINED", "true")
    monkeypatch.delenv("HRCT_DESTINATIONS", raising=False)
    monkeypatch.delenv("HRCT_BROKER_URL", raising=False)
    get_settings.cache_clear()
    yield data_dir
    get_settings.cache_clear()


def cli(*args: str) -> Result:
    return CliRunner().invoke(app, list(args), catch_exceptions=False)


def add_study(
    sessions: sessionmaker[Session],
    data_dir: Path,
    uid: str,
    *,
    status: str = StudyStatus.DONE,
    positive: bool | None = None,
    probability: float | None = None,
    scanner: str = "CT1",
    accession: str | None = None,
    at: datetime = NOW,
    delivery: str = DeliveryState.SENT,
) -> list[Path]:
    """A study as the listener and a worker leave it, with one spooled file and one output."""
    spooled = data_dir / "spool" / uid / f"{uid}.1" / f"{uid}.1.1.dcm"
    output = data_dir / "outputs" / uid / "sr.dcm"
    for path in (spooled, output):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"DICM" * 64)
    with transaction(sessions) as session:
        study = Study(
            study_uid=uid,
            status=status,
            positive=positive,
            probability=probability,
            priority=priority_for(status, positive, probability),
            calling_ae=scanner,
            accession_number=accession,
            generation=1,
            first_instance_at=at,
            last_instance_at=at,
            updated_at=at,
        )
        session.add(study)
        session.flush()
        series = Series(study_id=study.id, series_uid=f"{uid}.1", modality="CT")
        session.add(series)
        session.flush()
        session.add(
            Instance(
                study_id=study.id,
                series_id=series.id,
                sop_instance_uid=f"{uid}.1.1",
                sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                transfer_syntax_uid="1.2.840.10008.1.2.1",
                path=str(spooled),
                size_bytes=256,
                sha256="a" * 64,
                received_at=at,
            )
        )
        out = Output(
            study_id=study.id,
            generation=1,
            kind="sr",
            sop_instance_uid=f"{uid}.9",
            sop_class_uid="1.2.840.10008.5.1.4.1.1.88.34",
            series_uid=f"{uid}.9",
            path=str(output),
        )
        session.add(out)
        session.flush()
        session.add(Delivery(output_id=out.id, destination="PACS@host:104", state=delivery))
    return [spooled, output]


def uids(result: Result) -> list[str]:
    return [row["study_uid"] for row in json.loads(result.stdout)]


def test_worklist_filters_combine_and_nothing_matched_exits_3(
    env: Path, sessions: sessionmaker[Session]
) -> None:
    # given positive, negative and unanalysed studies from two scanners
    add_study(sessions, env, "1.1", positive=True, probability=0.95, accession="ACC-100")
    add_study(sessions, env, "1.2", positive=False, probability=0.1, scanner="ER_CT")
    add_study(sessions, env, "1.3", status=StudyStatus.QUEUED, at=OLD, accession="acc-200")
    # when filtering, then each filter keeps only its studies, urgent first
    assert uids(cli("worklist", "--json")) == ["1.1", "1.3", "1.2"]
    assert uids(cli("worklist", "--positive", "--json")) == ["1.1"]
    assert uids(cli("worklist", "--negative", "--json")) == ["1.2"]
    assert uids(cli("worklist", "--scanner", "ER_CT", "--json")) == ["1.2"]
    assert uids(cli("worklist", "--accession", "acc-", "--json")) == ["1.1", "1.3"]
    since = (NOW - timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%S")
    assert uids(cli("worklist", "--since", since, "--json")) == ["1.1", "1.2"]
    assert uids(cli("worklist", "--status", "queued", "--scanner", "CT1", "--json")) == ["1.3"]
    # and a filter that matches nothing says so in the exit code
    empty = cli("worklist", "--scanner", "NOBODY", "--json")
    assert empty.exit_code == 3 and json.loads(empty.stdout) == []


def test_cancel_ends_failed_and_leaves_final_studies(
    env: Path, sessions: sessionmaker[Session]
) -> None:
    # given a queued study, one delivering, and one done
    add_study(sessions, env, "2.1", status=StudyStatus.QUEUED)
    add_study(sessions, env, "2.2", status=StudyStatus.DELIVERING, delivery=DeliveryState.PENDING)
    add_study(sessions, env, "2.3", status=StudyStatus.DONE)
    # when the operator cancels all three and an unknown UID
    result = cli("cancel", "2.1", "2.2", "2.3", "9.9")
    # then the unfinished ones are failed, "cancelled by operator", with nothing left to send
    assert result.exit_code == 0, result.stdout
    with transaction(sessions) as session:
        studies = {s.study_uid: s for s in session.scalars(select(Study))}
        assert studies["2.1"].status == studies["2.2"].status == StudyStatus.FAILED
        assert studies["2.1"].reason == "cancelled by operator"
        assert studies["2.3"].status == StudyStatus.DONE
        states = session.scalars(
            select(Delivery.state).join(Output).where(Output.study_id == studies["2.2"].id)
        ).all()
        assert states == [DeliveryState.FAILED]
    assert "no study 9.9" in result.stdout
    # and cancelling only unknown studies exits 3
    assert cli("cancel", "9.9").exit_code == 3


def test_purge_deletes_only_old_finished_studies(
    env: Path, sessions: sessionmaker[Session]
) -> None:
    # given old done and failed studies, an old study still delivering, an old done study whose
    # SR is still pending, and a recent done study
    old_done = add_study(sessions, env, "3.1", at=OLD)
    old_failed = add_study(sessions, env, "3.2", status=StudyStatus.FAILED, at=OLD)
    delivering = add_study(
        sessions, env, "3.3", status=StudyStatus.DELIVERING, at=OLD, delivery="pending"
    )
    owes_sr = add_study(sessions, env, "3.4", at=OLD, delivery=DeliveryState.PENDING)
    recent = add_study(sessions, env, "3.5")
    # when a dry run lists what would go
    dry = cli("purge", "--older-than", "30", "--dry-run")
    # then it names the eligible studies and deletes nothing
    assert dry.exit_code == 0, dry.stdout
    assert "3.1" in dry.stdout and "3.2" in dry.stdout and "3.4" not in dry.stdout
    assert all(p.exists() for p in old_done + old_failed)
    # when purging for real
    result = cli("purge", "--older-than", "30")
    # then exactly the eligible files are gone, with an event each, rows kept
    assert result.exit_code == 0, result.stdout
    assert not any(p.exists() for p in old_done + old_failed)
    assert not (env / "spool" / "3.1").exists()
    assert all(p.exists() for p in delivering + owes_sr + recent)
    with transaction(sessions) as session:
        details = session.scalars(
            select(Event.detail).join(Study).where(Study.study_uid == "3.1")
        ).all()
        assert any("spool purged: 2 files" in (d or "") for d in details)
        assert session.scalar(select(Study).where(Study.study_uid == "3.1")) is not None
    # and a second purge finds nothing left to do
    assert cli("purge", "--older-than", "30").exit_code == 3


def test_doctor_healthy_embedded_setup(env: Path, sessions: sessionmaker[Session]) -> None:
    # given a migrated worklist, the embedded broker and no destinations
    # when the doctor checks everything, model included
    result = cli("doctor", "--json")
    # then it exits 0: workers and destinations are unknown here, never "failed"
    report = json.loads(result.stdout)
    checks = {c["name"]: c for c in report["checks"]}
    assert result.exit_code == 0, result.stdout
    assert report["ok"] is True
    assert checks["database"]["ok"] is True and "newest revision" in checks["database"]["detail"]
    assert checks["broker"]["ok"] is True
    assert checks["workers"]["ok"] is None and "unknown" in checks["workers"]["detail"]
    assert checks["destinations"]["ok"] is None
    assert checks["disk"]["ok"] is True
    assert checks["model"]["ok"] is True and shipped_model_version() in checks["model"]["detail"]


def test_doctor_fails_on_unreachable_destination(
    env: Path, sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    # given a destination where nothing listens
    monkeypatch.setenv("HRCT_DESTINATIONS", f"PACS@127.0.0.1:{free_port()}")
    get_settings.cache_clear()
    # when the doctor runs
    result = cli("doctor", "--no-model", "--timeout", "2")
    # then that line is FAILED and the exit code is 1
    assert result.exit_code == 1, result.stdout
    line = next(row for row in result.stdout.splitlines() if "destination PACS@" in row)
    assert "FAILED" in line
