"""Engines and transactions for SQLite (embedded default) and PostgreSQL.

SQLite is shared by the listener, the dispatcher and the workers, each its own process: WAL lets
readers run beside the writer, a busy timeout waits for the lock instead of failing, and every
transaction starts with BEGIN IMMEDIATE so two writers never deadlock on a lock upgrade; the
listener's processes also take turns through a lock file (``hrct_triage.db.sqlite_turns``).
``synchronous=FULL`` because a row we acknowledge to a scanner must survive a power cut.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Engine, create_engine, event, make_url
from sqlalchemy.orm import Session, sessionmaker

from hrct_triage.db.sqlite_turns import TurnTakingConnection

# How long a SQLite writer waits for another process's transaction before giving up.
SQLITE_BUSY_TIMEOUT_MS = 30_000


def make_engine(url: str, *, take_turns: bool = False) -> Engine:
    """An engine for ``url`` with the per-backend settings above. ``take_turns``: its SQLite
    writers take turns with those of other processes that do too (``db.sqlite_turns``)."""
    if url.startswith("sqlite"):
        connect_args: dict[str, Any] = {"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000}
        database = make_url(url).database
        if take_turns and database and database != ":memory:":
            connect_args["factory"] = TurnTakingConnection.for_database(database)
        engine = create_engine(url, connect_args=connect_args)
        event.listen(engine, "connect", _sqlite_on_connect)
        event.listen(engine, "begin", _sqlite_on_begin)
        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=5)


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    dbapi_connection.isolation_level = None  # we issue BEGIN ourselves
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _sqlite_on_begin(connection: Any) -> None:
    dbapi_connection = connection.connection.dbapi_connection
    if not isinstance(dbapi_connection, TurnTakingConnection):
        connection.exec_driver_sql("BEGIN IMMEDIATE")
        return
    dbapi_connection.take_turn()
    try:
        connection.exec_driver_sql("BEGIN IMMEDIATE")
    except BaseException:
        dbapi_connection.end_turn()
        raise


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def transaction(factory: sessionmaker[Session]) -> Iterator[Session]:
    """One unit of work: committed when the block ends, rolled back if it raises."""
    with factory() as session, session.begin():
        yield session
