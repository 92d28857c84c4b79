"""Several listener processes on one port (``HRCT_LISTENER_PROCESSES``) and the group commit of
concurrent C-STOREs' worklist rows: every instance recorded once and stored once however many
associations and processes receive it, audit rows right, and a process that dies never leaves
the others serving beside an unreconciled spool."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE
from sqlalchemy import Connection, event, select
from sqlalchemy.orm import Session, sessionmaker

from hrct_triage.common.errors import ListenerError
from hrct_triage.common.storage import TEMP_SUFFIX
from hrct_triage.db import worklist
from hrct_triage.db.models import Association, Instance
from hrct_triage.db.session import make_engine, transaction
from hrct_triage.db.sqlite_turns import TurnTakingConnection
from hrct_triage.listener import group_commit as commits
from hrct_triage.listener.group_commit import GroupCommit
from hrct_triage.listener.scp import Listener
from tests.helpers.dicom_peers import storescu
from tests.helpers.listeners import (
    listener_settings,
    scrape,
    thin_series,
    wait_until_no_open_association,
)
from tests.helpers.ports import free_port

ASSOCIATIONS = 12


def _two_free_ports() -> int:
    """A port whose next port is free too (the follower's metrics port is the primary's + 1)."""
    for _ in range(50):
        port = free_port()
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise AssertionError("no two free ports in a row")


def _wait_for(condition: object, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise AssertionError(f"{what} did not happen within {timeout} s")


def _open_per_process(metrics_port: int) -> list[float]:
    return [
        scrape(port)[("hrct_associations_open", ())] for port in (metrics_port, metrics_port + 1)
    ]


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status


@pytest.mark.dcmtk
def test_two_processes_share_the_port_and_record_each_instance_once(
    tmp_path: Path, database_url: str, sessions: sessionmaker[Session], phantom_dir: Path
) -> None:
    # given a listener of two processes on one port, each with its own metrics endpoint
    metrics_port = _two_free_ports()
    settings = listener_settings(
        tmp_path / "var", database_url, listener_processes=2, metrics_port=metrics_port
    )
    primary = Listener(settings, sessions, run_dispatcher=False)
    primary.start()
    try:
        assert len(primary.follower_pids) == 1
        paths = thin_series(phantom_dir)[:5]
        datasets = [pydicom.dcmread(path) for path in paths]
        scanner = AE("CT_SCANNER")
        scanner.add_requested_context(
            datasets[0].SOPClassUID, datasets[0].file_meta.TransferSyntaxUID
        )
        # when twelve associations are open at once, the kernel spreads them over both
        associations = [
            scanner.associate("127.0.0.1", primary.port, ae_title="HRCT_TRIAGE")
            for _ in range(ASSOCIATIONS)
        ]
        assert all(association.is_established for association in associations)
        _wait_for(
            lambda: sum(_open_per_process(metrics_port)) == ASSOCIATIONS,
            "every association counted open",
        )
        assert min(_open_per_process(metrics_port)) >= 1  # 2 * 2**-12 odds of a false failure
        for association in associations:
            association.release()

        # and twelve scanners (DCMTK's storescu) send the same five instances at the same
        # time; pynetdicom's own client loses a C-STORE response now and then when many of
        # its associations run in threads, so the concurrent senders are separate processes
        with ThreadPoolExecutor(max_workers=ASSOCIATIONS) as pool:
            sent = list(pool.map(lambda _: storescu(primary.port, *paths), range(ASSOCIATIONS)))
        wait_until_no_open_association(sessions)
    finally:
        primary.stop()

    # then every C-STORE succeeded, yet each instance is one row and one file
    assert [result.returncode for result in sent] == [0] * ASSOCIATIONS, sent[0].stderr
    with transaction(sessions) as session:
        rows = session.scalars(select(Instance)).all()
        audit = session.scalars(select(Association)).all()
    assert sorted(row.sop_instance_uid for row in rows) == sorted(
        str(dataset.SOPInstanceUID) for dataset in datasets
    )
    spool = settings.spool_dir
    assert sorted(str(path.resolve()) for path in spool.rglob("*.dcm")) == sorted(
        str(Path(row.path).resolve()) for row in rows
    )
    assert not list(spool.rglob(f"*{TEMP_SUFFIX}"))
    # and each association's audit row counts what it stored, whichever process served it
    audit = [row for row in audit if row.instances]  # not the twelve that only opened
    assert len(audit) == ASSOCIATIONS
    assert {row.state for row in audit} == {"released"}
    assert {row.instances for row in audit} == {len(datasets)}
    assert {row.failures for row in audit} == {0}
    assert {(row.statuses or {}).get("0x0000") for row in audit} == {len(datasets)}
    assert len({row.bytes for row in audit}) == 1
    assert all(row.bytes > 0 for row in audit)


def test_a_second_listener_on_the_same_data_folder_is_refused(
    tmp_path: Path, sqlite_url: str, sqlite_sessions: sessionmaker[Session]
) -> None:
    # given a two-process listener, which shares its port with SO_REUSEPORT
    settings = listener_settings(tmp_path / "var", sqlite_url, listener_processes=2)
    first = Listener(settings, sqlite_sessions, run_dispatcher=False)
    first.start()
    try:
        # when a second one starts on the same data folder (same port even)
        second = Listener(settings, sqlite_sessions, run_dispatcher=False)
        # then it stops before reconciling the spool under the first one's feet
        with pytest.raises(ListenerError, match="another listener already serves"):
            second.start()
        second.stop()
    finally:
        first.stop()
    # and once the first has stopped, a new one may start
    third = Listener(settings, sqlite_sessions, run_dispatcher=False)
    third.start()
    third.stop()


def test_a_listener_process_that_dies_stops_the_listener(
    tmp_path: Path, sqlite_url: str, sqlite_sessions: sessionmaker[Session]
) -> None:
    settings = listener_settings(tmp_path / "var", sqlite_url, listener_processes=2)
    primary = Listener(settings, sqlite_sessions, run_dispatcher=False)
    primary.start()
    try:
        # when a follower is killed
        os.kill(primary.follower_pids[0], signal.SIGKILL)
        # then the listener says it failed, so that `listen` exits and its supervisor restarts
        # it (the restart's reconciliation closes what the dead process left open)
        assert primary.failed.wait(30)
    finally:
        primary.stop()


def test_followers_stop_when_the_primary_is_killed(tmp_path: Path, sqlite_url: str) -> None:
    # given `hrct-triage listen` with three processes
    data_dir = tmp_path / "var"
    data_dir.mkdir()
    port = free_port()
    env = {
        **os.environ,
        "HRCT_DATA_DIR": str(data_dir),
        "HRCT_DATABASE_URL": sqlite_url,
        "HRCT_PORT": str(port),
        "HRCT_LISTENER_PROCESSES": "3",
        "HRCT_METRICS_PORT": "0",
    }
    primary = subprocess.Popen(
        [sys.executable, "-m", "hrct_triage", "listen", "--log-level", "WARNING"],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for(lambda: len(_children(primary.pid)) >= 2, "two followers started", 90)
        followers = _children(primary.pid)
        # when the primary dies without a chance to stop them
        primary.send_signal(signal.SIGKILL)
        primary.wait(timeout=10)
        # then the followers stop on their own: a restarted primary never reconciles beside them
        _wait_for(lambda: not any(_alive(pid) for pid in followers), "followers stopped")
    finally:
        if primary.poll() is None:
            primary.kill()
            primary.wait()


def _facts(index: int) -> worklist.InstanceFacts:
    return worklist.InstanceFacts(
        study_uid="1.2.826.0.1.3680043.10.1",
        series_uid="1.2.826.0.1.3680043.10.1.1",
        sop_instance_uid=f"1.2.826.0.1.3680043.10.1.1.{index}",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        path=f"/spool/{index}.dcm",
        size_bytes=1000 + index,
        sha256=f"{index:064x}",
        modality="CT",
    )


def _queue_while_committing(group: GroupCommit, count: int) -> list[object]:
    """``count`` threads record a row each while a commit holds the lock; returns what each got
    (an Outcome or the exception) once the lock is let go."""
    results: list[object] = [None] * count

    def record(index: int) -> None:
        try:
            results[index] = group.record(_facts(index), None, datetime.now(UTC))
        except Exception as error:
            results[index] = error

    threads = [threading.Thread(target=record, args=(index,)) for index in range(count)]
    with group._commit_lock:  # a commit in progress
        for thread in threads:
            thread.start()
        _wait_for(lambda: len(group._pending) == count, "every row queued")
    for thread in threads:
        thread.join(timeout=60)
    return results


def test_rows_that_queue_during_a_commit_share_the_next_one(
    sessions: sessionmaker[Session],
) -> None:
    group = GroupCommit(sessions)
    engine = sessions.kw["bind"]
    committed: list[int] = []
    event.listen(engine, "commit", lambda _connection: committed.append(1))
    # when eight C-STOREs' rows are queued while a commit runs
    results = _queue_while_committing(group, 8)
    # then one transaction commits all eight, each a new instance
    assert [getattr(r, "recorded", r) for r in results] == [worklist.Recorded.NEW] * 8
    assert len(committed) == 1
    with transaction(sessions) as session:
        assert len(session.scalars(select(Instance)).all()) == 8


def test_rows_that_queue_while_another_process_commits_share_the_next_commit(
    sqlite_sessions: sessionmaker[Session],
) -> None:
    group = GroupCommit(sqlite_sessions)
    engine = sqlite_sessions.kw["bind"]
    committed: list[int] = []
    event.listen(engine, "commit", lambda _connection: committed.append(1))
    # given another listener process's turn to write (its own connection to the database)
    other = make_engine(str(engine.url), take_turns=True).raw_connection()
    other_dbapi = other.dbapi_connection
    assert isinstance(other_dbapi, TurnTakingConnection)
    other_dbapi.take_turn()
    # when four C-STOREs' rows arrive meanwhile
    results: list[object] = [None] * 4

    def record(index: int) -> None:
        results[index] = group.record(_facts(index), None, datetime.now(UTC))

    threads = [threading.Thread(target=record, args=(index,)) for index in range(4)]
    for thread in threads:
        thread.start()
    # then the first to commit waits for the turn before it takes its batch ...
    _wait_for(lambda: len(group._pending) == 4, "every row queued while waiting for the turn")
    other_dbapi.end_turn()
    for thread in threads:
        thread.join(timeout=60)
    # ... so that one transaction commits all four
    assert [getattr(r, "recorded", r) for r in results] == [worklist.Recorded.NEW] * 4
    assert len(committed) == 1
    other.close()
    group.close()


def test_a_bad_row_fails_alone(
    sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    real = worklist.record_instance_quickly

    def record_instance_quickly(
        connection: Connection, facts: worklist.InstanceFacts, **kwargs: object
    ) -> object:
        if facts.sop_instance_uid.endswith(".2"):
            raise RuntimeError("this row cannot be written")
        return real(connection, facts, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(commits.worklist, "record_instance_quickly", record_instance_quickly)
    # when one of four rows that share a commit fails
    results = _queue_while_committing(GroupCommit(sessions), 4)
    # then only its C-STORE fails; the other three are committed
    assert isinstance(results[2], RuntimeError)
    assert [getattr(r, "recorded", None) for i, r in enumerate(results) if i != 2] == [
        worklist.Recorded.NEW
    ] * 3
    with transaction(sessions) as session:
        assert sorted(row.sop_instance_uid[-1] for row in session.scalars(select(Instance))) == [
            "0",
            "1",
            "3",
        ]
