"""Group commit of the worklist rows of C-STOREs that arrive at the same time.

Each stored instance needs its row committed before its success status goes out, and a commit
costs a flush of the database's log (SQLite ``synchronous=FULL``, PostgreSQL's WAL) whatever it
holds. So the association threads of one process share commits: a thread whose file is on disk
queues its row and takes the commit lock; the thread holding it commits every row queued by then
in one transaction. A thread that finds its row committed by another when it gets the lock only
picks up its outcome. Alone (one association) a thread commits its own row straight away, with
no hand-off to another thread; under load each flush carries many rows, and in-process writers
queue on a lock instead of SQLite's sleeping busy handler.

The committing thread runs the common cases (a new instance of a receiving study, an identical
resend) as Core statements on a connection the group keeps open, in a bare transaction: an ORM
session per commit cost more Python than the statements themselves. An instance that needs the
full transition (a changed version, a study already complete) gets a session joined to the same
transaction.

Nothing is acknowledged before the transaction holding its row has committed. Rows are committed
while their files' fsyncs run (``listener.spool``), except a row that replaces an acknowledged
version of an instance: the transaction waits for that file (``durable``) before it commits, so
the worklist never trades a version on disk for one that may not be. A batch that
fails is tried again one row per transaction, so one bad row fails only its own C-STORE, and a
row that lost a race on its unique key to another listener process (the same instance sent over
two associations at once) is found on the second try and recorded as the identical resend it is.

Listener processes sharing a SQLite database take turns to write (``db.sqlite_turns``); a committing
thread waits for its process's turn before it takes the batch, so that the rows queued while
another process committed share the flush: under eight senders, SQLite's lock is held almost
all the time, by one process's commit or the other's.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import Connection, Engine
from sqlalchemy.orm import Session, sessionmaker

from hrct_triage.db import worklist
from hrct_triage.db.sqlite_turns import TurnTakingConnection

# Rows per transaction at most: bounds how long one commit holds the write lock.
MAX_BATCH = 64


@dataclass
class Outcome:
    recorded: worklist.Recorded
    superseded: str | None  # the file of a version this row replaced, if any


@dataclass
class _QueuedRow:
    """An instance row waiting for a shared commit, and what became of it."""

    facts: worklist.InstanceFacts
    association_id: int | None
    now: datetime
    durable: Callable[[], object] | None
    outcome: Outcome | None = None
    error: BaseException | None = None
    done: bool = field(default=False)


class GroupCommit:
    """``record`` is ``worklist.record_instance`` in a committed transaction, shared."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self._sessions = sessions
        self._engine: Engine = sessions.kw["bind"]
        self._connection: Connection | None = None  # used only under the commit lock
        self._pending: list[_QueuedRow] = []
        self._queue_lock = threading.Lock()
        self._commit_lock = threading.Lock()

    def record(
        self,
        facts: worklist.InstanceFacts,
        association_id: int | None,
        now: datetime,
        durable: Callable[[], object] | None = None,
    ) -> Outcome:
        """Commit the instance's row (perhaps with others'); raises what the commit raised, or
        what ``durable`` (waiting for the instance's file) raised before a replacing row."""
        item = _QueuedRow(facts, association_id, now, durable)
        with self._queue_lock:
            self._pending.append(item)
        while not item.done:
            with self._commit_lock:
                if item.done:
                    break
                self._take_turn()
                with self._queue_lock:
                    batch = self._pending[:MAX_BATCH]
                    del self._pending[:MAX_BATCH]
                self._commit(batch)
        if item.error is not None:
            raise item.error
        assert item.outcome is not None
        return item.outcome

    def _take_turn(self) -> None:
        """Wait for this process's turn among the database's writers (SQLite, ``db.sqlite_turns``)
        before the batch is taken, so that rows queued while another process commits join it;
        the turn ends with the transaction. Where this fails, BEGIN takes the turn, or fails."""
        try:
            dbapi_connection = self._connected().connection.dbapi_connection
        except Exception:  # the transaction will meet the same error and report it
            return
        if isinstance(dbapi_connection, TurnTakingConnection):
            dbapi_connection.take_turn()

    def _commit(self, batch: list[_QueuedRow]) -> None:
        try:
            outcomes = self._in_one_transaction(batch)
        except Exception:
            # One at a time, so only a bad row fails; this also settles a row that lost a race
            # with another listener process for the same instance (it is found, identical).
            for item in batch:
                try:
                    (outcome,) = self._in_one_transaction([item])
                except Exception as single_error:
                    _finish(item, None, single_error)
                else:
                    _finish(item, outcome, None)
            return
        for item, outcome in zip(batch, outcomes, strict=True):
            _finish(item, outcome, None)

    def _in_one_transaction(self, batch: list[_QueuedRow]) -> list[Outcome]:
        try:
            connection = self._connected()
            with connection.begin():
                outcomes = [_record_on(connection, item) for item in batch]
                for item, outcome in zip(batch, outcomes, strict=True):
                    if outcome.recorded is worklist.Recorded.REPLACED and item.durable:
                        item.durable()
                return outcomes
        except Exception:
            self._drop_connection()  # it may be the broken part (a restarted server)
            raise

    def _connected(self) -> Connection:
        """The connection the group keeps (used only under the commit lock), opened if need be."""
        if self._connection is None:
            self._connection = self._engine.connect()
        return self._connection

    def _drop_connection(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            with contextlib.suppress(Exception):  # it is gone either way
                connection.invalidate()

    def close(self) -> None:
        """Give the kept connection back (the listener is stopping)."""
        with self._commit_lock:
            if self._connection is not None:
                self._connection.close()
                self._connection = None


def _record_on(connection: Connection, item: _QueuedRow) -> Outcome:
    """The row of one instance in the connection's transaction."""
    recorded = worklist.record_instance_quickly(
        connection, item.facts, association_id=item.association_id, now=item.now
    )
    if recorded is not None:
        return Outcome(recorded, None)
    # A session joined to the connection's transaction (SQLAlchemy's default for a connection
    # already in one): it flushes into it, and its close leaves the commit to our block.
    with Session(bind=connection) as session:
        outcome = _record(session, item)
        session.flush()
        return outcome


def _record(session: Session, item: _QueuedRow) -> Outcome:
    recorded = worklist.record_instance(
        session, item.facts, association_id=item.association_id, now=item.now
    )
    superseded = (
        worklist.replaced_path(session, item.facts.sop_instance_uid)
        if recorded is worklist.Recorded.REPLACED
        else None
    )
    return Outcome(recorded, superseded)


def _finish(item: _QueuedRow, outcome: Outcome | None, error: BaseException | None) -> None:
    item.outcome = outcome
    item.error = error
    item.done = True
