"""Writers of one SQLite database take turns through its lock file (``db.sqlite_turns``): a writer
waits in the kernel while another holds a turn and goes on once that one's transaction ends however
it ends, a thread never waits for its own turn, and the listener's engine takes turns while other
engines do not."""

from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
from pathlib import Path

import pytest
from sqlalchemy import text

from hrct_triage.db.session import make_engine, make_sessionmaker, transaction
from hrct_triage.db.sqlite_turns import TurnTakingConnection, lock_path


def _connect(database: Path, *, timeout: float = 30) -> TurnTakingConnection:
    factory = TurnTakingConnection.for_database(str(database))
    connection = sqlite3.connect(
        database, timeout=timeout, factory=factory, isolation_level=None, check_same_thread=False
    )
    assert isinstance(connection, TurnTakingConnection)
    connection.execute("PRAGMA journal_mode=WAL")
    return connection


def _begin(connection: TurnTakingConnection) -> None:
    connection.take_turn()
    connection.execute("BEGIN IMMEDIATE")


def _turn_is_free(database: Path) -> bool:
    fd = os.open(lock_path(str(database)), os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
    return True


@pytest.mark.parametrize("end", ["commit", "rollback", "close"])
def test_a_writer_waits_for_the_turn_and_goes_on_once_the_holder_is_done(
    tmp_path: Path, end: str
) -> None:
    database = tmp_path / "worklist.sqlite"
    first, second = _connect(database), _connect(database)
    first.execute("CREATE TABLE row (n INTEGER)")
    # given a writer in the middle of its transaction
    _begin(first)
    first.execute("INSERT INTO row VALUES (1)")
    # when another thread's writer wants to write
    got_turn = threading.Event()

    def write() -> None:
        second.take_turn()
        got_turn.set()
        second.execute("BEGIN IMMEDIATE")
        second.execute("INSERT INTO row VALUES (2)")
        second.commit()

    writer = threading.Thread(target=write)
    writer.start()
    # then it waits for its turn, before it reaches SQLite's lock and its polling ...
    assert not got_turn.wait(0.3)
    # ... and writes as soon as the first one's transaction ends, whichever way it ends
    getattr(first, end)()
    assert got_turn.wait(10)
    writer.join(10)
    rows = sorted(n for (n,) in second.execute("SELECT n FROM row"))
    assert rows == ([1, 2] if end == "commit" else [2])
    assert _turn_is_free(database)
    second.close()
    if end != "close":
        first.close()


def test_a_thread_holding_a_turn_does_not_wait_for_itself(tmp_path: Path) -> None:
    database = tmp_path / "worklist.sqlite"
    first, second = _connect(database), _connect(database, timeout=0.2)
    first.execute("CREATE TABLE row (n INTEGER)")
    # given a thread in a transaction of one connection
    _begin(first)
    # when the same thread begins on another connection (a bug, but not a hang)
    second.take_turn()
    # then SQLite's own lock refuses it after its timeout, as without turns
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        second.execute("BEGIN IMMEDIATE")
    first.commit()
    assert _turn_is_free(database)
    first.close()
    second.close()


def test_the_listeners_engine_takes_turns_and_the_others_do_not(tmp_path: Path) -> None:
    database = tmp_path / "worklist.sqlite"
    url = f"sqlite:///{database}"
    listener_sessions = make_sessionmaker(make_engine(url, take_turns=True))
    other_sessions = make_sessionmaker(make_engine(url))
    with transaction(other_sessions) as session:
        session.execute(text("CREATE TABLE row (n INTEGER)"))
    # given the listener's engine in a transaction
    with transaction(listener_sessions) as session:
        session.execute(text("INSERT INTO row VALUES (1)"))
        # then it holds the database's turn, which its commit gives back
        assert not _turn_is_free(database)
    assert _turn_is_free(database)
    # and an engine made without turns (workers, the CLI) never takes one
    with transaction(other_sessions) as session:
        session.execute(text("INSERT INTO row VALUES (2)"))
        assert _turn_is_free(database)
