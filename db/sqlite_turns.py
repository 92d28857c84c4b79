"""Turns among the writers of one SQLite database that run in several processes, waited for in
the kernel rather than by SQLite's polling.

A SQLite writer that finds the database locked by another process sleeps and tries again, for
longer each time, up to the busy timeout. When other processes commit back to back, as listener
processes do under several senders, such a writer keeps missing the moments the lock is free,
and the association waiting on it stalls meanwhile. Writers that first take a turn on a lock
file beside the database (``flock``, exclusive, for the length of the transaction) are woken by
the kernel the moment the holder lets go.

The turn is an addition to SQLite's own lock, not a replacement: a writer that does not take
turns (a worker, the admin CLI) still meets SQLite's lock and waits in its busy handler. A thread
that already holds a turn through another connection does not take a second one (it would wait
for itself forever); SQLite's own lock, with its timeout, decides for that connection as before.
The listener opens its database this way (``make_engine(..., take_turns=True)``); Celery's prefork
workers must not, as a forked child would share its parent's lock.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
from collections import Counter
from typing import Any, ClassVar

# Turns held per thread (``threading.get_ident``), through any connection of this process.
_HELD: Counter[int] = Counter()
_HELD_LOCK = threading.Lock()


def lock_path(database: str) -> str:
    """The lock file of the SQLite database file ``database``."""
    return os.path.abspath(database) + ".turns"


class TurnTakingConnection(sqlite3.Connection):
    """A sqlite3 connection that takes a turn (``take_turn``, before BEGIN) and ends it once its
    transaction ends: commit, rollback or close. ``for_database`` makes the subclass that
    ``sqlite3.connect(factory=...)`` needs for one database."""

    lock_path: ClassVar[str]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._turn_fd: int | None = None
        self._holder: int | None = None  # the thread whose turn this connection holds

    @classmethod
    def for_database(cls, database: str) -> type[TurnTakingConnection]:
        return type("TurnTakingConnection", (cls,), {"lock_path": lock_path(database)})

    def take_turn(self) -> None:
        """Wait for this process's turn among the database's writers; nothing when this
        connection or this thread already has one, or where the lock file cannot be used."""
        thread = threading.get_ident()
        with _HELD_LOCK:
            if self._holder is not None or _HELD[thread]:
                return
        try:
            if self._turn_fd is None:
                self._turn_fd = os.open(
                    self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640
                )
            fcntl.flock(self._turn_fd, fcntl.LOCK_EX)
        except OSError:  # read-only folder, no flock here: SQLite's own wait it is
            return
        with _HELD_LOCK:
            self._holder = thread
            _HELD[thread] += 1

    def end_turn(self) -> None:
        with _HELD_LOCK:
            holder, self._holder = self._holder, None
            if holder is None:
                return
            _HELD[holder] -= 1
            if not _HELD[holder]:
                del _HELD[holder]
        if self._turn_fd is not None:
            fcntl.flock(self._turn_fd, fcntl.LOCK_UN)

    def commit(self) -> None:
        try:
            super().commit()
        finally:
            self.end_turn()

    def rollback(self) -> None:
        try:
            super().rollback()
        finally:
            self.end_turn()

    def close(self) -> None:
        try:
            super().close()
        finally:
            self.end_turn()
            fd, self._turn_fd = self._turn_fd, None
            if fd is not None:
                os.close(fd)
