"""Runs the listener in this process and Celery workers as child processes (``up``, ``demo``)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from hrct_triage.common.settings import Settings
from hrct_triage.listener.scp import Listener

log = logging.getLogger("hrct.up")


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment that gives a child process the same settings as this one: those set
    here, and the database and broker this process resolved (so children share them)."""
    env = dict(os.environ)
    for key, value in settings.explicit_environment().items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    env["HRCT_DATABASE_URL"] = settings.resolved_database_url
    env["HRCT_BROKER_URL"] = settings.resolved_broker_url
    return env


def start_worker(
    settings: Settings, *, concurrency: int = 1, quiet: bool = False
) -> subprocess.Popen[bytes]:
    """A worker in a session of its own (a Ctrl-C at the terminal reaches only this process,
    which stops it with ``stop_process``) that ends when this process ends, however it ends
    (``common.parent_death``); called from the main thread, whose end the kernel watches."""
    command = [sys.executable, "-m", "hrct_triage", "worker", "--concurrency", str(concurrency)]
    command += ["--parent-pid", str(os.getpid())]
    output = subprocess.DEVNULL if quiet else None
    return subprocess.Popen(
        command, env=settings_env(settings), stdout=output, stderr=output, start_new_session=True
    )


def stop_process(process: subprocess.Popen[bytes], timeout: float = 20) -> None:
    """Warm shutdown first (the running task finishes), then a kill."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    except ProcessLookupError:
        pass


@contextmanager
def running_gateway(
    settings: Settings, *, workers: int = 1, concurrency: int = 1, quiet_workers: bool = False
) -> Iterator[Listener]:
    listener = Listener(settings)
    listener.start()
    children = [
        start_worker(settings, concurrency=concurrency, quiet=quiet_workers) for _ in range(workers)
    ]
    try:
        yield listener
    finally:
        listener.stop()
        for child in children:
            stop_process(child)
