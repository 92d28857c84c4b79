"""Association bookkeeping that could not be written when it happened (database unreachable),
kept in memory and written, in order, as soon as the database answers again.

Why it matters: an association row left ``open`` holds the studies it fed back from completion,
rightly while the association is open. A close that failed to be written held them for good, until
the listener was restarted (tests/faults:
test_postgresql_restarted_while_studies_arrive_and_results_are_written). A transient refusal that
failed to be written let its study complete without the instance the scanner is going to send again,
so the study was analysed on a partial set and then again.

Writes keep their order: once one waits, later ones queue behind it, so an association's close
never lands before an earlier refusal of one of its instances. What is still queued when the
process dies is settled by start-up reconciliation (the association is closed as ``orphaned``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable

from sqlalchemy.orm import Session, sessionmaker

from hrct_triage.db.session import transaction

log = logging.getLogger("hrct.listener")

# First wait before writing the backlog again; it doubles up to the maximum.
RETRY_SECONDS = 0.5
MAX_RETRY_SECONDS = 2.0


class Backlog:
    """``write`` runs a worklist write now, or keeps it for a background thread that retries."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self._sessions = sessions
        self._pending: deque[tuple[str, Callable[[Session], None]]] = deque()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def __len__(self) -> int:
        with self._lock:
            return len(self._pending)

    def write(self, what: str, action: Callable[[Session], None]) -> bool:
        """Run ``action`` in a transaction; True when it is written now, False when it waits."""
        with self._lock:
            waiting = bool(self._pending)
        if not waiting:
            try:
                with transaction(self._sessions) as session:
                    action(session)
                return True
            except Exception as error:
                log.error("%s not written (%s); kept until the worklist answers", what, error)
        with self._lock:
            self._pending.append((what, action))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._drain, name="hrct-backlog", daemon=True
                )
                self._thread.start()
        return False

    def _drain(self) -> None:
        delay = RETRY_SECONDS
        while True:
            with self._lock:
                if not self._pending:
                    self._thread = None
                    return
                what, action = self._pending[0]
            try:
                with transaction(self._sessions) as session:
                    action(session)
            except Exception:
                time.sleep(delay)
                delay = min(delay * 2, MAX_RETRY_SECONDS)
                continue
            delay = RETRY_SECONDS
            with self._lock:
                self._pending.popleft()
            log.warning("%s written late (the worklist was unreachable)", what)
