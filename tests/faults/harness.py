"""Fault-injection harness: the gateway as real processes over services the tests own.

* ``OwnRedis``: a ``redis-server`` on its own port and folder, AOF with ``appendfsync always``
  (as production should run it), started, killed and started again on the same data.
* ``OwnPostgres``: an ``initdb`` cluster in the test's folder, run as the ``postgres`` user
  (PostgreSQL refuses root), stopped and started by the postmaster's pid.
* ``Pacs``: DCMTK ``storescp`` with unique file names, so an object delivered twice shows as two
  files (the conftest PACS would overwrite the first copy and hide the duplicate).
* ``Gateway``: ``hrct-triage listen`` and any number of ``hrct-triage worker`` processes, each a
  subprocess that a test can SIGKILL (the worker's pool process alone, or the whole worker).
* ``Scanner``: DCMTK ``storescu`` whose verbose log tells which instances were acknowledged.
* ``verify``: the invariants every fault must keep, and the figures of the run.

Every process here is started by the harness and stopped by its own pid (or process group);
the machine's PostgreSQL and Redis are never touched by the faults.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pydicom
import redis
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from hrct_triage.common.storage import TEMP_SUFFIX
from hrct_triage.db.models import (
    Association,
    Event,
    Instance,
    OutboxRow,
    Output,
    Refusal,
    Study,
    StudyStatus,
)
from hrct_triage.db.session import make_engine, make_sessionmaker, transaction
from tests.helpers.dicom_peers import StoreSCP, dcmtk_env, require_tool
from tests.helpers.ports import free_port, wait_for_port

TERMINAL = (StudyStatus.DONE, StudyStatus.FAILED, StudyStatus.NOT_APPLICABLE)
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"

# Fault lengths: a realistic outage takes a worker down a minute and a PACS several minutes;
# CI runs them shorter. Set these to reproduce realistic figures.
WORKER_DOWN_SECONDS = float(os.environ.get("HRCT_TEST_WORKER_DOWN_SECONDS", "8"))
PACS_DOWN_SECONDS = float(os.environ.get("HRCT_TEST_PACS_DOWN_SECONDS", "12"))
# Seed of every random injection point; a failing run prints it, so it can be replayed.
FAULT_SEED = int(os.environ.get("HRCT_TEST_FAULT_SEED", "20260707"))


def rng_for(name: str) -> random.Random:
    return random.Random(f"{FAULT_SEED}:{name}")


def _terminate(process: subprocess.Popen[Any] | None, *, group: bool, timeout: float = 20) -> None:
    """SIGTERM, then SIGKILL, the process (or its process group) this harness started."""
    if process is None or process.poll() is not None:
        return
    send = (lambda sig: os.killpg(process.pid, sig)) if group else process.send_signal
    try:
        send(signal.SIGTERM)
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        send(signal.SIGKILL)
        process.wait(timeout=10)
    except ProcessLookupError:
        pass


# --- services the tests own ---------------------------------------------------------------


class OwnRedis:
    """A Redis with AOF (``appendfsync always``): what it acknowledged survives a kill."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        folder.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> OwnRedis:
        self.process = subprocess.Popen(
            [
                shutil.which("redis-server") or "/usr/bin/redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.folder),
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
                "--daemonize",
                "no",
                "--logfile",
                str(self.folder / "redis.log"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if redis.Redis.from_url(self.url, socket_timeout=1).ping():
                    return self
            except redis.RedisError:
                time.sleep(0.05)
        raise TimeoutError(f"redis on {self.port} did not answer")

    def kill(self) -> None:
        """SIGKILL: no shutdown save; only the fsynced AOF is left."""
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=10)
            self.process = None

    def stop(self) -> None:
        _terminate(self.process, group=False)
        self.process = None


def _pg_bin(tool: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{tool}"))
    if not found:
        raise FileNotFoundError(f"{tool} not found under /usr/lib/postgresql/*/bin")
    return found[-1]


class OwnPostgres:
    """A PostgreSQL cluster of its own, run as the ``postgres`` user (it refuses root).

    Its data folder is inside the test's ``tmp_path``; the folders above it get the search (x)
    bit for others, nothing more, so the ``postgres`` user can reach it.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.data = folder / "data"
        self.port = free_port()
        self.log = folder / "postgres.log"
        self.pid: int | None = None

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/hrct"

    def _as_postgres(self, *args: str, timeout: float = 120) -> None:
        subprocess.run(
            ["runuser", "-u", "postgres", "--", *args],
            check=True,
            capture_output=True,
            timeout=timeout,
        )

    def init(self) -> OwnPostgres:
        self.folder.mkdir(parents=True, exist_ok=True)
        for parent in [self.folder, *self.folder.parents]:
            if parent == Path("/"):
                break
            mode = parent.stat().st_mode
            if not mode & 0o001:
                parent.chmod(mode | 0o001)
        self.data.mkdir()
        shutil.chown(self.folder, "postgres")
        shutil.chown(self.data, "postgres")
        self.data.chmod(0o700)
        self.log.touch()
        shutil.chown(self.log, "postgres")
        self._as_postgres(
            _pg_bin("initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync"
        )
        self.start()
        with psycopg.connect(
            f"postgresql://postgres@127.0.0.1:{self.port}/postgres", autocommit=True
        ) as conn:
            conn.execute("CREATE DATABASE hrct")
        return self

    def start(self) -> None:
        options = (
            f"-p {self.port} -k {self.data} -c listen_addresses=127.0.0.1 "
            "-c shared_buffers=16MB -c max_connections=60"
        )
        self._as_postgres(
            _pg_bin("pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w", "-o", options,
            "start",
        )  # fmt: skip
        self.pid = int((self.data / "postmaster.pid").read_text().split()[0])

    def stop(self, *, immediate: bool = False) -> None:
        """Fast shutdown (SIGINT) or a crash-like immediate one (SIGQUIT), by our pid."""
        if self.pid is None:
            return
        try:
            os.kill(self.pid, signal.SIGQUIT if immediate else signal.SIGINT)
        except ProcessLookupError:
            self.pid = None
            return
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        else:
            os.kill(self.pid, signal.SIGKILL)
        self.pid = None


# --- the PACS stand-in ---------------------------------------------------------------------


@dataclass(frozen=True)
class Received:
    study_uid: str
    sop_class_uid: str
    sop_instance_uid: str


class Pacs(StoreSCP):
    """DCMTK storescp writing every received object to a file of its own (``+uf``), so a
    duplicate delivery shows as a second file."""

    storage_options = ("+uf",)

    def __init__(self, folder: Path, ae_title: str = "PACS") -> None:
        super().__init__(folder, ae_title)
        self._seen: dict[Path, Received] = {}

    def stop(self) -> None:
        _terminate(self.process, group=False)
        self.process = None

    def received(self) -> list[Received]:
        for path in self.files():
            if path not in self._seen:
                ds = pydicom.dcmread(path, stop_before_pixels=True)
                self._seen[path] = Received(
                    str(ds.StudyInstanceUID), str(ds.SOPClassUID), str(ds.SOPInstanceUID)
                )
        return list(self._seen.values())


# --- the scanner ---------------------------------------------------------------------------


@dataclass
class PhantomStudy:
    study_uid: str
    folder: Path
    expected: str  # the study's rightful end: done or not_applicable
    sop_of: dict[Path, str]  # file -> SOP Instance UID


def index_study(folder: Path, expected: str) -> PhantomStudy:
    sop_of: dict[Path, str] = {}
    study_uid = ""
    for path in sorted(folder.rglob("*.dcm")):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        sop_of[path.resolve()] = str(ds.SOPInstanceUID)
        study_uid = str(ds.StudyInstanceUID)
    return PhantomStudy(study_uid, folder, expected, sop_of)


_SENDING = re.compile(r"Sending file: (.+)$")
_RESPONSE = re.compile(r"Received Store Response \((.+)\)")


@dataclass
class Sent:
    """What a storescu run was told: per file, the status text of its C-STORE response."""

    returncode: int
    statuses: dict[Path, str]
    output: str

    @property
    def acknowledged(self) -> set[Path]:
        return {p for p, s in self.statuses.items() if s.startswith("Success") or "Warning" in s}

    @property
    def refused(self) -> set[Path]:
        return set(self.statuses) - self.acknowledged


class Scanner:
    """storescu as a CT scanner: sends folders, remembers every acknowledgement it got."""

    def __init__(self, port: int, log: Path) -> None:
        require_tool("storescu")
        self.port = port
        self.log = log
        self.acknowledged: set[Path] = set()
        self.sends = 0

    def _args(self, paths: Iterable[Path]) -> list[str]:
        return [
            "storescu", "-v", "-aet", "CT_SCANNER", "-aec", "HRCT_TRIAGE",
            "+sd", "+r", "+sp", "*.dcm", "127.0.0.1", str(self.port),
            *[str(p) for p in paths],
        ]  # fmt: skip

    def start(self, *paths: Path) -> subprocess.Popen[str]:
        self.sends += 1
        return subprocess.Popen(
            self._args(paths),
            env=dcmtk_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def finish(self, process: subprocess.Popen[str], timeout: float = 120) -> Sent:
        output, _ = process.communicate(timeout=timeout)
        with self.log.open("a") as log:
            log.write(output)
        statuses: dict[Path, str] = {}
        current: Path | None = None
        for line in output.splitlines():
            if match := _SENDING.search(line):
                current = Path(match.group(1)).resolve()
            elif (match := _RESPONSE.search(line)) and current is not None:
                statuses[current] = match.group(1)
                current = None
        sent = Sent(process.returncode, statuses, output)
        self.acknowledged |= sent.acknowledged
        return sent

    def send(self, *paths: Path, timeout: float = 120) -> Sent:
        return self.finish(self.start(*paths), timeout=timeout)


# --- the gateway ---------------------------------------------------------------------------


@dataclass
class Worker:
    process: subprocess.Popen[bytes]
    log: Path

    def pool_pids(self) -> list[int]:
        """The Celery pool processes (children of the worker's main process)."""
        pids: list[int] = []
        for children in Path(f"/proc/{self.process.pid}/task").glob("*/children"):
            try:
                pids += [int(pid) for pid in children.read_text().split()]
            except OSError:
                continue
        return pids

    def kill_pool_process(self, pid: int | None = None) -> int | None:
        """SIGKILL one pool process (the given one when it is ours, else the first)."""
        pids = self.pool_pids()
        target = pid if pid in pids else (pids[0] if pids else None)
        if target is not None:
            os.kill(target, signal.SIGKILL)
        return target

    def kill(self) -> None:
        """SIGKILL the whole worker: its main process and every pool process."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)

    def stop(self) -> None:
        _terminate(self.process, group=True, timeout=30)


@dataclass
class StudyState:
    status: str
    reason: str | None
    generation: int
    attempts: int
    claimed_by: str | None


def holder_pid(state: StudyState) -> int | None:
    """The pid in a claim's holder name (``host:pid:namespace``, see worker.jobs)."""
    parts = (state.claimed_by or "").split(":")
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None


class Gateway:
    """``hrct-triage listen`` and ``hrct-triage worker`` processes with one environment."""

    def __init__(
        self,
        folder: Path,
        *,
        database_url: str,
        broker_url: str,
        destinations: list[str],
        **overrides: str,
    ) -> None:
        self.folder = folder
        self.port = free_port()
        self.data_dir = folder / "var"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("HRCT_")}
        self.env.update(
            {
                "HRCT_DATA_DIR": str(self.data_dir),
                "HRCT_PORT": str(self.port),
                "HRCT_DATABASE_URL": database_url,
                "HRCT_BROKER_URL": broker_url,
                "HRCT_DESTINATIONS": ",".join(destinations),
                "HRCT_QUIET_SECONDS": "2",
                "HRCT_POLL_SECONDS": "0.5",
                "HRCT_ALLOW_UNTRAINED": "1",
                "HRCT_MIN_SLICES": "8",
                "HRCT_HEATMAPS": "1",
                "HRCT_METRICS_PORT": "0",
                "HRCT_MIN_FREE_DISK_BYTES": "0",
                "HRCT_MAX_ATTEMPTS": "3",
                "HRCT_DELIVERY_BACKOFF_SECONDS": "1",
                "HRCT_DELIVERY_BACKOFF_MAX_SECONDS": "4",
                "HRCT_DELIVERY_TIMEOUT_SECONDS": "10",
                # One torch thread per worker: two cores are shared with the listener.
                "OMP_NUM_THREADS": "1",
                **overrides,
            }
        )
        self.sessions: sessionmaker[Session] = make_sessionmaker(make_engine(database_url))
        self.listener: subprocess.Popen[bytes] | None = None
        self.listener_log = folder / "listener.log"
        self.workers: list[Worker] = []

    # processes

    def start_listener(self) -> None:
        self.listener = subprocess.Popen(
            [sys.executable, "-m", "hrct_triage", "listen"],
            env=self.env,
            stdout=self.listener_log.open("ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.listener.poll() is None, self.tail(self.listener_log)
            try:
                wait_for_port(self.port, timeout=0.5)
                return
            except TimeoutError:
                continue
        raise TimeoutError(f"listener did not open port {self.port}")

    def kill_listener(self) -> None:
        if self.listener is not None and self.listener.poll() is None:
            os.killpg(self.listener.pid, signal.SIGKILL)
            self.listener.wait(timeout=10)

    def start_worker(self, concurrency: int = 1) -> Worker:
        log = self.folder / f"worker-{len(self.workers) + 1}.log"
        process = subprocess.Popen(
            [sys.executable, "-m", "hrct_triage", "worker", "--concurrency", str(concurrency)],
            env=self.env,
            stdout=log.open("ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        worker = Worker(process, log)
        self.workers.append(worker)
        return worker

    def stop(self) -> None:
        for worker in self.workers:
            worker.stop()
        _terminate(self.listener, group=True)
        self.sessions.kw["bind"].dispose()

    @staticmethod
    def tail(path: Path, chars: int = 4000) -> str:
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def logs(self) -> str:
        parts = [f"--- listener\n{self.tail(self.listener_log)}"]
        parts += [f"--- {w.log.name}\n{self.tail(w.log)}" for w in self.workers]
        return "\n".join(parts)

    # the worklist

    def states(self, uids: Iterable[str]) -> dict[str, StudyState | None]:
        wanted = list(uids)
        with transaction(self.sessions) as session:
            rows = session.scalars(select(Study).where(Study.study_uid.in_(wanted))).all()
            found = {
                s.study_uid: StudyState(s.status, s.reason, s.generation, s.attempts, s.claimed_by)
                for s in rows
            }
        return {uid: found.get(uid) for uid in wanted}

    def wait_for(
        self,
        predicate: Callable[[dict[str, StudyState | None]], bool],
        uids: Iterable[str],
        *,
        timeout: float,
        what: str,
        poll: float = 0.1,
    ) -> dict[str, StudyState | None]:
        wanted = list(uids)
        deadline = time.monotonic() + timeout
        states: dict[str, StudyState | None] = {}
        while time.monotonic() < deadline:
            try:
                states = self.states(wanted)
            except Exception:  # the database may be the fault under test
                time.sleep(poll)
                continue
            if predicate(states):
                return states
            time.sleep(poll)
        raise AssertionError(
            f"{what}: not reached in {timeout:.0f} s; states: "
            f"{ {u[-12:]: s and (s.status, s.reason) for u, s in states.items()} }\n"
            f"{self.diagnosis()}\n{self.logs()}"
        )

    def diagnosis(self) -> str:
        """What holds studies back: associations, transient refusals, unfinished outbox rows."""
        try:
            with transaction(self.sessions) as session:
                associations = session.execute(
                    select(Association.id, Association.state, Association.instances)
                ).all()
                refusals = session.execute(
                    select(Refusal.study_uid, Refusal.sop_instance_uid, Refusal.reason)
                ).all()
                outbox = session.execute(
                    select(OutboxRow.study_id, OutboxRow.task, OutboxRow.published_at).where(
                        OutboxRow.done_at.is_(None)
                    )
                ).all()
                held = session.execute(
                    select(Study.id, Study.status, Study.claimed_by, Study.lease_until)
                ).all()
        except Exception as error:
            return f"(no diagnosis: {error})"
        return f"associations {associations}\nrefusals {refusals}\noutbox {outbox}\nstudies {held}"

    def wait_settled(self, studies: list[PhantomStudy], timeout: float) -> None:
        self.wait_for(
            lambda states: all(s is not None and s.status in TERMINAL for s in states.values()),
            [s.study_uid for s in studies],
            timeout=timeout,
            what="every study in a final state",
            poll=0.25,
        )

    def instances(self) -> int:
        with transaction(self.sessions) as session:
            return int(session.scalar(select(func.count(Instance.id))) or 0)

    def wait_for_instances(self, count: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while self.instances() < count:
            assert time.monotonic() < deadline, f"{count} instances not stored in {timeout} s"
            time.sleep(0.01)

    def last_settled_at(self, uids: Iterable[str]) -> datetime | None:
        with transaction(self.sessions) as session:
            return session.scalar(
                select(func.max(Event.at))
                .join(Study, Study.id == Event.study_id)
                .where(Study.study_uid.in_(list(uids)), Event.to_status.in_(TERMINAL))
            )


# --- what every fault must keep ------------------------------------------------------------


@dataclass
class Figures:
    fault: str
    studies_sent: int = 0
    faults_injected: int = 0
    studies_lost: int = 0
    duplicate_outputs: int = 0
    analyses: int = 0
    recovery_seconds: float | None = None
    wall_seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def row(self) -> str:
        recovery = "-" if self.recovery_seconds is None else f"{self.recovery_seconds:.1f}"
        return (
            f"| {self.fault} | {self.studies_sent} | {self.faults_injected} | "
            f"{self.studies_lost} | {self.duplicate_outputs} | {self.analyses} | {recovery} | "
            f"{self.wall_seconds:.0f} | {'; '.join(self.notes)} |"
        )


FIGURES: list[Figures] = []
TABLE_HEADER = (
    "| fault | studies sent | faults injected | studies lost | duplicate outputs | analyses | "
    "recovery s | wall s | notes |\n|---|---|---|---|---|---|---|---|---|"
)


def figures_table() -> str:
    return "\n".join([TABLE_HEADER, *(f.row() for f in FIGURES)])


def verify(
    gateway: Gateway,
    pacs: Pacs,
    studies: list[PhantomStudy],
    scanner: Scanner,
    figures: Figures,
    *,
    fault_ended_at: datetime,
    expected: dict[str, str] | None = None,
) -> None:
    """The invariants of "nothing lost", recorded in ``figures`` and then asserted:

    * every study ends in its rightful state (done, not_applicable, or what ``expected`` says);
    * the PACS holds no SOP instance twice and exactly one SR per analysis of a study;
    * every instance acknowledged to the scanner is in the worklist and in the spool, whole;
    * no half-written temporary file is left in the spool.
    """
    uids = [s.study_uid for s in studies]
    wanted = {s.study_uid: s.expected for s in studies} | (expected or {})
    states = gateway.states(uids)
    problems: list[str] = []
    lost: set[str] = set()
    for uid, state in states.items():
        if state is None or state.status != wanted[uid]:
            lost.add(uid)
            problems.append(f"study {uid}: {state} (wanted {wanted[uid]})")
        elif state.generation != 1:  # completed more than once: queued on a partial set
            problems.append(f"study {uid}: completed {state.generation} times, wanted once")

    received = pacs.received()
    copies = Counter(r.sop_instance_uid for r in received)
    duplicates = {uid: n for uid, n in copies.items() if n > 1}
    with transaction(gateway.sessions) as session:
        srs = session.execute(
            select(Study.study_uid, Output.generation, Output.sop_instance_uid)
            .join(Output, Output.study_id == Study.id)
            .where(Study.study_uid.in_(uids), Output.kind == "sr")
        ).all()
        recorded = {
            sop: (path, sha)
            for sop, path, sha in session.execute(
                select(Instance.sop_instance_uid, Instance.path, Instance.sha256)
            ).all()
        }
    analyses = {(study_uid, generation) for study_uid, generation, _ in srs}
    figures.analyses = len(analyses)
    sr_at_pacs = Counter(r.study_uid for r in received if r.sop_class_uid == SR_CLASS)
    for uid in uids:
        generations = sorted(g for s, g in analyses if s == uid)
        if wanted[uid] == StudyStatus.DONE and sr_at_pacs[uid] != len(generations):
            problems.append(
                f"study {uid}: {sr_at_pacs[uid]} SRs at the PACS for analyses {generations}"
            )
        if wanted[uid] == StudyStatus.DONE and len(generations) != 1:
            problems.append(f"study {uid}: analysed as generations {generations}, wanted one")
        if wanted[uid] != StudyStatus.DONE and sr_at_pacs[uid]:
            problems.append(f"study {uid} ({wanted[uid]}): {sr_at_pacs[uid]} SRs at the PACS")
    if duplicates:
        problems.append(f"objects received more than once: {duplicates}")

    sop_of = {path: sop for study in studies for path, sop in study.sop_of.items()}
    study_of = {path: study.study_uid for study in studies for path in study.sop_of}
    for path in sorted(scanner.acknowledged):
        sop = sop_of[path]
        entry = recorded.get(sop)
        if entry is None:
            lost.add(study_of[path])
            problems.append(f"acknowledged {path.name} ({sop}) is not in the worklist")
            continue
        spooled = Path(entry[0])
        if not spooled.exists() or hashlib.sha256(spooled.read_bytes()).hexdigest() != entry[1]:
            lost.add(study_of[path])
            problems.append(f"acknowledged {path.name} is missing or damaged in the spool")
    leftovers = list((gateway.data_dir / "spool").rglob(f"*{TEMP_SUFFIX}"))
    if leftovers:
        problems.append(f"half-written files left in the spool: {leftovers[:3]}")

    figures.studies_sent = len(studies)
    figures.studies_lost = len(lost)
    figures.duplicate_outputs = sum(n - 1 for n in duplicates.values())
    settled = gateway.last_settled_at(uids)
    if settled is not None:
        figures.recovery_seconds = max(0.0, (settled - fault_ended_at).total_seconds())
    assert not problems, "\n".join(problems) + "\n" + gateway.logs()


def write_figures(path: Path) -> None:
    path.write_text(
        figures_table() + "\n\n" + json.dumps([f.__dict__ for f in FIGURES], indent=2) + "\n"
    )


def now() -> datetime:
    return datetime.now(UTC)
