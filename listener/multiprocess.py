"""More listener processes on the same DICOM port (``HRCT_LISTENER_PROCESSES``).

The listener a user starts is the *primary*: it takes ``<data dir>/listener.lock``, reconciles
the spool, recomputes priorities, binds the port with ``SO_REUSEPORT``, runs the dispatcher and
serves the worklist metrics. Only then does it start the *followers* (``spawn``, so no lock or
thread of the primary is inherited), which bind the same port and store instances exactly as the
primary does, nothing more: since none of them reconciles or dispatches, what those do never runs
twice at once. The kernel spreads new associations over the processes.

A follower that dies stops the whole listener (``Listener.failed``) rather than being restarted:
its associations' rows would stay open, holding their studies back, until a start-up
reconciliation closes them, so the supervisor's restart is the one that keeps every guarantee. A
follower whose primary dies stops too, so a new primary never reconciles beside an old
follower. Each follower counts its own listener metrics, on ``HRCT_METRICS_PORT`` + its index.
"""

from __future__ import annotations

import fcntl
import logging
import multiprocessing
import signal
import threading
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import IO, Protocol

from hrct_triage.common.errors import ListenerError
from hrct_triage.common.logs import configure_logging
from hrct_triage.common.settings import Settings

log = logging.getLogger("hrct.listener")

# How long a follower may take to import, connect and bind before the start counts as failed.
START_TIMEOUT_SECONDS = 60.0
_STOP_TIMEOUT_SECONDS = 15.0


class FollowerListener(Protocol):
    """What a follower runs: a listener, given as its class so that this module need not import
    ``listener.scp`` (which imports this one)."""

    def __init__(
        self, settings: Settings, *, run_dispatcher: bool, follower_index: int
    ) -> None: ...

    def start(self) -> None: ...

    def stop(self) -> None: ...


class DataFolderLock:
    """An exclusive ``flock`` on ``<data dir>/listener.lock`` for the primary's lifetime: with
    ``SO_REUSEPORT`` a second primary would otherwise bind beside the first and reconcile under
    its feet. The kernel drops the lock when the process dies, however it dies."""

    def __init__(self, data_dir: Path) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self.path = data_dir / "listener.lock"
        self._file: IO[bytes] | None = self.path.open("ab")
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._file.close()
            self._file = None
            raise ListenerError(
                f"another listener already serves {data_dir} (it holds {self.path})"
            ) from None

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None


class Followers:
    """The primary's follower processes: started together, watched, stopped together. Each
    runs a ``listener_class`` (the primary's own class, which ``spawn`` pickles by name)."""

    def __init__(
        self, settings: Settings, port: int, count: int, listener_class: type[FollowerListener]
    ) -> None:
        self.failed = threading.Event()
        self._stopping = threading.Event()
        self._processes: list[BaseProcess] = []
        self._watcher: threading.Thread | None = None
        context = multiprocessing.get_context("spawn")
        level = logging.getLogger().getEffectiveLevel()
        answers: list[Connection] = []
        for index in range(1, count + 1):
            ours, theirs = context.Pipe(duplex=False)
            process = context.Process(
                target=follower_main,
                args=(listener_class, settings, port, index, level, theirs),
                name=f"hrct-listener-{index}",
                daemon=True,
            )
            process.start()
            theirs.close()
            self._processes.append(process)
            answers.append(ours)
        try:
            self._wait_until_listening(answers)
        except BaseException:
            self.stop()
            raise
        self._watcher = threading.Thread(target=self._watch, name="hrct-followers", daemon=True)
        self._watcher.start()

    @property
    def pids(self) -> list[int]:
        return [process.pid for process in self._processes if process.pid is not None]

    def _wait_until_listening(self, answers: list[Connection]) -> None:
        for index, answer in enumerate(answers, start=1):
            if not answer.poll(START_TIMEOUT_SECONDS):
                raise ListenerError(f"listener process {index} did not start listening")
            try:
                message = answer.recv()
            except EOFError:
                message = "exited before listening"
            finally:
                answer.close()
            if message != "listening":
                raise ListenerError(f"listener process {index} failed to start: {message}")

    def _watch(self) -> None:
        sentinels = {process.sentinel: process for process in self._processes}
        while not self._stopping.is_set():
            for ready in wait(list(sentinels), timeout=1.0):
                if self._stopping.is_set():
                    return
                process = sentinels[ready]  # type: ignore[index]
                # Exit code 0: it was told to stop (SIGTERM to the whole service, say).
                log.log(
                    logging.INFO if process.exitcode == 0 else logging.ERROR,
                    "listener process %s exited with code %s; stopping the listener so that a "
                    "restart reconciles what its associations left open",
                    process.name,
                    process.exitcode,
                )
                self.failed.set()
                return

    def stop(self) -> None:
        self._stopping.set()
        for process in self._processes:
            if process.is_alive():
                process.terminate()  # SIGTERM: the follower shuts its server down
        for process in self._processes:
            process.join(_STOP_TIMEOUT_SECONDS)
            if process.is_alive():
                process.kill()
                process.join()
        if self._watcher is not None and self._watcher is not threading.current_thread():
            self._watcher.join(timeout=5)


def follower_main(
    listener_class: type[FollowerListener],
    settings: Settings,
    port: int,
    index: int,
    level: int,
    answer: Connection,
) -> None:
    """A follower's whole life (the target of its process)."""
    configure_logging(settings, level)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    listener = listener_class(
        settings.model_copy(
            update={"listener": settings.listener.model_copy(update={"port": port})}
        ),
        run_dispatcher=False,
        follower_index=index,
    )
    try:
        listener.start()
    except BaseException as error:
        answer.send(f"{type(error).__name__}: {error}")
        raise
    answer.send("listening")
    answer.close()
    parent = multiprocessing.parent_process()
    try:
        while not stop.is_set():
            if parent is not None and wait([parent.sentinel], timeout=0.5):
                log.error("the primary listener process is gone; listener process %d stops", index)
                break
            if parent is None:
                stop.wait(0.5)
    finally:
        listener.stop()
