"""Shadow mode (``HRCT_MODE=shadow``) on the worker's real task path: a real model, the worklist
on SQLite and PostgreSQL, and two real DICOM peers (pynetdicom Storage SCPs) standing for the
clinical PACS and the QA archive. Priority, urgency, metrics, the CLI and the web page on
worklist rows recorded through the named transitions.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from datetime import timedelta
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from pydicom import Dataset
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from typer.testing import CliRunner

from hrct_triage.cli.app import app as cli_app
from hrct_triage.common.settings import get_settings
from hrct_triage.db import queries, worklist
from hrct_triage.db.models import Event, Output, Study, StudyStatus
from hrct_triage.db.priority import is_urgent
from hrct_triage.db.session import transaction
from hrct_triage.listener.worklist_gauges import WorklistCollector
from hrct_triage.web.app import create_app
from hrct_triage.worker.jobs import run_delivery, run_triage
from hrct_triage.worker.outputs import SeriesLabels
from hrct_triage.worklist_table import result_text
from tests.helpers.deliveries import (
    deliveries_of,
    queued_from_files,
    sessions_for,
    settings_for,
    worker_context,
)
from tests.helpers.pacs_peers import PynetdicomPeer
from tests.helpers.web_server import Served
from tests.helpers.worklist import T0, complete, facts, study_row


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    """A COVID-like and a healthy phantom (24 thin slices each) and a study with no CT."""
    from hrct_triage.phantoms import write_non_ct_study, write_phantom_studies

    out = tmp_path_factory.mktemp("shadow-phantoms")
    covid, healthy = write_phantom_studies(out, covid=1, healthy=1, slices=24, seed=11)
    non_ct = write_non_ct_study(out / "non_ct", seed=3)
    return {
        "covid": sorted(covid.folder.rglob("*.dcm")),
        "healthy": sorted(healthy.folder.rglob("*.dcm")),
        "non_ct": sorted(non_ct.rglob("*.dcm")),
    }


@cache
def _model() -> Any:
    from hrct_triage.worker.method.model import load_model

    return load_model(None, allow_untrained=True, device="cpu")


@pytest.fixture
def peers() -> Iterator[tuple[PynetdicomPeer, PynetdicomPeer]]:
    """The clinical PACS and the QA archive, both storing everything they are sent."""
    clinical = PynetdicomPeer(lambda _: 0, ae_title="PACS")
    qa = PynetdicomPeer(lambda _: 0, ae_title="QA")
    yield clinical, qa
    clinical.stop()
    qa.stop()


def _uids(received: list[Dataset]) -> list[str]:
    return sorted(str(ds.SOPInstanceUID) for ds in received)


def _outputs(sessions: sessionmaker[Session], study_id: int, generation: int) -> list[str]:
    with transaction(sessions) as session:
        return sorted(
            session.scalars(
                select(Output.sop_instance_uid).where(
                    Output.study_id == study_id, Output.generation == generation
                )
            )
        )


def _events(sessions: sessionmaker[Session], study_id: int) -> list[str]:
    with transaction(sessions) as session:
        return [
            e.detail or "" for e in session.scalars(select(Event).where(Event.study_id == study_id))
        ]


def test_shadow_results_reach_the_qa_archive_only_even_after_going_live(
    tmp_path: Path,
    database_url: str,
    phantoms: dict[str, list[Path]],
    peers: tuple[PynetdicomPeer, PynetdicomPeer],
) -> None:
    clinical, qa = peers
    sessions = sessions_for(database_url)
    both = {"destinations": [clinical.destination], "shadow_destinations": [qa.destination]}
    shadow = settings_for(tmp_path, database_url, mode="shadow", **both)
    live = settings_for(tmp_path, database_url, mode="live", **both)
    # given a COVID-like study, analysed by a worker in shadow mode
    covid_id = queued_from_files(sessions, phantoms["covid"])
    assert run_triage(worker_context(shadow, _model), covid_id) == StudyStatus.DONE
    # then the result is recorded as a shadow one, owed and delivered to the QA archive only
    study = study_row(sessions, covid_id)
    assert (study.mode, study.positive is not None) == ("shadow", True)
    first = _outputs(sessions, covid_id, 1)
    assert len(first) == 3  # the SR and two heat maps
    assert {d.destination for d in deliveries_of(sessions, covid_id)} == {qa.destination}
    assert clinical.received == [] and _uids(qa.received) == first
    # and what the QA archive got says it is a shadow result, still not for diagnostic use
    for ds in qa.received:
        assert ds.SeriesDescription.startswith("SHADOW ")
        assert "not for diagnostic use" in ds.SeriesDescription
    assert any(
        "shadow mode: 3 outputs to the shadow destinations" in d
        for d in _events(sessions, covid_id)
    )

    # when the worker restarts in live mode and is handed the study's delivery again
    assert run_delivery(worker_context(live), covid_id) == "ignored"
    # and the operator resends it
    with transaction(sessions) as session:
        study_obj = session.get(Study, covid_id)
        assert study_obj is not None
        resent = worklist.resend(session, study_obj, now=T0)
    assert resent == 3
    assert run_delivery(worker_context(live), covid_id) == StudyStatus.DONE
    # then the clinical PACS still has nothing: the resend went where the result was owed
    assert clinical.received == [] and _uids(qa.received) == sorted(first * 2)

    # when the operator requeues it under live mode (a new analysis generation)
    with transaction(sessions) as session:
        study_obj = session.get(Study, covid_id)
        assert study_obj is not None
        assert worklist.requeue(session, study_obj, now=T0, detail="requeued by operator")
    assert run_triage(worker_context(live, _model), covid_id) == StudyStatus.DONE
    # then the study keeps its shadow mode: the new outputs go to the QA archive alone
    assert study_row(sessions, covid_id).mode == "shadow"
    second = _outputs(sessions, covid_id, 2)
    assert set(second).isdisjoint(first)
    assert clinical.received == [] and _uids(qa.received) == sorted(first * 2 + second)

    # when a new study arrives under live mode
    healthy_id = queued_from_files(sessions, phantoms["healthy"])
    assert run_triage(worker_context(live, _model), healthy_id) == StudyStatus.DONE
    # then it goes live: to the clinical PACS only, labelled as configured
    assert study_row(sessions, healthy_id).mode == "live"
    assert _uids(clinical.received) == _outputs(sessions, healthy_id, 1)
    assert _uids(qa.received) == sorted(first * 2 + second)  # nothing new
    assert {d.destination for d in deliveries_of(sessions, healthy_id)} == {clinical.destination}
    assert not any(ds.SeriesDescription.startswith("SHADOW") for ds in clinical.received)


def test_live_study_stays_live_after_switching_to_shadow(
    tmp_path: Path,
    sqlite_url: str,
    phantoms: dict[str, list[Path]],
    peers: tuple[PynetdicomPeer, PynetdicomPeer],
) -> None:
    # given a study analysed live
    clinical, qa = peers
    sessions = sessions_for(sqlite_url)
    both = {"destinations": [clinical.destination], "shadow_destinations": [qa.destination]}
    study_id = queued_from_files(sessions, phantoms["healthy"])
    live = settings_for(tmp_path, sqlite_url, mode="live", **both)
    assert run_triage(worker_context(live, _model), study_id) == StudyStatus.DONE
    # when the site switches to shadow and the study is analysed again (superseding its SR)
    with transaction(sessions) as session:
        study = session.get(Study, study_id)
        assert study is not None
        worklist.requeue(session, study, now=T0, detail="requeued by operator")
    shadow = settings_for(tmp_path, sqlite_url, mode="shadow", **both)
    assert run_triage(worker_context(shadow, _model), study_id) == StudyStatus.DONE
    # then the superseding outputs go where the first went, never to the QA archive alone
    assert study_row(sessions, study_id).mode == "live"
    assert qa.received == []
    assert _uids(clinical.received) == sorted(
        _outputs(sessions, study_id, 1) + _outputs(sessions, study_id, 2)
    )


def test_shadow_mode_without_qa_archive_records_the_result_and_sends_nothing(
    tmp_path: Path,
    database_url: str,
    phantoms: dict[str, list[Path]],
    peers: tuple[PynetdicomPeer, PynetdicomPeer],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # given shadow mode with clinical destinations but no shadow destination, and a site that
    # wants not-analysed SRs
    clinical, _ = peers
    sessions = sessions_for(database_url)
    shadow = settings_for(
        tmp_path,
        database_url,
        mode="shadow",
        destinations=[clinical.destination],
        not_analysed_sr=True,
    )
    covid_id = queued_from_files(sessions, phantoms["covid"])
    non_ct_id = queued_from_files(sessions, phantoms["non_ct"])
    # when both are triaged
    assert run_triage(worker_context(shadow, _model), covid_id) == StudyStatus.DONE
    assert run_triage(worker_context(shadow, _model), non_ct_id) == StudyStatus.NOT_APPLICABLE
    # then the result is kept, done at once, and says why nothing went anywhere
    assert study_row(sessions, covid_id).mode == "shadow"
    assert deliveries_of(sessions, covid_id) == [] and clinical.received == []
    (done,) = [d for d in _events(sessions, covid_id) if "sent nowhere" in d]
    assert "shadow mode: result recorded" in done and "no shadow destinations" in done
    # and the not-applicable study owes its SR to nobody either
    assert study_row(sessions, non_ct_id).mode == "shadow"
    assert deliveries_of(sessions, non_ct_id) == []
    # and `resend` says why it sends nothing, even once HRCT_MODE is live
    monkeypatch.setenv("HRCT_DATABASE_URL", database_url)
    monkeypatch.setenv("HRCT_DESTINATIONS", clinical.destination)
    monkeypatch.setenv("HRCT_MODE", "live")
    get_settings.cache_clear()
    uid = study_row(sessions, covid_id).study_uid
    result = CliRunner().invoke(cli_app, ["resend", uid], catch_exceptions=False)
    get_settings.cache_clear()
    assert result.exit_code == 0, result.output
    assert "nothing to send" in result.output and "never go to HRCT_DESTINATIONS" in result.output
    assert deliveries_of(sessions, covid_id) == [] and clinical.received == []


def test_not_analysed_sr_of_a_shadow_study_goes_to_the_qa_archive(
    tmp_path: Path,
    sqlite_url: str,
    phantoms: dict[str, list[Path]],
    peers: tuple[PynetdicomPeer, PynetdicomPeer],
) -> None:
    # given shadow mode with a QA archive, and a study with no CT
    clinical, qa = peers
    sessions = sessions_for(sqlite_url)
    shadow = settings_for(
        tmp_path,
        sqlite_url,
        mode="shadow",
        destinations=[clinical.destination],
        shadow_destinations=[qa.destination],
        not_analysed_sr=True,
    )
    study_id = queued_from_files(sessions, phantoms["non_ct"])
    # when it is triaged / then its not-analysed SR reaches the QA archive, not the PACS
    assert run_triage(worker_context(shadow, _model), study_id) == StudyStatus.NOT_APPLICABLE
    assert clinical.received == []
    (sr,) = qa.received
    assert sr.SeriesDescription.startswith("SHADOW ")


# ---------------------------------------------------------------- the worklist's order


def _analysed(
    sessions: sessionmaker[Session], uid: str, minutes: int, *, mode: str, positive: bool
) -> int:
    """A study whose instance arrived ``minutes`` after T0, analysed in ``mode`` (no outputs)."""
    at = T0 + timedelta(minutes=minutes)
    with transaction(sessions) as session:
        worklist.record_instance(session, facts(f"{uid}.1", study=uid), association_id=None, now=at)
    (study_id,) = complete(sessions, at + timedelta(seconds=10))
    with transaction(sessions) as session:
        claim = worklist.claim(session, study_id, worker="w", lease_seconds=60, now=at)
        assert claim is not None
        record = worklist.AnalysisRecord(
            0.97 if positive else 0.05, positive, 0.8, "v", f"{uid}.s", [], {}, mode=mode
        )
        assert worklist.finish_analysis(
            session,
            claim,
            analysis=record,
            outputs=[],
            destinations=[],
            now=at + timedelta(seconds=20),
            delivery_grace_seconds=60,
        )
    return study_id


def test_shadow_positive_does_not_jump_above_older_studies(
    sessions: sessionmaker[Session],
) -> None:
    # given an older study still waiting, a newer shadow positive and a live positive
    with transaction(sessions) as session:
        worklist.record_instance(
            session, facts("1.9.1.1", study="1.9.1"), association_id=None, now=T0
        )
    complete(sessions, T0 + timedelta(seconds=10))
    _analysed(sessions, "1.9.2", 5, mode="shadow", positive=True)
    _analysed(sessions, "1.9.3", 6, mode="live", positive=True)
    # then the live positive leads, the shadow positive waits behind the older study
    with transaction(sessions) as session:
        rows = queries.worklist_rows(session)
    assert [r["study_uid"] for r in rows] == ["1.9.3", "1.9.1", "1.9.2"]
    assert [r["mode"] for r in rows] == ["live", None, "shadow"]
    assert rows[1]["priority"] == rows[2]["priority"]
    # and the shadow one reads as such in the terminal table
    assert "(shadow)" in result_text(rows[2]) and "shadow" not in result_text(rows[0])

    # and the delivery of a shadow positive does not go to the urgent queue
    def urgency(mode: str) -> str | None:
        return is_urgent(
            task="deliver",
            calling_ae="CT1",
            positive=True,
            operator_urgent=False,
            urgent_aets=(),
            mode=mode,
        )

    assert (urgency("shadow"), urgency("live")) == (None, "positive result")


def test_metrics_count_shadow_results_apart(sessions: sessionmaker[Session]) -> None:
    # given two shadow results (one positive) and one live negative, all done
    _analysed(sessions, "1.8.1", 1, mode="shadow", positive=True)
    _analysed(sessions, "1.8.2", 2, mode="shadow", positive=False)
    _analysed(sessions, "1.8.3", 3, mode="live", positive=False)
    registry = CollectorRegistry()
    registry.register(WorklistCollector(sessions))

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    # then results are counted by mode, and only the live one has a time to notification
    assert value("hrct_results", mode="shadow", result="positive") == 1
    assert value("hrct_results", mode="shadow", result="negative") == 1
    assert value("hrct_results", mode="live", result="negative") == 1
    assert value("hrct_results", mode="live", result="positive") == 0
    assert value("hrct_time_to_notification_seconds_count") == 1


def test_web_worklist_and_api_say_shadow(sessions: sessionmaker[Session]) -> None:
    # given a shadow positive and a live negative
    _analysed(sessions, "1.7.1", 1, mode="shadow", positive=True)
    _analysed(sessions, "1.7.2", 2, mode="live", positive=False)
    token = "t" * 24
    served = Served(create_app(sessions, token=token))
    try:

        def get(path: str) -> str:
            request = urllib.request.Request(
                f"http://127.0.0.1:{served.port}{path}",
                headers={"Authorization": f"Bearer {token}"},
            )
            with urllib.request.urlopen(request, timeout=10) as response:
                return str(response.read().decode("utf-8"))

        api = {row["study_uid"]: row for row in json.loads(get("/api/worklist"))}
        page = get("/")
        study_page = get("/studies/1.7.1")
    finally:
        served.stop()
    # then the API names the mode and the pages say "shadow" on the shadow result only
    assert (api["1.7.1"]["mode"], api["1.7.2"]["mode"]) == ("shadow", "live")
    assert page.count("POSITIVE (shadow)") == 1 and "negative (shadow)" not in page
    assert "<b>0</b> positive" in page and "<b>1</b> shadow results" in page
    assert "COVID-19 POSITIVE (shadow)" in study_page and "Shadow mode:" in study_page


def test_shadow_labels_keep_not_for_diagnostic_use() -> None:
    labels = SeriesLabels()
    shadow = labels.for_mode("shadow")
    assert shadow.sr_description == f"SHADOW {labels.sr_description}"
    assert shadow.sc_description == f"SHADOW {labels.sc_description}"
    assert labels.for_mode("live") == labels
    # a description with no room for the word stays as configured (a DICOM LO holds 64)
    long = "x" * 38 + " - not for diagnostic use"
    assert SeriesLabels(sr_description=long).for_mode("shadow").sr_description == long


def test_doctor_names_the_mode_and_checks_the_shadow_destinations(
    tmp_path: Path, sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # given shadow mode with a QA archive where nothing listens
    from tests.helpers.ports import free_port

    sessions_for(sqlite_url)
    qa = f"QA@127.0.0.1:{free_port()}"
    for name, value in {
        "HRCT_DATA_DIR": str(tmp_path / "var"),
        "HRCT_DATABASE_URL": sqlite_url,
        "HRCT_MIN_FREE_DISK_BYTES": "1",
        "HRCT_MODE": "shadow",
        "HRCT_SHADOW_DESTINATIONS": qa,
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("HRCT_DESTINATIONS", raising=False)
    monkeypatch.delenv("HRCT_BROKER_URL", raising=False)
    get_settings.cache_clear()
    # when the doctor runs
    result = CliRunner().invoke(
        cli_app, ["doctor", "--no-model", "--timeout", "2", "--json"], catch_exceptions=False
    )
    get_settings.cache_clear()
    # then it says shadow, and the unreachable QA archive fails it
    checks = {c["name"]: c for c in json.loads(result.stdout)["checks"]}
    assert result.exit_code == 1, result.stdout
    assert checks["mode"]["detail"].startswith(f"shadow: results go to {qa}")
    assert checks[f"shadow destination {qa}"]["ok"] is False


def test_a_verdict_from_before_modes_were_recorded_counts_as_live(
    tmp_path: Path, sqlite_url: str
) -> None:
    from hrct_triage.worker.jobs import _mode_of

    # given a study analysed before the mode was recorded (an upgraded worklist), and one not
    # analysed yet
    sessions = sessions_for(sqlite_url)
    old = _analysed(sessions, "1.6.1", 1, mode="live", positive=True)
    with transaction(sessions) as session:
        study = session.get(Study, old)
        assert study is not None
        study.mode = None
        worklist.record_instance(
            session, facts("1.6.2.1", study="1.6.2"), association_id=None, now=T0
        )
    (new,) = complete(sessions, T0 + timedelta(seconds=10))
    # when the site runs in shadow mode / then the old study stays live, the new one is shadow
    context = worker_context(settings_for(tmp_path, sqlite_url, mode="shadow"))
    assert (_mode_of(context, old), _mode_of(context, new)) == ("live", "shadow")
