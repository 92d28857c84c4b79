"""Delivery of the outputs to real peers: DCMTK storescp, Orthanc, and a pynetdicom SCP that
answers with a warning; the worklist on real SQLite (and PostgreSQL where concurrency matters).

Retries are driven the way production drives them: a failed round leaves an outbox row with
``not_before``; the test asks the dispatcher's query whether it is due, then calls the task
function as the worker would. Nothing here waits on a clock.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from datetime import datetime, timedelta
from functools import cache
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pynetdicom import AE, AllStoragePresentationContexts, evt
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from hrct_triage.db import worklist
from hrct_triage.db.models import OutboxRow, Output, StudyStatus
from hrct_triage.db.session import transaction
from hrct_triage.worker.delivery.backoff import DELIVERY_JITTER, delivery_backoff
from hrct_triage.worker.jobs import run_delivery, run_triage
from tests.helpers.deliveries import (
    analysed_study,
    deliveries_of,
    queued_from_files,
    sessions_for,
    settings_for,
    worker_context,
)
from tests.helpers.dicom_peers import Orthanc, StoreSCP, dciodvfy_errors
from tests.helpers.ports import free_port
from tests.helpers.worklist import T0, study_row

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"


# ---------------------------------------------------------------- worklist and worker


def _next_round(sessions: sessionmaker[Session], study_id: int) -> datetime:
    """When the worklist says the next delivery round is due; checks the dispatcher agrees
    (due then, not a moment before)."""
    with transaction(sessions) as session:
        (row,) = session.scalars(
            select(OutboxRow).where(
                OutboxRow.study_id == study_id,
                OutboxRow.task == worklist.DELIVER,
                OutboxRow.done_at.is_(None),
            )
        ).all()
        assert row.not_before is not None
        due_at = row.not_before
        early = worklist.due_publications(
            session, now=due_at - timedelta(milliseconds=1), republish_seconds=120
        )
        due = worklist.due_publications(session, now=due_at, republish_seconds=120)
    assert study_id not in {p.study_id for p in early}
    assert (study_id, worklist.DELIVER) in {(p.study_id, p.task) for p in due}
    return due_at


def _sop_uids(paths: list[Path]) -> list[str]:
    return [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths]


# ---------------------------------------------------------------- peers


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    peer = Orthanc(tmp_path / "orthanc").start()
    yield peer
    peer.stop()


class WarningSCP:
    """A PACS that keeps every object but answers 0xB000, as some do on coercing attributes."""

    def __init__(self) -> None:
        self.received: list[str] = []
        ae = AE(ae_title="WARNPACS")
        for context in AllStoragePresentationContexts:
            if context.abstract_syntax is not None:
                ae.add_supported_context(context.abstract_syntax)
        server = ae.start_server(
            ("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)]
        )
        assert server is not None
        self.server = server
        self.port = int(server.server_address[1])

    def _store(self, event: Any) -> int:
        self.received.append(str(event.request.AffectedSOPInstanceUID))
        return 0xB000  # Warning: coercion of data elements (stored, but changed)

    @property
    def destination(self) -> str:
        return f"WARNPACS@127.0.0.1:{self.port}"


# ---------------------------------------------------------------- the real task path


@pytest.fixture(scope="module")
def phantom_study(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """A small COVID-like phantom (24 thin slices): enough for a real analysis, quick to make."""
    from hrct_triage.phantoms import write_phantom_studies

    out = tmp_path_factory.mktemp("delivery-phantom")
    (study,) = write_phantom_studies(out, covid=1, healthy=0, slices=24, seed=11)
    return sorted(study.folder.rglob("*.dcm"))


@cache
def _model() -> Any:
    from hrct_triage.worker.method.model import load_model

    return load_model(None, allow_untrained=True, device="cpu")


@pytest.mark.dcmtk
def test_analysis_is_delivered_to_storescp_and_orthanc(
    tmp_path: Path, phantom_study: list[Path], pacs: StoreSCP, orthanc: Orthanc
) -> None:
    # given a complete phantom study in the worklist and two PACS, DCMTK and Orthanc
    url = f"sqlite:///{tmp_path / 'worklist.sqlite'}"
    sessions = sessions_for(url)
    study_id = queued_from_files(sessions, phantom_study)
    settings = settings_for(tmp_path, url, destinations=[pacs.destination, orthanc.destination])
    # when a worker runs the triage task
    outcome = run_triage(worker_context(settings, _model), study_id)
    # then the study is done and both PACS hold every output exactly once
    study = study_row(sessions, study_id)
    assert (outcome, study.status) == (StudyStatus.DONE, StudyStatus.DONE), study.reason
    with transaction(sessions) as session:
        outputs = {
            o.sop_instance_uid: o.kind
            for o in session.scalars(select(Output).where(Output.study_id == study_id))
        }
    assert sorted(outputs.values()) == ["sc", "sc", "sr"]
    assert Counter(_sop_uids(pacs.files())) == Counter(list(outputs))
    assert Counter(orthanc.sop_instance_uids()) == Counter(list(outputs))
    (orthanc_study,) = orthanc.get("/studies?expand")
    assert orthanc_study["MainDicomTags"]["StudyInstanceUID"] == study.study_uid
    # and every delivery is recorded as acknowledged with a success status
    assert {(d.state, d.status_code) for d in deliveries_of(sessions, study_id)} == {("sent", 0)}
    # and what the PACS received is valid, the SR readable by DCMTK
    for path in pacs.files():
        assert dciodvfy_errors(path) == [], path
    (sr_path,) = [p for p in pacs.files() if pydicom.dcmread(p).SOPClassUID == SR_CLASS]
    dump = subprocess.run(["dsrdump", str(sr_path)], capture_output=True, text=True, check=False)
    assert dump.returncode == 0 and "Imaging Measurement Report" in dump.stdout


@pytest.mark.dcmtk
def test_not_analysed_sr_is_delivered_and_the_study_stays_not_applicable(
    tmp_path: Path, pacs: StoreSCP
) -> None:
    # given a study with no CT at all, and a site that wants not-analysed SRs
    from hrct_triage.phantoms import write_non_ct_study

    folder = write_non_ct_study(tmp_path / "non_ct", seed=3)
    url = f"sqlite:///{tmp_path / 'worklist.sqlite'}"
    sessions = sessions_for(url)
    study_id = queued_from_files(sessions, sorted(folder.rglob("*.dcm")))
    settings = settings_for(tmp_path, url, destinations=[pacs.destination], not_analysed_sr=True)
    # when a worker runs the triage task
    outcome = run_triage(worker_context(settings, _model), study_id)
    # then the study is not_applicable with its reason, and its SR was delivered
    study = study_row(sessions, study_id)
    assert outcome == study.status == StudyStatus.NOT_APPLICABLE
    assert study.reason and "no axial CT series" in study.reason
    assert study.delivered_at is not None
    assert {d.state for d in deliveries_of(sessions, study_id)} == {"sent"}
    # and the PACS holds one valid SR that says why, with no finding
    (path,) = pacs.files()
    assert dciodvfy_errors(path) == []
    dump = subprocess.run(["dsrdump", str(path)], capture_output=True, text=True, check=False)
    assert dump.returncode == 0
    assert "Not analysed for COVID-19" in dump.stdout and "Measurement Group" not in dump.stdout


def test_not_applicable_study_gets_no_sr_unless_asked(tmp_path: Path) -> None:
    # given the default settings (no not-analysed SR) and a study with no CT
    from hrct_triage.phantoms import write_non_ct_study

    folder = write_non_ct_study(tmp_path / "non_ct", seed=3)
    url = f"sqlite:///{tmp_path / 'worklist.sqlite'}"
    sessions = sessions_for(url)
    study_id = queued_from_files(sessions, sorted(folder.rglob("*.dcm")))
    settings = settings_for(tmp_path, url, destinations=["PACS@127.0.0.1:9"])
    # when it is triaged / then it ends not_applicable with nothing to deliver
    assert run_triage(worker_context(settings, _model), study_id) == StudyStatus.NOT_APPLICABLE
    assert deliveries_of(sessions, study_id) == []


# ---------------------------------------------------------------- retries


@pytest.mark.dcmtk
def test_refusing_destination_receives_everything_once_it_is_back(
    tmp_path: Path, database_url: str
) -> None:
    # given a study owed to a PACS that is not running (connection refused)
    sessions = sessions_for(database_url)
    down = StoreSCP(tmp_path / "pacs")
    study_id, records = analysed_study(sessions, tmp_path / "out", [down.destination])
    uids = [r.sop_instance_uid for r in records]
    settings = settings_for(tmp_path, database_url)
    # when a worker delivers
    assert run_delivery(worker_context(settings), study_id) == StudyStatus.DELIVERING
    # then the study waits in delivering, each attempt recorded, the next round in the worklist
    assert {(d.state, d.attempts) for d in deliveries_of(sessions, study_id)} == {("pending", 1)}
    assert all("not established" in (d.error or "") for d in deliveries_of(sessions, study_id))
    _next_round(sessions, study_id)
    # when the PACS starts and a freshly started worker runs the due round
    down.start()
    try:
        assert run_delivery(worker_context(settings), study_id) == StudyStatus.DONE
        # and the round is handed out once more (a broker redelivery)
        assert run_delivery(worker_context(settings), study_id) == "ignored"
    finally:
        down.stop()
    # then the PACS holds every output exactly once and the study is done
    assert Counter(_sop_uids(down.files())) == Counter(uids)
    assert study_row(sessions, study_id).status == StudyStatus.DONE
    assert {(d.state, d.attempts) for d in deliveries_of(sessions, study_id)} == {("sent", 2)}


@pytest.mark.dcmtk
def test_destination_down_for_good_fails_with_reason_and_resend_delivers(
    tmp_path: Path, sqlite_url: str
) -> None:
    # given a study owed to a PACS that never answers, two attempts allowed
    sessions = sessions_for(sqlite_url)
    down = StoreSCP(tmp_path / "pacs")
    study_id, records = analysed_study(sessions, tmp_path / "out", [down.destination])
    uids = [r.sop_instance_uid for r in records]
    settings = settings_for(tmp_path, sqlite_url, delivery_attempts=2)
    # when both rounds fail
    assert run_delivery(worker_context(settings), study_id) == StudyStatus.DELIVERING
    _next_round(sessions, study_id)
    assert run_delivery(worker_context(settings), study_id) == StudyStatus.FAILED
    # then the study is failed with a reason naming the destination, and no round is owed
    study = study_row(sessions, study_id)
    assert study.status == StudyStatus.FAILED
    assert study.reason and down.destination in study.reason and "2 attempts" in study.reason
    assert {d.state for d in deliveries_of(sessions, study_id)} == {"failed"}
    with transaction(sessions) as session:
        assert (
            worklist.due_publications(session, now=T0 + timedelta(days=9), republish_seconds=1)
            == []
        )
    # when the PACS is back and the operator resends
    down.start()
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("HRCT_")}
        env.update({"HRCT_DATABASE_URL": sqlite_url, "HRCT_DATA_DIR": str(tmp_path / "var")})
        resent = subprocess.run(
            [sys.executable, "-m", "hrct_triage", "resend", study.study_uid],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert resent.returncode == 0, resent.stderr
        assert study_row(sessions, study_id).status == StudyStatus.DELIVERING
        assert run_delivery(worker_context(settings), study_id) == StudyStatus.DONE
    finally:
        down.stop()
    # then the PACS holds every output once and the study is done, its reason cleared
    assert Counter(_sop_uids(down.files())) == Counter(uids)
    assert study_row(sessions, study_id).reason is None


def test_warning_status_counts_as_delivered_and_is_recorded(
    tmp_path: Path, sqlite_url: str
) -> None:
    # given a PACS that answers every C-STORE with 0xB000
    pacs = WarningSCP()
    try:
        sessions = sessions_for(sqlite_url)
        study_id, records = analysed_study(sessions, tmp_path / "out", [pacs.destination])
        uids = [r.sop_instance_uid for r in records]
        # when the study is delivered
        outcome = run_delivery(worker_context(settings_for(tmp_path, sqlite_url)), study_id)
    finally:
        pacs.server.shutdown()
    # then it is done, each object sent once, with the warning recorded
    assert outcome == StudyStatus.DONE
    assert Counter(pacs.received) == Counter(uids)
    assert {(d.state, d.status_code) for d in deliveries_of(sessions, study_id)} == {
        ("sent", 0xB000)
    }


@pytest.mark.dcmtk
def test_two_workers_delivering_one_study_send_it_once(
    tmp_path: Path, database_url: str, pacs: StoreSCP
) -> None:
    # given a study owed to one PACS, and two workers handed it at the same moment
    sessions = sessions_for(database_url)
    study_id, records = analysed_study(sessions, tmp_path / "out", [pacs.destination])
    uids = [r.sop_instance_uid for r in records]
    settings = settings_for(tmp_path, database_url)
    barrier = threading.Barrier(2)
    outcomes: list[str] = []

    def deliver() -> None:
        context = worker_context(settings)
        barrier.wait()
        outcomes.append(run_delivery(context, study_id))

    # when both deliver
    threads = [threading.Thread(target=deliver) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # then one round sent everything, the other sent nothing
    assert sorted(outcomes) == [StudyStatus.DONE, "ignored"]
    assert Counter(_sop_uids(pacs.files())) == Counter(uids)


def test_delivery_hold_is_exclusive_until_it_lapses(database_url: str, tmp_path: Path) -> None:
    # given a study owed to a destination
    sessions = sessions_for(database_url)
    study_id, _ = analysed_study(sessions, tmp_path / "out", ["PACS@127.0.0.1:9"])
    # when one worker holds its delivery
    with transaction(sessions) as session:
        first = worklist.claim_delivery(session, study_id, worker="a", lease_seconds=60, now=T0)
    with transaction(sessions) as session:
        second = worklist.claim_delivery(session, study_id, worker="b", lease_seconds=60, now=T0)
    with transaction(sessions) as session:
        later = worklist.claim_delivery(
            session, study_id, worker="c", lease_seconds=60, now=T0 + timedelta(seconds=61)
        )
    # then nobody else gets it until the hold lapses (a killed worker)
    assert first is not None and second is None and later is not None


def test_lost_output_file_is_a_failed_attempt_not_a_crash(tmp_path: Path, sqlite_url: str) -> None:
    # given a study whose SR file was deleted from the outputs folder
    sessions = sessions_for(sqlite_url)
    pacs = WarningSCP()
    try:
        study_id, records = analysed_study(sessions, tmp_path / "out", [pacs.destination])
        uids = [r.sop_instance_uid for r in records]
        with transaction(sessions) as session:
            sr = session.scalars(select(Output).where(Output.kind == "sr")).one()
            Path(sr.path).unlink()
        # when it is delivered
        outcome = run_delivery(worker_context(settings_for(tmp_path, sqlite_url)), study_id)
    finally:
        pacs.server.shutdown()
    # then the SCs went, the SR's attempt is recorded with why, and a retry is scheduled
    assert outcome == StudyStatus.DELIVERING
    by_state = {d.state: d for d in deliveries_of(sessions, study_id)}
    assert "cannot read" in (by_state["pending"].error or "")
    assert len(pacs.received) == len(uids) - 1


# ---------------------------------------------------------------- backoff and echo


def test_backoff_doubles_from_the_base_up_to_the_cap_and_jitter_only_shortens() -> None:
    # given a 5 s base and a one-hour cap
    rng = random.Random(1)

    def wait(attempts: int) -> float:
        return delivery_backoff(attempts, base=5, maximum=3600, rng=rng)

    # then the waits double from a few seconds, never pass the cap, and jitter only shortens
    for attempts, nominal in ((1, 5), (2, 10), (5, 80), (10, 2560), (11, 3600), (40, 3600)):
        for _ in range(20):
            assert nominal * (1 - DELIVERY_JITTER) <= wait(attempts) <= nominal
    assert delivery_backoff(0, base=5, maximum=3600) == 0
    # and waits are spread (two studies retrying after one outage do not collide)
    assert len({round(wait(3), 6) for _ in range(10)}) == 10


def _cli(tmp_path: Path, *args: str, **env_values: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HRCT_")}
    env.update({"HRCT_DATA_DIR": str(tmp_path / "var"), **env_values})
    return subprocess.run(
        [sys.executable, "-m", "hrct_triage", *args],
        env={**env, "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.dcmtk
def test_echo_reports_each_destination_and_fails_if_one_is_down(
    tmp_path: Path, pacs: StoreSCP
) -> None:
    # given one PACS that runs and one that does not
    dead = f"GONE@127.0.0.1:{free_port()}"
    # when the operator echoes both, then only the live one
    both = _cli(
        tmp_path,
        "echo",
        "--timeout",
        "5",
        HRCT_DESTINATIONS=f"{pacs.destination},{dead}",
    )
    live = _cli(tmp_path, "echo", HRCT_DESTINATIONS=pacs.destination)
    # then each destination has a row, and the exit code says whether all answered
    assert both.returncode == 1, both.stdout + both.stderr
    assert pacs.destination in both.stdout and dead in both.stdout
    assert "ok" in both.stdout and "FAILED" in both.stdout and "0x0000" in both.stdout
    assert live.returncode == 0, live.stdout + live.stderr
