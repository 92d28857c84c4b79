"""Studies as scanners send them, end to end: after the first wave of images, what a CT sends
later in the same study re-opens the analysis only when it changes what would be analysed.

DCMTK storescu (and pynetdicom, where the timing of an association matters) is the scanner,
``hrct-triage up`` the gateway (listener, dispatcher and workers as processes), DCMTK storescp
the PACS. Runs on the embedded defaults (SQLite, embedded broker) and on PostgreSQL and Redis.
For each late wave the generation, the objects the PACS holds for the study and the event that
records the decision are checked.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pydicom
import pytest
import redis
from pynetdicom import AE
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from hrct_triage.db.models import Event, Output, Study, StudyStatus
from hrct_triage.db.session import make_engine, make_sessionmaker, transaction
from hrct_triage.phantoms import PhantomStudy, write_phantom_studies
from tests.helpers.databases import PG_ADMIN, REDIS_URL
from tests.helpers.dicom_peers import StoreSCP, storescu
from tests.helpers.ports import free_port, wait_for_port
from tests.helpers_waves import (
    CT_IMAGE_STORAGE,
    changed_version,
    coronal_reformat,
    dose_sr,
    extra_slice,
    series_files,
)

pytestmark = pytest.mark.dcmtk

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"
SETTLED = (StudyStatus.DONE, StudyStatus.FAILED, StudyStatus.NOT_APPLICABLE)
# Thin slices per phantom: the thick (5 mm) series then has a sixth as many; both are analysed.
THIN_SLICES = 24
REDIS_DB = 13  # test_e2e.py uses 11


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory) -> list[PhantomStudy]:
    """Two phantom studies: localizer (CT_01), thin lung series (CT_02), thick series (CT_03)."""
    return write_phantom_studies(
        tmp_path_factory.mktemp("waves"), covid=1, healthy=1, slices=THIN_SLICES, seed=26
    )


@dataclass
class Gateway:
    pacs: StoreSCP
    port: int
    env: dict[str, str]
    sessions: sessionmaker[Session]
    process: subprocess.Popen[bytes]
    log: Path

    def study(self, uid: str) -> Study | None:
        with transaction(self.sessions) as session:
            study = session.scalar(select(Study).where(Study.study_uid == uid))
            if study is not None:
                session.expunge(study)
            return study

    def events(self, uid: str) -> list[str]:
        with transaction(self.sessions) as session:
            return [
                detail or ""
                for detail in session.scalars(
                    select(Event.detail)
                    .join(Study, Study.id == Event.study_id)
                    .where(Study.study_uid == uid)
                    .order_by(Event.id)
                ).all()
            ]

    def send(self, *paths: Path) -> None:
        result = storescu(self.port, *paths)
        assert result.returncode == 0, result.stderr

    def wait(
        self, what: str, condition: Callable[[], bool], timeout: float = 180, every: float = 0.2
    ) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return
            assert self.process.poll() is None, self.log.read_text()[-3000:]
            time.sleep(every)
        raise AssertionError(f"{what} not seen in {timeout} s\n{self.log.read_text()[-3000:]}")

    def settled(self, uid: str, generation: int) -> Study:
        """Wait until the study is settled in ``generation`` (with every output delivered)."""

        def ready() -> bool:
            study = self.study(uid)
            return study is not None and study.status in SETTLED and study.generation == generation

        self.wait(f"study settled in generation {generation}", ready)
        study = self.study(uid)
        assert study is not None
        return study

    def new_event(self, uid: str, seen: int, text: str) -> str:
        """Wait for an event after the first ``seen`` that contains ``text``, with the study
        settled again; the event."""
        found: list[str] = []

        def ready() -> bool:
            study = self.study(uid)
            found[:] = [e for e in self.events(uid)[seen:] if text in e]
            return bool(found) and study is not None and study.status in SETTLED

        self.wait(f"an event saying {text!r}", ready)
        return found[0]

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "hrct_triage", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )


def _start(tmp_path: Path, pacs: StoreSCP, database_url: str | None, broker: str | None) -> Gateway:
    """``hrct-triage up`` with a short quiet period; the thick series is analysable."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("HRCT_")}
    env.update(
        {
            "HRCT_DATA_DIR": str(tmp_path / "var"),
            "HRCT_PORT": str(port),
            "HRCT_QUIET_SECONDS": "1",
            "HRCT_POLL_SECONDS": "0.2",
            "HRCT_DESTINATIONS": pacs.destination,
            "HRCT_MAX_ATTEMPTS": "1",
            "HRCT_HEATMAPS": "2",
            "HRCT_MIN_SLICES": str(THIN_SLICES // 6),
            "HRCT_METRICS_PORT": "0",
        }
    )
    if database_url:
        env["HRCT_DATABASE_URL"] = database_url
    if broker:
        env["HRCT_BROKER_URL"] = broker
    log = tmp_path / "gateway.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "hrct_triage", "up", "--workers", "2"],
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    wait_for_port(port, timeout=60)
    url = database_url or f"sqlite:///{(tmp_path / 'var' / 'worklist.sqlite').resolve()}"
    return Gateway(pacs, port, env, make_sessionmaker(make_engine(url)), process, log)


@contextmanager
def _postgresql_database() -> Iterator[str]:
    """A database of its own for a module's gateway (``postgresql_url`` is per test)."""
    name = f"hrct_waves_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://")
    try:
        yield f"{base}/{name}"
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(
    scope="module",
    params=["embedded", pytest.param("redis+postgresql", marks=pytest.mark.services)],
)
def gateway(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    """One gateway and PACS per backend for this module's tests, each of which sends a study
    of its own: starting the workers takes a good part of a test's time."""
    folder = tmp_path_factory.mktemp(f"gateway-{request.param}")
    with ExitStack() as stack:
        pacs = StoreSCP(folder / "pacs").start()
        stack.callback(pacs.stop)
        database_url = broker = None
        if request.param != "embedded":
            database_url = stack.enter_context(_postgresql_database())
            broker = f"{REDIS_URL}/{REDIS_DB}"
            redis.Redis.from_url(broker).flushdb()
        gw = _start(folder, pacs, database_url, broker)
        stack.callback(gw.sessions.kw["bind"].dispose)
        stack.callback(_stop, gw.process)
        yield gw


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, 9)
        process.wait()


def _pacs_objects(pacs: StoreSCP, study_uid: str) -> dict[str, list[pydicom.Dataset]]:
    """The SRs and SCs the PACS holds for the study."""
    found: dict[str, list[pydicom.Dataset]] = {SR_CLASS: [], SC_CLASS: []}
    for path in pacs.files():
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        if str(ds.StudyInstanceUID) == study_uid and str(ds.SOPClassUID) in found:
            found[str(ds.SOPClassUID)].append(ds)
    return found


def _count(pacs: StoreSCP, study_uid: str) -> tuple[int, int]:
    objects = _pacs_objects(pacs, study_uid)
    return len(objects[SR_CLASS]), len(objects[SC_CLASS])


def _series_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SeriesInstanceUID)


def test_late_waves_reopen_the_analysis_only_when_the_input_changes(
    gateway: Gateway, studies: list[PhantomStudy], tmp_path: Path
) -> None:
    pacs = gateway.pacs
    study = studies[0]
    uid = study.study_uid
    thin, thick = series_files(study.folder, "CT_02"), series_files(study.folder, "CT_03")
    localizer = series_files(study.folder, "CT_01")
    late = tmp_path / "late"

    # given the study's thick soft-tissue series, analysed and delivered (SR + 2 heat maps)
    gateway.send(*thick)
    first = gateway.settled(uid, generation=1)
    assert first.status == StudyStatus.DONE, first.reason
    assert first.analysed_series_uid == _series_uid(thick[0])
    assert _count(pacs, uid) == (1, 2)

    unchanged = [
        ("dose SR", [dose_sr(thick[0], late)], "X-Ray Radiation Dose SR Storage"),
        ("coronal reformat", coronal_reformat(thin, late / "mpr"), "'CHEST COR MPR'"),
        ("localizer", localizer, "series 1 'Topogram"),
    ]
    for what, files, arrived in unchanged:
        # when the scanner sends it later
        seen = len(gateway.events(uid))
        gateway.send(*files)
        # then an event says what arrived and that it changed nothing
        event = gateway.new_event(uid, seen, "not analysed again")
        assert event.startswith("late wave: ") and arrived in event, (what, event)
        assert "series selection still chooses series 3 'CHEST 5.0 STANDARD'" in event, event
        # and the study keeps its verdict, generation and outputs
        after = gateway.study(uid)
        assert after is not None
        assert (after.status, after.generation) == (StudyStatus.DONE, 1), what
        assert after.probability == first.probability and after.delivered_at == first.delivered_at
        assert _count(pacs, uid) == (1, 2), what

    # when the thick series is sent again, unchanged
    seen = len(gateway.events(uid))
    gateway.send(*thick)
    event = gateway.new_event(uid, seen, "sent again unchanged")
    # then the association's close notes it, and nothing is re-opened
    assert f"late wave: {len(thick)} instances sent again unchanged" in event, event
    assert [e for e in gateway.events(uid)[seen:] if "re-opened to check" in e] == []
    after = gateway.study(uid)
    assert after is not None and (after.status, after.generation) == (StudyStatus.DONE, 1)
    assert _count(pacs, uid) == (1, 2)

    # when the thin lung series arrives: series selection now chooses it
    seen = len(gateway.events(uid))
    gateway.send(*thin)
    second = gateway.settled(uid, generation=2)
    event = gateway.new_event(uid, seen, "analysed again as generation 2")
    assert f"{len(thin)} new instances in series 2 'CHEST 1.0 LUNG'" in event, event
    assert "now chooses series 2 'CHEST 1.0 LUNG'" in event, event
    assert "instead of series 3 'CHEST 5.0 STANDARD'" in event, event
    # then one new SR and new SCs, the SR naming its predecessor, exactly once
    assert second.status == StudyStatus.DONE and second.analysed_series_uid == _series_uid(thin[0])
    assert _count(pacs, uid) == (2, 4)
    _assert_supersedes(gateway, pacs, uid, generation=2)

    # when a slice of the analysed series arrives late, then when one arrives changed
    for generation, file, arrived in (
        (3, extra_slice(thin, late), "1 new instance in series 2"),
        (4, changed_version(thin[len(thin) // 2], late), "1 changed instance in series 2"),
    ):
        seen = len(gateway.events(uid))
        gateway.send(file)
        again = gateway.settled(uid, generation=generation)
        event = gateway.new_event(uid, seen, f"analysed again as generation {generation}")
        assert arrived in event and "has new or changed instances" in event, event
        assert again.status == StudyStatus.DONE
        assert _count(pacs, uid) == (generation, 2 * generation)
        _assert_supersedes(gateway, pacs, uid, generation=generation)

    # and `show` lists every late object's series and every decision
    shown = gateway.cli("show", uid, "--json")
    assert shown.returncode == 0, shown.stderr
    detail = json.loads(shown.stdout)
    by_number = {s["series_number"]: s for s in detail["series"]}
    assert by_number[997]["modality"] == "SR" and by_number[997]["instances"] == 1
    assert by_number[997]["last_received_at"] > by_number[3]["last_received_at"]
    assert by_number[301]["instances"] == 24 and by_number[1]["instances"] == len(localizer)
    assert by_number[2]["analysed"] and by_number[2]["instances"] == len(thin) + 1
    for e in detail["events"]:
        print(e["at"][11:23], e["from"], "->", e["to"], e["detail"])
    decisions = [
        e["detail"] for e in detail["events"] if (e["detail"] or "").startswith("late wave")
    ]
    assert len(decisions) == 7, decisions


def _assert_supersedes(gateway: Gateway, pacs: StoreSCP, uid: str, *, generation: int) -> None:
    """The SR of ``generation`` is at the PACS once and names the SR of the one before."""
    with transaction(gateway.sessions) as session:
        srs = {
            output.generation: output.sop_instance_uid
            for output in session.scalars(
                select(Output)
                .join(Study, Study.id == Output.study_id)
                .where(Study.study_uid == uid, Output.kind == "sr")
            ).all()
        }
    at_pacs = {str(ds.SOPInstanceUID): ds for ds in _pacs_objects(pacs, uid)[SR_CLASS]}
    (predecessor,) = at_pacs[srs[generation]].PredecessorDocumentsSequence
    named = predecessor.ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert named.ReferencedSOPInstanceUID == srs[generation - 1]


def test_thin_series_arriving_during_the_first_analysis_is_analysed_once(
    gateway: Gateway, studies: list[PhantomStudy]
) -> None:
    pacs = gateway.pacs
    study = studies[1]
    uid = study.study_uid
    thin, thick = series_files(study.folder, "CT_02"), series_files(study.folder, "CT_03")
    # given the thick series sent, complete, and its first analysis running
    gateway.send(*thick)

    def analysing() -> bool:
        found = gateway.study(uid)
        return found is not None and found.status == StudyStatus.PROCESSING

    gateway.wait("the first analysis", analysing, every=0.01)
    # when the scanner sends the thin series while it runs (one association, left open a
    # moment after the first slice, as a scanner's reconstruction job does)
    ae = AE(ae_title="CT_SCANNER")
    ae.add_requested_context(CT_IMAGE_STORAGE, "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", gateway.port, ae_title="HRCT_TRIAGE")
    assert assoc.is_established
    try:
        for path in thin:
            status = assoc.send_c_store(pydicom.dcmread(path))
            assert status.Status == 0x0000
    finally:
        assoc.release()
    # then the study is analysed once, on the thin series: one SR and its heat maps
    final = gateway.settled(uid, generation=2)
    assert final.status == StudyStatus.DONE, final.reason
    assert final.analysed_series_uid == _series_uid(thin[0])
    assert _count(pacs, uid) == (1, 2)
    (sr,) = _pacs_objects(pacs, uid)[SR_CLASS]
    assert "PredecessorDocumentsSequence" not in sr
    # and an event says the thick series' result was not recorded, and why
    print("\n".join(gateway.events(uid)))
    (event,) = [e for e in gateway.events(uid) if e.startswith("during the analysis:")]
    assert "series 2 'CHEST 1.0 LUNG'" in event and "its result is not recorded" in event, event
