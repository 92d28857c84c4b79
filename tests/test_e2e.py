"""End to end over real sockets and real processes: DCMTK storescu (the scanner) sends phantom
studies to ``hrct-triage up``; DCMTK storescp is the PACS; dciodvfy checks what arrives.

Runs once on the embedded defaults (SQLite + embedded broker) and once on the machine's Redis
and PostgreSQL.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
import redis
from pydicom.uid import generate_uid
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from hrct_triage.common.settings import Settings
from hrct_triage.common.task_queue import TRIAGE_TASK
from hrct_triage.db.models import Event, Output, Study, StudyStatus
from hrct_triage.db.session import make_engine, make_sessionmaker, transaction
from hrct_triage.listener.dispatch import publisher_app
from tests.helpers.checkpoints import shipped_model_version
from tests.helpers.databases import REDIS_URL
from tests.helpers.dicom_peers import StoreSCP, dciodvfy_errors, storescu
from tests.helpers.ports import free_port, wait_for_port

TERMINAL = (StudyStatus.DONE, StudyStatus.FAILED, StudyStatus.NOT_APPLICABLE)
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"
SHIPPED_VERSION = shipped_model_version()


@dataclass
class Gateway:
    settings: Settings
    env: dict[str, str]
    sessions: sessionmaker[Session]
    process: subprocess.Popen[bytes]
    log: Path

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "hrct_triage", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    def study(self, uid: str) -> Study | None:
        with transaction(self.sessions) as session:
            study = session.scalar(select(Study).where(Study.study_uid == uid))
            if study is not None:
                session.expunge(study)
            return study

    def wait_for(
        self,
        uids: list[str],
        statuses: tuple[str, ...] = TERMINAL,
        timeout: float = 300,
        generation: int = 1,
    ) -> dict[str, Study]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = {uid: self.study(uid) for uid in uids}
            if all(
                s is not None and s.status in statuses and s.generation >= generation
                for s in found.values()
            ):
                return {uid: s for uid, s in found.items() if s is not None}
            assert self.process.poll() is None, self.log.read_text()[-3000:]
            time.sleep(0.5)
        raise AssertionError(
            f"studies not finished in {timeout} s: "
            f"{[(u, s and s.status) for u, s in found.items()]}\n"
            f"{self.log.read_text()[-3000:]}"
        )


def _start_gateway(
    tmp_path: Path,
    pacs: StoreSCP,
    database_url: str | None,
    broker_url: str | None,
    extra_env: dict[str, str] | None = None,
) -> Gateway:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HRCT_")}
    port = free_port()
    env.update(
        {
            "HRCT_DATA_DIR": str(tmp_path / "var"),
            "HRCT_PORT": str(port),
            "HRCT_QUIET_SECONDS": "2",
            "HRCT_POLL_SECONDS": "0.5",
            "HRCT_DESTINATIONS": pacs.destination,
            "HRCT_MAX_ATTEMPTS": "1",
            "HRCT_HEATMAPS": "2",
            "HRCT_METRICS_PORT": "0",
        }
    )
    env.update(extra_env or {})
    if database_url:
        env["HRCT_DATABASE_URL"] = database_url
    if broker_url:
        env["HRCT_BROKER_URL"] = broker_url
    settings = Settings(
        data_dir=tmp_path / "var",
        database_url=database_url,
        broker_url=broker_url,
        port=port,
        _env_file=None,
    )  # type: ignore[call-arg]
    log = tmp_path / "gateway.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "hrct_triage", "up", "--workers", "2"],
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    wait_for_port(port, timeout=60)
    sessions = make_sessionmaker(make_engine(settings.resolved_database_url))
    return Gateway(settings, env, sessions, process, log)


@pytest.fixture(params=["embedded", pytest.param("redis+postgresql", marks=pytest.mark.services)])
def gateway(request: pytest.FixtureRequest, tmp_path: Path, pacs: StoreSCP) -> Iterator[Gateway]:
    if request.param == "embedded":
        gw = _start_gateway(tmp_path, pacs, None, None)
    else:
        database_url = request.getfixturevalue("postgresql_url")
        db_index = 11
        redis.Redis.from_url(f"{REDIS_URL}/{db_index}").flushdb()
        gw = _start_gateway(tmp_path, pacs, database_url, f"{REDIS_URL}/{db_index}")
    yield gw
    _stop_gateway(gw)


def _stop_gateway(gw: Gateway) -> None:
    gw.process.terminate()
    try:
        gw.process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(gw.process.pid, 9)
        gw.process.wait()


def _uid(path: Path, keyword: str = "StudyInstanceUID") -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).get(keyword))


def _corrupt_copy(source: Path, target: Path) -> str:
    """A copy of a study under new UIDs whose thin slices hold truncated pixel data."""
    study_uid = generate_uid()
    series_uids: dict[str, str] = {}
    for path in sorted(source.rglob("*.dcm")):
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uids.setdefault(str(ds.SeriesInstanceUID), generate_uid())
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        if int(ds.get("Rows", 0)) == 512 and "LOCALIZER" not in ds.ImageType:
            ds.PixelData = ds.PixelData[: len(ds.PixelData) // 3]
        out = target / path.relative_to(source)
        out.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(out, enforce_file_format=True)
    return study_uid


def _pacs_objects(pacs: StoreSCP, study_uid: str) -> dict[str, list[Path]]:
    found: dict[str, list[Path]] = {SR_CLASS: [], SC_CLASS: []}
    for path in pacs.files():
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        if str(ds.StudyInstanceUID) == study_uid and str(ds.SOPClassUID) in found:
            found[str(ds.SOPClassUID)].append(path)
    return found


def test_study_travels_from_scanner_to_pacs_and_back(
    gateway: Gateway, phantom_dir: Path, pacs: StoreSCP, tmp_path: Path
) -> None:
    # given a COVID-like phantom (60 thin slices + localizer + soft-tissue series), a study with
    # no CT at all, and a study whose pixel data is truncated
    covid_dir = next((phantom_dir / "studies").glob("covid_*"))
    healthy_dir = next((phantom_dir / "studies").glob("healthy_*"))
    covid_uid = _uid(next(covid_dir.rglob("*.dcm")))
    non_ct_uid = _uid(next((phantom_dir / "non_ct").rglob("*.dcm")))
    broken_uid = _corrupt_copy(healthy_dir, tmp_path / "broken")

    # when a scanner sends them
    for folder in (covid_dir, phantom_dir / "non_ct", tmp_path / "broken"):
        result = storescu(gateway.settings.listener.port, folder)
        assert result.returncode == 0, result.stderr
    studies = gateway.wait_for([covid_uid, non_ct_uid, broken_uid])

    # then the phantom is analysed and its SR and heat maps are in the PACS, in its study
    covid = studies[covid_uid]
    assert covid.status == StudyStatus.DONE, covid.reason
    assert covid.probability is not None and 0.0 <= covid.probability <= 1.0
    assert covid.model_version == SHIPPED_VERSION  # no HRCT_MODEL_PATH: the shipped weights
    received = _pacs_objects(pacs, covid_uid)
    assert len(received[SR_CLASS]) == 1 and len(received[SC_CLASS]) >= 1
    for path in received[SR_CLASS] + received[SC_CLASS]:
        assert dciodvfy_errors(path) == [], path
    assert covid.last_instance_at and covid.delivered_at
    notification = (covid.delivered_at - covid.last_instance_at).total_seconds()
    print(f"time to notification (last instance -> SR acknowledged): {notification:.1f} s")

    # and the bad studies end with a reason, without stopping the gateway
    assert studies[non_ct_uid].status == StudyStatus.NOT_APPLICABLE
    assert "no axial CT series" in (studies[non_ct_uid].reason or "")
    assert studies[broken_uid].status == StudyStatus.FAILED
    assert studies[broken_uid].reason

    # and the worklist CLI reports it with the contract's keys, urgent first
    listing = gateway.cli("worklist", "--json")
    assert listing.returncode == 0, listing.stderr
    rows = {row["study_uid"]: row for row in json.loads(listing.stdout)}
    assert rows[covid_uid]["status"] == "done"
    assert {o["kind"] for o in rows[covid_uid]["outputs"]} == {"sr", "sc"}
    assert all(o["state"] == "sent" for o in rows[covid_uid]["outputs"])

    # when the operator requeues the finished study, and the broker carries duplicates of it
    requeued = gateway.cli("requeue", covid_uid)
    assert requeued.returncode == 0, requeued.stderr
    app = publisher_app(gateway.settings)
    for _ in range(2):
        app.send_task(TRIAGE_TASK, args=[covid.id])
    again = gateway.wait_for([covid_uid], generation=2)[covid_uid]

    # then it is analysed once more (one claim for the new generation) and delivered again as a
    # new SR that names its predecessor
    assert again.status == StudyStatus.DONE and again.generation == 2
    with transaction(gateway.sessions) as session:
        claims = session.scalars(
            select(Event).where(
                Event.study_id == covid.id, Event.to_status == StudyStatus.PROCESSING
            )
        ).all()
        srs = session.scalars(
            select(Output).where(Output.study_id == covid.id, Output.kind == "sr")
        ).all()
    assert len(claims) == 2
    assert sorted(o.generation for o in srs) == [1, 2]
    received = _pacs_objects(pacs, covid_uid)
    assert len(received[SR_CLASS]) == 2
    newest_uid = next(o.sop_instance_uid for o in srs if o.generation == 2)
    by_uid = {_uid(p, "SOPInstanceUID"): p for p in received[SR_CLASS]}
    assert "PredecessorDocumentsSequence" in pydicom.dcmread(by_uid[newest_uid])
    assert dciodvfy_errors(by_uid[newest_uid]) == []
    shutil.rmtree(tmp_path / "broken")
