"""Every refused C-STORE leaves a row in ``refusals``, whether or not its UIDs could be read, over
real associations (DCMTK storescu and pynetdicom as the scanner) on SQLite and PostgreSQL; the
rows hold valid UIDs only, never a patient's name or ID; ``stats`` and the web worklist show them
per scanner; a database outage delays the row without changing what the scanner is answered.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pydicom
import pytest
import uvicorn
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.filewriter import dcmwrite
from pydicom.uid import SecondaryCaptureImageStorage
from pynetdicom import AE, _config
from pynetdicom.association import Association as ClientAssociation
from sqlalchemy import bindparam, make_url, select, text
from sqlalchemy.orm import Session, sessionmaker

from hrct_triage.db import worklist
from hrct_triage.db.migrate import alembic_config, upgrade
from hrct_triage.db.models import Association, Base, Refusal, UTCDateTime
from hrct_triage.db.refusal_summary import refusals_by_scanner
from hrct_triage.db.session import make_engine, make_sessionmaker, transaction
from hrct_triage.listener.scp import Listener
from hrct_triage.web.app import create_app
from tests.helpers.databases import PG_ADMIN
from tests.helpers.dicom_peers import storescu
from tests.helpers.listeners import listener_settings, thin_series, wait_until_no_open_association
from tests.helpers.ports import free_port, wait_for_port

MAX_INSTANCE_BYTES = 2_000_000  # a 512x512 CT slice (~0.5 MB) fits, a 3 MB private element not
PATIENT_NAME = "SECRETNAME^JANE"
PATIENT_ID = "PID-0451-SECRET"
# pydicom's own test files that lack a StudyInstanceUID (JPEG-LS Secondary Captures).
CORPUS_WITHOUT_STUDY_UID = (
    "JPEGLSNearLossless_08.dcm",
    "JPEGLSNearLossless_16.dcm",
    "SC_rgb_jls_lossy_line.dcm",
    "SC_rgb_jls_lossy_sample.dcm",
)
TOKEN = "refusal-test-token-0123456789"


@pytest.fixture
def audited_listener(
    tmp_path: Path, database_url: str, sessions: sessionmaker[Session]
) -> Iterator[Listener]:
    settings = listener_settings(
        tmp_path / "var", database_url, max_instance_bytes=MAX_INSTANCE_BYTES
    )
    scp = Listener(settings, sessions, run_dispatcher=False)
    scp.start()
    yield scp
    scp.stop()


def _refusals(sessions: sessionmaker[Session]) -> list[Refusal]:
    with transaction(sessions) as session:
        rows = list(session.scalars(select(Refusal).order_by(Refusal.id)))
        session.expunge_all()
    return rows


def _association(sessions: sessionmaker[Session], calling_ae: str) -> Association:
    with transaction(sessions) as session:
        row = session.scalars(select(Association).where(Association.calling_ae == calling_ae)).one()
        session.expunge(row)
    return row


def _corpus(folder: Path) -> list[Path]:
    """The corpus files, copied (their names are what storescu's ``+sp *.dcm`` matches)."""
    folder.mkdir(parents=True)
    copies = []
    for name in CORPUS_WITHOUT_STUDY_UID:
        source = Path(get_testdata_file(name))  # type: ignore[arg-type]
        assert "StudyInstanceUID" not in pydicom.dcmread(source, stop_before_pixels=True)
        copies.append(Path(shutil.copy(source, folder / name)))
    return copies


def _send_corpus(port: int, folder: Path) -> None:
    """storescu as scanner CORPUS_SCU, proposing the files' JPEG-LS near-lossless transfer
    syntax and going on after a refused file."""
    result = storescu(port, folder, calling="CORPUS_SCU", extra=("--propose-jls-lossy", "-nh"))
    assert result.returncode == 0, result.stdout + result.stderr


def _raw_file(path: Path, template: Dataset, body: bytes) -> Path:
    """A Part 10 file whose File Meta is valid and whose data set is ``body``, verbatim."""
    meta_only = Dataset()
    meta_only.file_meta = template.file_meta
    buffer = path.with_suffix(".meta")
    dcmwrite(buffer, meta_only, enforce_file_format=True)
    path.write_bytes(buffer.read_bytes() + body)
    return path


def _body(path: Path) -> bytes:
    """The data set bytes of a file, after its File Meta."""
    raw = path.read_bytes()
    return raw[132 + 12 + int.from_bytes(raw[140:144], "little") :]


def _send_file(assoc: ClientAssociation, path: Path, monkeypatch: pytest.MonkeyPatch) -> int:
    """Put the file's bytes on the wire undecoded (the command names its File Meta's UIDs)."""
    with monkeypatch.context() as patch:
        patch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
        return int(assoc.send_c_store(path).Status)


def _with_patient(path: Path) -> Dataset:
    dataset = pydicom.dcmread(path)
    dataset.PatientName = PATIENT_NAME
    dataset.PatientID = PATIENT_ID
    return dataset


def _saved(dataset: Dataset, path: Path) -> Path:
    dataset.save_as(path, enforce_file_format=True)
    return path


def _no_patient_identifiers(rows: list[Refusal]) -> None:
    for row in rows:
        for value in (row.reason, row.study_uid, row.series_uid, row.sop_instance_uid):
            assert PATIENT_NAME.split("^")[0] not in (value or "")
            assert PATIENT_ID not in (value or "")


@pytest.mark.dcmtk
def test_corpus_files_without_a_study_uid_are_refused_and_audited(
    audited_listener: Listener, tmp_path: Path, sessions: sessionmaker[Session]
) -> None:
    # given four files of pydicom's test corpus that have no StudyInstanceUID
    files = _corpus(tmp_path / "corpus")
    sop_uids = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
    # when DCMTK's storescu sends them as a scanner would
    _send_corpus(audited_listener.port, tmp_path / "corpus")
    wait_until_no_open_association(sessions)
    # then each was refused 0xC001 and each has its audit row
    association = _association(sessions, "CORPUS_SCU")
    assert association.statuses == {"0xC001": 4}
    rows = _refusals(sessions)
    assert len(rows) == 4
    assert {row.sop_instance_uid for row in rows} == sop_uids
    for row in rows:
        assert (row.status, row.kind, row.transient) == (0xC001, "invalid_uid", False)
        assert row.reason == "StudyInstanceUID is missing"
        assert (row.study_uid, row.series_uid) == (None, None)
        assert (row.association_id, row.calling_ae, row.peer_address) == (
            association.id,
            "CORPUS_SCU",
            "127.0.0.1",
        )
    # and nothing of them reached the spool
    assert not [p for p in audited_listener.settings.spool_dir.rglob("*") if p.is_file()]


def test_refusals_before_identification_keep_what_could_be_read(
    audited_listener: Listener,
    phantom_dir: Path,
    tmp_path: Path,
    sessions: sessionmaker[Session],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # given CT slices carrying a patient's name and ID, broken in each way a scanner or an
    # attacker can break them
    files = thin_series(phantom_dir)[:8]
    bad = tmp_path / "bad"
    bad.mkdir()
    good = _with_patient(files[0])

    escape = f"escape-{uuid.uuid4().hex[:8]}"
    traversal_study = _with_patient(files[1])
    traversal_study.StudyInstanceUID = f"../../../../{escape}"

    traversal_sop = _with_patient(files[2])  # its File Meta (the command) names a valid UID
    traversal_sop.SOPInstanceUID = f"../{escape}"
    sop_file = _saved(traversal_sop, bad / "sop.dcm")
    traversal_sop_file = _raw_file(bad / "sop_raw.dcm", _with_patient(files[2]), _body(sop_file))

    huge = _with_patient(files[3])  # its 3 MB come after the UIDs, in group 0029
    block = huge.private_block(0x0029, "HRCT TEST", create=True)
    block.add_new(0x01, "OB", b"\0" * 3_000_000)

    whole = _saved(_with_patient(files[4]), bad / "whole.dcm")
    truncated = _raw_file(bad / "cut.dcm", _with_patient(files[4]), _body(whole)[:-1000])
    noise = _raw_file(bad / "noise.dcm", _with_patient(files[5]), os.urandom(40_000))

    wrong_class = _with_patient(files[6])
    wrong_class.SOPClassUID = SecondaryCaptureImageStorage
    mismatched = _raw_file(
        bad / "mismatch.dcm", _with_patient(files[6]), _body(_saved(wrong_class, bad / "w.dcm"))
    )

    ae = AE(ae_title="CT_SCANNER")
    ae.add_requested_context(good.SOPClassUID, good.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", audited_listener.port, ae_title="HRCT_TRIAGE")
    assert assoc.is_established

    # when they are sent in one association, around a good one
    statuses = {
        "good": int(assoc.send_c_store(good).Status),
        "traversal_study": int(assoc.send_c_store(traversal_study).Status),
        "traversal_sop": _send_file(assoc, traversal_sop_file, monkeypatch),
        "huge": int(assoc.send_c_store(huge).Status),
        "truncated": _send_file(assoc, truncated, monkeypatch),
        "noise": _send_file(assoc, noise, monkeypatch),
        "mismatched": _send_file(assoc, mismatched, monkeypatch),
    }
    assoc.release()
    wait_until_no_open_association(sessions)

    # then the answers are the listener's usual ones
    assert statuses == {
        "good": 0x0000,
        "traversal_study": 0xC001,
        "traversal_sop": 0xC001,
        "huge": 0xA700,
        "truncated": 0xC000,
        "noise": 0xC000,
        "mismatched": 0xA900,
    }
    # and every refusal has a row, with the association, the scanner and the valid UIDs only
    association = _association(sessions, "CT_SCANNER")
    rows = _refusals(sessions)
    assert len(rows) == 6
    for row in rows:
        assert (row.association_id, row.calling_ae, row.peer_address) == (
            association.id,
            "CT_SCANNER",
            "127.0.0.1",
        )
        assert row.transient is False
    found = {(row.status, row.kind): row for row in rows}
    # a path-traversal Study UID: named in the reason only, the other UIDs kept
    study_row = next(r for r in rows if r.reason.startswith("StudyInstanceUID"))
    assert (study_row.status, study_row.kind) == (0xC001, "invalid_uid")
    assert escape in study_row.reason and "is not a valid UID" in study_row.reason
    assert study_row.study_uid is None
    assert study_row.series_uid == str(traversal_study.SeriesInstanceUID)
    assert study_row.sop_instance_uid == str(traversal_study.SOPInstanceUID)
    # a path-traversal SOP Instance UID in the data set: the request's valid one is kept
    sop_row = next(r for r in rows if r.reason.startswith("SOPInstanceUID"))
    assert escape in sop_row.reason
    assert sop_row.sop_instance_uid == str(pydicom.dcmread(files[2]).SOPInstanceUID)
    assert sop_row.study_uid == str(traversal_sop.StudyInstanceUID)
    # over HRCT_MAX_INSTANCE_BYTES: identified from the part that was kept
    too_large = found[(0xA700, "too_large")]
    assert "HRCT_MAX_INSTANCE_BYTES" in too_large.reason
    assert (too_large.study_uid, too_large.series_uid, too_large.sop_instance_uid) == (
        str(huge.StudyInstanceUID),
        str(huge.SeriesInstanceUID),
        str(huge.SOPInstanceUID),
    )
    # malformed: a cut data set names itself, noise only by its request
    malformed = {row.sop_instance_uid: row for row in rows if row.kind == "malformed"}
    cut_uid, noise_uid = (str(pydicom.dcmread(files[i]).SOPInstanceUID) for i in (4, 5))
    assert set(malformed) == {cut_uid, noise_uid}
    assert malformed[cut_uid].study_uid == str(pydicom.dcmread(files[4]).StudyInstanceUID)
    assert (malformed[noise_uid].study_uid, malformed[noise_uid].series_uid) == (None, None)
    assert all(row.status == 0xC000 for row in malformed.values())
    # a data set that is not what its presentation context says
    assert found[(0xA900, "sop_class_mismatch")].sop_instance_uid == str(wrong_class.SOPInstanceUID)
    # and no reason or UID column carries the patient's name or ID
    _no_patient_identifiers(rows)
    # and nothing was written outside the spool, nor anything refused inside it
    assert not list(tmp_path.rglob(f"*{escape}*"))
    assert not Path("/", escape).exists()
    spooled = [p for p in audited_listener.settings.spool_dir.rglob("*") if p.is_file()]
    assert len(spooled) == 1 and spooled[0].name.startswith(f"{good.SOPInstanceUID}.")


def test_a_fault_of_ours_is_answered_as_before_and_audited(
    audited_listener: Listener,
    phantom_dir: Path,
    sessions: sessionmaker[Session],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # given a listener whose header reader has a bug
    from hrct_triage.listener import handlers

    def broken(data: object, transfer_syntax: str) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(handlers, "read_header", broken)
    dataset = _with_patient(thin_series(phantom_dir)[0])
    ae = AE(ae_title="CT_SCANNER")
    ae.add_requested_context(dataset.SOPClassUID, dataset.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", audited_listener.port, ae_title="HRCT_TRIAGE")
    # when a scanner sends an instance
    status = int(assoc.send_c_store(dataset).Status)
    assoc.release()
    wait_until_no_open_association(sessions)
    # then it gets the processing failure pynetdicom would answer, and the audit has it
    assert status == 0xC211
    (row,) = _refusals(sessions)
    assert (row.status, row.kind, row.reason) == (
        0xC211,
        "internal_error",
        "internal error (RuntimeError)",
    )
    assert row.study_uid == str(dataset.StudyInstanceUID)
    assert row.calling_ae == "CT_SCANNER"


def _cut_off(database_url: str) -> None:
    """Make the test's PostgreSQL database refuse connections, and drop the open ones."""
    name = make_url(database_url).database
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid()",
            (name,),
        )


def _reconnect(database_url: str) -> None:
    name = make_url(database_url).database
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')


@pytest.mark.services
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_a_refusal_during_a_database_outage_is_written_when_it_answers_again(
    audited_listener: Listener,
    phantom_dir: Path,
    database_url: str,
    sessions: sessionmaker[Session],
) -> None:
    # given an association opened while the worklist answered
    first, second = (_with_patient(p) for p in thin_series(phantom_dir)[:2])
    del first.StudyInstanceUID
    ae = AE(ae_title="CT_SCANNER")
    ae.add_requested_context(first.SOPClassUID, first.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", audited_listener.port, ae_title="HRCT_TRIAGE")
    assert assoc.is_established
    # when the database becomes unreachable and the scanner sends a bad and a good instance
    _cut_off(database_url)
    try:
        statuses = [int(assoc.send_c_store(ds).Status) for ds in (first, second)]
        assoc.release()
        time.sleep(1.0)
        assert audited_listener.state.backlog  # still waiting for the database
    finally:
        _reconnect(database_url)
    # then the answers are those the listener gives anyway: the bad one 0xC001, the good one
    # refused as out of resources so that the scanner keeps it
    assert statuses == [0xC001, 0xA700]
    # and once the database answers again, both refusals and the close are written, in order
    deadline = time.monotonic() + 30
    while len(audited_listener.state.backlog) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(audited_listener.state.backlog) == 0
    wait_until_no_open_association(sessions)
    missing, database = _refusals(sessions)
    association = _association(sessions, "CT_SCANNER")
    assert (missing.status, missing.kind, missing.transient) == (0xC001, "invalid_uid", False)
    assert missing.study_uid is None and missing.sop_instance_uid == str(first.SOPInstanceUID)
    assert (database.status, database.kind, database.transient) == (0xA700, "database", True)
    assert database.study_uid == str(second.StudyInstanceUID)
    assert missing.association_id == database.association_id == association.id
    assert association.statuses == {"0xC001": 1, "0xA700": 1}
    _no_patient_identifiers([missing, database])


# --- what an administrator sees -------------------------------------------------------------


T0 = datetime(2026, 3, 2, 8, 0, tzinfo=UTC)


def _fill_refusals(sessions: sessionmaker[Session], now: datetime) -> None:
    """Two scanners' refusals: CT_EAST's through its association row only (rows written before
    the scanner was kept on the refusal itself), CT_WEST's on the row; one of no known scanner."""
    with transaction(sessions) as session:
        east = worklist.open_association(
            session,
            calling_ae="CT_EAST",
            called_ae="HRCT_TRIAGE",
            peer_address="10.0.0.7",
            peer_port=4000,
            now=now,
        )
        for minutes, reason in (
            (50, "StudyInstanceUID is missing"),
            (40, "SeriesInstanceUID is missing"),
        ):
            worklist.record_refusal(
                session,
                association_id=east,
                study_uid=None,
                sop_instance_uid="1.2.3.4",
                status=0xC001,
                kind="invalid_uid",
                transient=False,
                reason=reason,
                now=now - timedelta(minutes=minutes),
            )
        worklist.record_refusal(
            session,
            association_id=east,
            study_uid="1.2.3",
            sop_instance_uid="1.2.3.5",
            status=0xA700,
            kind="disk_full",
            transient=True,
            reason="spool has 10 bytes free",
            now=now - timedelta(minutes=30),
        )
        worklist.record_refusal(
            session,
            association_id=None,
            calling_ae="CT_WEST",
            peer_address="10.0.0.9",
            study_uid=None,
            sop_instance_uid=None,
            status=0xC000,
            kind="malformed",
            transient=False,
            reason="not a whole DICOM data set: <b>data ends inside an element header</b>",
            now=now - timedelta(minutes=20),
        )
        worklist.record_refusal(
            session,
            association_id=None,
            study_uid=None,
            sop_instance_uid=None,
            status=0xC000,
            kind="malformed",
            transient=False,
            reason="not a whole DICOM data set",
            now=now - timedelta(days=30),
        )


def test_refusals_are_counted_per_scanner(
    database_url: str, sessions: sessionmaker[Session]
) -> None:
    # given refusals of two scanners and one whose scanner is unknown
    _fill_refusals(sessions, T0)
    # when they are summed up, all of them and those of the last day
    with transaction(sessions) as session:
        every = {s.scanner: s for s in refusals_by_scanner(session)}
        recent = [s.scanner for s in refusals_by_scanner(session, since=T0 - timedelta(days=1))]
    # then each scanner has its counts by status and kind and its latest reason, most first
    assert list(every) == ["CT_EAST", "(unknown)", "CT_WEST"]
    east = every["CT_EAST"]
    assert (east.refusals, east.transient) == (3, 1)
    assert east.statuses == {"0xC001": 2, "0xA700": 1}
    assert east.kinds == {"invalid_uid": 2, "disk_full": 1}
    assert east.last_at == T0 - timedelta(minutes=30)
    assert (east.last_reason, east.last_peer_address) == ("spool has 10 bytes free", "10.0.0.7")
    assert every["CT_WEST"].last_peer_address == "10.0.0.9"
    assert recent == ["CT_EAST", "CT_WEST"]


def _cli(database_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HRCT_")}
    env["HRCT_DATABASE_URL"] = database_url
    return subprocess.run(
        [sys.executable, "-m", "hrct_triage", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.dcmtk
def test_stats_shows_refusals_per_scanner(
    audited_listener: Listener, tmp_path: Path, database_url: str, sessions: sessionmaker[Session]
) -> None:
    # given a scanner whose four instances were refused for want of a Study UID
    _corpus(tmp_path / "corpus")
    _send_corpus(audited_listener.port, tmp_path / "corpus")
    wait_until_no_open_association(sessions)
    # when an administrator asks for the statistics, as JSON and as tables
    as_json = _cli(database_url, "stats", "--json")
    tables = _cli(database_url, "stats")
    # then both say which scanner had how many refused, with which status, and why
    assert as_json.returncode == 0, as_json.stderr
    (scanner,) = json.loads(as_json.stdout)["refusals_by_scanner"]
    assert scanner["scanner"] == "CORPUS_SCU" and scanner["refusals"] == 4
    assert scanner["statuses"] == {"0xC001": 4} and scanner["kinds"] == {"invalid_uid": 4}
    assert scanner["last_reason"] == "StudyInstanceUID is missing"
    assert scanner["last_peer_address"] == "127.0.0.1"
    assert tables.returncode == 0, tables.stderr
    assert "Refused instances by scanner (4)" in tables.stdout
    line = next(line for line in tables.stdout.splitlines() if "CORPUS_SCU" in line)
    assert "0xC001: 4" in line and "invalid_uid: 4" in line
    assert "StudyInstanceUID is missing" in tables.stdout


@contextmanager
def _served(sessions: sessionmaker[Session], now: datetime) -> Iterator[str]:
    """The web app on a free port; its base URL."""
    port = free_port()
    app = create_app(sessions, token=TOKEN, clock=lambda: now)
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for_port(port)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def _get(url: str) -> tuple[int, str]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return response.status, response.read().decode()


def test_web_worklist_shows_refusals_per_scanner(
    database_url: str, sessions: sessionmaker[Session]
) -> None:
    # given refusals of two scanners within the week, and an old one
    now = datetime.now(UTC)
    _fill_refusals(sessions, now)
    # when an administrator opens the worklist page and the API
    with _served(sessions, now) as base:
        page_status, html = _get(f"{base}/")
        api_status, api = _get(f"{base}/api/refusals")
    # then the page has a row per scanner with its counts, statuses and latest reason (escaped)
    assert page_status == 200
    assert 'data-scanner="CT_EAST"' in html and 'data-scanner="CT_WEST"' in html
    assert 'data-scanner="(unknown)"' not in html  # its only refusal is a month old
    east = html[html.index('data-scanner="CT_EAST"') : html.index('data-scanner="CT_WEST"')]
    assert "<code>0xA700</code> 1" in east and "<code>0xC001</code> 2" in east
    assert "invalid uid 2" in east and "spool has 10 bytes free" in east
    assert "&lt;b&gt;data ends inside an element header&lt;/b&gt;" in html
    # and the API gives the same per scanner
    assert api_status == 200
    assert [s["scanner"] for s in json.loads(api)["by_scanner"]] == ["CT_EAST", "CT_WEST"]


def test_web_worklist_says_when_nothing_was_refused(sessions: sessionmaker[Session]) -> None:
    with _served(sessions, datetime.now(UTC)) as base:
        _, html = _get(f"{base}/")
    assert "No instance refused in the last 7 days." in html


# --- the migration --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.services)]
)
def test_migration_keeps_old_refusals_and_gives_them_their_scanner(
    request: pytest.FixtureRequest, backend: str
) -> None:
    # given a worklist at the previous revision with a refusal of a known association
    url: str = request.getfixturevalue(f"{backend}_url")
    upgrade(url, "0002")
    engine = make_engine(url)
    with engine.begin() as connection:
        at = bindparam("at", T0, type_=UTCDateTime(timezone=True))
        connection.execute(
            text(
                "INSERT INTO associations (id, calling_ae, called_ae, peer_address, peer_port, "
                "state, started_at, instances, bytes, failures, tls) VALUES "
                "(1, 'CT_OLD', 'HRCT_TRIAGE', '10.1.1.1', 104, 'released', :at, 0, 0, 1, false)"
            ).bindparams(at)
        )
        connection.execute(
            text(
                "INSERT INTO refusals (association_id, study_uid, sop_instance_uid, status, "
                "transient, reason, at) VALUES (1, '1.2.3', '1.2.3.4', 42752, true, 'disk', :at)"
            ).bindparams(at)
        )
    try:
        # when it is upgraded
        upgrade(url)
        # then the row is kept, with its association's scanner, and the schema is the models'
        sessions = make_sessionmaker(engine)
        with transaction(sessions) as session:
            (old,) = session.scalars(select(Refusal)).all()
            assert (old.calling_ae, old.peer_address, old.study_uid) == (
                "CT_OLD",
                "10.1.1.1",
                "1.2.3",
            )
            assert old.kind is None and old.series_uid is None
            worklist.record_refusal(
                session,
                association_id=None,
                study_uid=None,
                sop_instance_uid=None,
                status=0xC000,
                transient=False,
                reason="not a whole DICOM data set",
                now=T0,
            )
        with engine.connect() as connection:
            assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []
        # and a downgrade keeps what the older schema can hold
        command.downgrade(alembic_config(url), "0002")
        with engine.connect() as connection:
            kept = connection.execute(text("SELECT sop_instance_uid FROM refusals")).all()
        assert [row[0] for row in kept] == ["1.2.3.4"]
        upgrade(url)
    finally:
        engine.dispose()
