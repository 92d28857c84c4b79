"""No process of ``hrct-triage up`` outlives it, however it ends: killed with SIGKILL (as the
kernel's OOM killer does), its worker, the worker's pool and the extra listener processes end
too, rather than running on with their leases beside the next ``up``.

Real processes on the embedded defaults (SQLite worklist, embedded broker); the process tree is
read from /proc, so this runs on Linux only.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers.ports import free_port, wait_for_port

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")

# How long the worker and its pool may take to start (torch and the model load on a busy CPU).
START_SECONDS = 180.0
# How long the descendants may take to end once ``up`` is gone: a parent-death signal is
# immediate; an idle worker's warm shutdown takes a few seconds.
END_SECONDS = 30.0


@dataclass(frozen=True)
class Proc:
    """A process, told apart from a later one with the same pid by its start time."""

    pid: int
    ppid: int
    start: int
    state: str
    command: str


def _stat(pid: int) -> Proc | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
        command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = raw[raw.rindex(")") + 2 :].split()  # after "pid (comm) "
    return Proc(pid, int(fields[1]), int(fields[19]), fields[0], command.strip())


def _all() -> list[Proc]:
    found = (_stat(int(entry)) for entry in os.listdir("/proc") if entry.isdigit())
    return [proc for proc in found if proc is not None]


def descendants(pid: int) -> list[Proc]:
    """Every living descendant of ``pid``, through /proc."""
    procs = _all()
    children: dict[int, list[Proc]] = {}
    for proc in procs:
        children.setdefault(proc.ppid, []).append(proc)
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child.state != "Z":
                found.append(child)
            todo.append(child.pid)
    return found


def alive(proc: Proc) -> bool:
    """Still running: the same process (pid and start time), and not a zombie."""
    now = _stat(proc.pid)
    return now is not None and now.start == proc.start and now.state != "Z"


@dataclass
class Up:
    process: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


@pytest.fixture
def up(tmp_path: Path) -> Iterator[Up]:
    """``hrct-triage up`` with two listener processes and one worker, on embedded defaults."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HRCT_")}
    port = free_port()
    env.update(
        {
            "HRCT_DATA_DIR": str(tmp_path / "var"),
            "HRCT_PORT": str(port),
            "HRCT_METRICS_PORT": "0",
            "HRCT_LISTENER_PROCESSES": "2",
            "HRCT_POLL_SECONDS": "0.5",
        }
    )
    log = tmp_path / "up.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "hrct_triage", "up", "--workers", "1"],
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_for_port(port, timeout=60)
        yield Up(process, log)
    finally:
        left = descendants(process.pid)
        if process.poll() is None:  # the test stopped early: the usual way out, then by force
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for proc in left:
            if alive(proc):
                os.kill(proc.pid, signal.SIGKILL)


def _worker_with_pool(up: Up) -> list[Proc]:
    """The descendants of ``up`` once its worker's pool process has started."""
    deadline = time.monotonic() + START_SECONDS
    while time.monotonic() < deadline:
        assert up.process.poll() is None, up.output()
        found = descendants(up.process.pid)
        workers = [p for p in found if p.ppid == up.process.pid and " worker " in f"{p.command} "]
        pools = [p for p in found if any(p.ppid == w.pid for w in workers)]
        if workers and pools and "ready" in up.output():
            return found
        time.sleep(0.5)
    raise AssertionError(f"the worker's pool did not start in {START_SECONDS:.0f} s\n{up.output()}")


def test_every_descendant_of_up_ends_when_up_is_killed(up: Up) -> None:
    # given `up` running with its worker, the worker's pool and a second listener process
    tree = _worker_with_pool(up)
    followers = [p for p in tree if p.ppid == up.process.pid and " worker " not in p.command]
    assert followers, [p.command for p in tree]
    survivors = tree
    try:
        # when `up` is killed with SIGKILL, which it cannot catch
        os.kill(up.process.pid, signal.SIGKILL)
        up.process.wait()
        # then every process it started, and every process those started, ends
        deadline = time.monotonic() + END_SECONDS
        survivors = [p for p in tree if alive(p)]
        while survivors and time.monotonic() < deadline:
            time.sleep(0.2)
            survivors = [p for p in survivors if alive(p)]
        assert not survivors, (
            f"still running {END_SECONDS:.0f} s after `up` was killed: "
            f"{[(p.pid, p.command) for p in survivors]}"
        )
    finally:
        for proc in survivors:  # only what this test started: a failed run leaves nothing behind
            if alive(proc):
                os.kill(proc.pid, signal.SIGKILL)


def test_the_worker_pool_ends_with_its_worker(up: Up) -> None:
    # given `up` running with its worker and the worker's pool
    tree = _worker_with_pool(up)
    (worker,) = [p for p in tree if p.ppid == up.process.pid and " worker " in f"{p.command} "]
    pool = [p for p in tree if p.ppid == worker.pid]
    # when the worker itself is killed with SIGKILL
    os.kill(worker.pid, signal.SIGKILL)
    # then its pool processes end too (Celery asks for a parent-death signal in each)
    deadline = time.monotonic() + END_SECONDS
    while any(alive(p) for p in pool) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = [p for p in pool if alive(p)]
    for proc in left:
        os.kill(proc.pid, signal.SIGKILL)
    assert not left, f"pool processes outlived their worker: {[p.pid for p in left]}"


# A child that asks to die with the process that started it, after ``delay`` seconds, then
# waits a minute: it ends early only if the request works.
_CHILD = """
import sys, time
from hrct_triage.common.parent_death import die_with_parent
time.sleep(float(sys.argv[2]))
die_with_parent(int(sys.argv[1]))
time.sleep(60)
"""
# A parent that starts that child, prints its pid and start time, and exits after ``lives``.
_PARENT = """
import os, subprocess, sys, time
child = subprocess.Popen(
    [sys.executable, "-c", sys.argv[1], str(os.getpid()), sys.argv[2]],
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
)
print(child.pid, flush=True)
time.sleep(float(sys.argv[3]))
"""


@pytest.mark.parametrize(
    ("delay", "lives"),
    [(0.0, 3.0), (2.0, 0.0)],
    ids=["parent-dies-after-the-request", "parent-died-before-the-request"],
)
def test_a_child_ends_with_its_parent_whenever_the_parent_dies(delay: float, lives: float) -> None:
    # given a parent process that starts a child tied to it, and dies after `lives` seconds
    # (before the child has asked, in the second case: the race at a child's start)
    parent = subprocess.run(
        [sys.executable, "-c", _PARENT, _CHILD, str(delay), str(lives)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    child = _stat(int(parent.stdout.split()[0]))
    assert child is not None
    # when the parent is gone, then the child ends within moments, not after its minute
    deadline = time.monotonic() + 20
    while alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    still = alive(child)
    if still:
        os.kill(child.pid, signal.SIGKILL)
    assert not still
