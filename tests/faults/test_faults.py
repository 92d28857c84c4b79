"""Nothing lost: faults injected into the running gateway at seeded random points.

Each test runs the gateway as real processes (``hrct-triage listen``, ``hrct-triage worker``)
over real services (a Redis and, where it is the fault, a PostgreSQL of the test's own; the
machine's PostgreSQL otherwise), sends small phantom studies with DCMTK storescu, injects one
kind of fault, ends it, and checks the invariants in ``harness.verify``: every study ends done
(or rightly not_applicable), the PACS holds one SR per analysis and nothing twice, and every
instance acknowledged to the scanner is in the worklist and in the spool.

Fault lengths are shortened for CI; ``HRCT_TEST_WORKER_DOWN_SECONDS`` and
``HRCT_TEST_PACS_DOWN_SECONDS`` set realistic ones (60 s, several minutes), and
``HRCT_TEST_FAULT_SEED`` replays a run's injection points. The figures are printed at the end of
the session and written to ``fault-figures.md`` in pytest's base temporary folder.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pytest
from sqlalchemy import select

from hrct_triage.db.models import Delivery, Event, Output, Study, StudyStatus
from hrct_triage.db.session import transaction
from tests.faults.harness import (
    FIGURES,
    PACS_DOWN_SECONDS,
    TERMINAL,
    WORKER_DOWN_SECONDS,
    Figures,
    Gateway,
    OwnPostgres,
    OwnRedis,
    Pacs,
    PhantomStudy,
    Scanner,
    holder_pid,
    rng_for,
    verify,
)
from tests.faults.harness import (
    now as utcnow,
)

pytestmark = [pytest.mark.faults, pytest.mark.services, pytest.mark.dcmtk]


@dataclass
class Run:
    gateway: Gateway
    scanner: Scanner
    figures: Figures
    started: float


@pytest.fixture
def run_factory(tmp_path: Path) -> Iterator[list[Run]]:
    runs: list[Run] = []
    yield runs
    for run in runs:
        run.gateway.stop()
        run.figures.wall_seconds = time.monotonic() - run.started
        FIGURES.append(run.figures)


def _start(
    runs: list[Run],
    tmp_path: Path,
    fault: str,
    *,
    database_url: str,
    broker_url: str,
    pacs: Pacs,
    workers: int = 1,
    **env: str,
) -> Run:
    started = time.monotonic()
    gateway = Gateway(
        tmp_path / "gateway",
        database_url=database_url,
        broker_url=broker_url,
        destinations=[pacs.destination],
        **env,
    )
    gateway.start_listener()
    for _ in range(workers):
        gateway.start_worker()
    run = Run(gateway, Scanner(gateway.port, tmp_path / "storescu.log"), Figures(fault), started)
    runs.append(run)
    return run


def _processing(run: Run, studies: list[PhantomStudy], skip: set[str], timeout: float) -> str:
    """Wait for a study (not in ``skip``) that a worker holds for analysis; its UID."""
    found: list[str] = []

    def holding(states: dict[str, object]) -> bool:
        found[:] = [
            uid
            for uid, state in states.items()
            if uid not in skip and getattr(state, "status", None) == StudyStatus.PROCESSING
        ]
        return bool(found)

    run.gateway.wait_for(
        holding,
        [s.study_uid for s in studies],
        timeout=timeout,
        what="a study under analysis",
        poll=0.05,
    )
    return found[0]


def _folders(studies: list[PhantomStudy]) -> list[Path]:
    return [s.folder for s in studies]


def _unacknowledged(run: Run, studies: list[PhantomStudy]) -> list[Path]:
    """Files of ``studies`` the scanner holds no success for: what it sends again."""
    return [p for s in studies for p in s.sop_of if p not in run.scanner.acknowledged]


def _resend_until_acknowledged(run: Run, studies: list[PhantomStudy], tries: int = 5) -> int:
    """The scanner's retry: send what was not acknowledged until everything was; the rounds."""
    for attempt in range(1, tries + 1):
        missing = _unacknowledged(run, studies)
        if not missing:
            return attempt - 1
        run.scanner.send(*missing)
    assert not _unacknowledged(run, studies), run.scanner.log.read_text()[-3000:]
    return tries


def _settle_and_verify(
    run: Run,
    pacs: Pacs,
    studies: list[PhantomStudy],
    *,
    timeout: float,
    fault_ended_at: datetime,
) -> None:
    """Wait until every study has settled, then check the invariants for this run."""
    run.gateway.wait_settled(studies, timeout=timeout)
    verify(run.gateway, pacs, studies, run.scanner, run.figures, fault_ended_at=fault_ended_at)


# --- pool process killed --------------------------------------------------------------------------


@pytest.mark.timeout(240)
def test_pool_process_killed_mid_analysis(
    tmp_path: Path,
    fault_studies: list[PhantomStudy],
    own_redis: OwnRedis,
    fault_pacs: Pacs,
    postgresql_url: str,
    run_factory: list[Run],
) -> None:
    """The pool process analysing a study is SIGKILLed (as the OOM killer would), for
    two studies; Celery gives the messages back and the replacement process takes over."""
    rng = rng_for("pool-process")
    run = _start(
        run_factory,
        tmp_path,
        "1 pool process SIGKILL mid-analysis",
        database_url=postgresql_url,
        broker_url=own_redis.url,
        pacs=fault_pacs,
    )
    sent = run.scanner.send(*_folders(fault_studies))
    assert sent.returncode == 0, sent.output[-2000:]

    killed: set[str] = set()
    for _ in range(2):
        victim = _processing(run, fault_studies, killed, timeout=120)
        time.sleep(rng.uniform(0.0, 0.6))
        state = run.gateway.states([victim])[victim]
        if state is not None and state.status == StudyStatus.PROCESSING:
            assert run.gateway.workers[0].kill_pool_process(holder_pid(state)) is not None
            run.figures.faults_injected += 1
        killed.add(victim)
    fault_end = utcnow()

    _settle_and_verify(run, fault_pacs, fault_studies, timeout=150, fault_ended_at=fault_end)


# --- whole worker killed --------------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_whole_worker_killed_and_restarted_later(
    tmp_path: Path,
    fault_studies: list[PhantomStudy],
    own_redis: OwnRedis,
    fault_pacs: Pacs,
    postgresql_url: str,
    run_factory: list[Run],
) -> None:
    """The whole worker (main and pool processes) is SIGKILLed at a random point after
    the first study is claimed, and a new worker starts ``HRCT_TEST_WORKER_DOWN_SECONDS`` later
    (realistic: a minute; CI: 8 s)."""
    rng = rng_for("whole-worker")
    run = _start(
        run_factory,
        tmp_path,
        "2 whole worker SIGKILL, restarted later",
        database_url=postgresql_url,
        broker_url=own_redis.url,
        pacs=fault_pacs,
    )
    sent = run.scanner.send(*_folders(fault_studies))
    assert sent.returncode == 0, sent.output[-2000:]
    _processing(run, fault_studies, set(), timeout=120)
    time.sleep(rng.uniform(0.0, 2.0))
    run.gateway.workers[0].kill()
    run.figures.faults_injected = 1
    time.sleep(WORKER_DOWN_SECONDS)
    fault_end = utcnow()
    run.gateway.start_worker()
    run.figures.notes.append(f"worker down {WORKER_DOWN_SECONDS:g} s")

    _settle_and_verify(run, fault_pacs, fault_studies, timeout=150, fault_ended_at=fault_end)


# --- Redis stopped --------------------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_redis_stopped_while_studies_arrive_and_a_worker_runs(
    tmp_path: Path,
    fault_studies: list[PhantomStudy],
    own_redis: OwnRedis,
    fault_pacs: Pacs,
    postgresql_url: str,
    run_factory: list[Run],
) -> None:
    """Redis is killed (SIGKILL: only its fsynced AOF survives) while a worker
    analyses the first studies, more studies arrive while it is down, then it starts again
    on the same data."""
    rng = rng_for("redis")
    run = _start(
        run_factory,
        tmp_path,
        "3 Redis killed and restarted (AOF)",
        database_url=postgresql_url,
        broker_url=own_redis.url,
        pacs=fault_pacs,
    )
    first, rest = fault_studies[:2], fault_studies[2:]
    assert run.scanner.send(*_folders(first)).returncode == 0
    _processing(run, first, set(), timeout=120)
    time.sleep(rng.uniform(0.0, 0.6))
    own_redis.kill()
    run.figures.faults_injected = 1
    down_since = time.monotonic()
    assert run.scanner.send(*_folders(rest)).returncode == 0  # the listener needs no broker
    time.sleep(max(0.0, rng.uniform(5.0, 8.0) - (time.monotonic() - down_since)))
    own_redis.start()
    fault_end = utcnow()
    run.figures.notes.append(f"Redis down {time.monotonic() - down_since:.0f} s")

    _settle_and_verify(run, fault_pacs, fault_studies, timeout=180, fault_ended_at=fault_end)


# --- PostgreSQL restarted -------------------------------------------------------------------------


@pytest.fixture
def own_postgres(tmp_path: Path) -> Iterator[OwnPostgres]:
    if os.geteuid() != 0:
        pytest.skip("the harness runs its PostgreSQL as the postgres user, which needs root")
    server = OwnPostgres(tmp_path / "postgres").init()
    yield server
    server.stop()


@pytest.mark.timeout(300)
def test_postgresql_restarted_while_studies_arrive_and_results_are_written(
    tmp_path: Path,
    fault_studies: list[PhantomStudy],
    own_redis: OwnRedis,
    own_postgres: OwnPostgres,
    fault_pacs: Pacs,
    run_factory: list[Run],
) -> None:
    """PostgreSQL is restarted (fast shutdown, a few seconds down) while a worker
    writes its results and while a scanner sends; the scanner sends again what was refused."""
    rng = rng_for("postgres")
    run = _start(
        run_factory,
        tmp_path,
        "4 PostgreSQL restarted",
        database_url=own_postgres.url,
        broker_url=own_redis.url,
        pacs=fault_pacs,
    )
    first, rest = fault_studies[:2], fault_studies[2:]
    assert run.scanner.send(*_folders(first)).returncode == 0
    _processing(run, first, set(), timeout=120)
    stored = run.gateway.instances()
    sender = run.scanner.start(*_folders(rest))
    run.gateway.wait_for_instances(stored + rng.randrange(2, sum(len(s.sop_of) for s in rest) - 5))
    own_postgres.stop()
    run.figures.faults_injected = 1
    down_since = time.monotonic()
    time.sleep(rng.uniform(2.0, 4.0))
    own_postgres.start()
    fault_end = utcnow()
    run.figures.notes.append(f"PostgreSQL down {time.monotonic() - down_since:.0f} s")
    refused = run.scanner.finish(sender).refused
    resends = _resend_until_acknowledged(run, fault_studies)
    run.figures.notes.append(f"{len(refused)} C-STOREs refused, {resends} resend rounds")

    _settle_and_verify(run, fault_pacs, fault_studies, timeout=180, fault_ended_at=fault_end)


# --- PACS down ------------------------------------------------------------------------------------


@pytest.mark.timeout(600)
def test_pacs_down_for_a_while_then_back(
    tmp_path: Path,
    fault_studies: list[PhantomStudy],
    own_redis: OwnRedis,
    fault_pacs: Pacs,
    postgresql_url: str,
    run_factory: list[Run],
) -> None:
    """The destination is down for ``HRCT_TEST_PACS_DOWN_SECONDS`` (realistic: several
    minutes; CI: 12 s) from a random point of the first delivery; results wait and arrive once
    it is back. The test's backoff is capped at 4 s (production: an hour), with enough attempts
    to outlast the outage."""
    rng = rng_for("pacs")
    run = _start(
        run_factory,
        tmp_path,
        "5 PACS down, then back",
        database_url=postgresql_url,
        broker_url=own_redis.url,
        pacs=fault_pacs,
        HRCT_DELIVERY_ATTEMPTS=str(int(PACS_DOWN_SECONDS / 2) + 12),
    )
    sent = run.scanner.send(*_folders(fault_studies))
    assert sent.returncode == 0, sent.output[-2000:]
    _processing(run, fault_studies, set(), timeout=120)
    time.sleep(rng.uniform(0.0, 1.0))
    fault_pacs.stop()
    run.figures.faults_injected = 1
    time.sleep(PACS_DOWN_SECONDS)
    states = run.gateway.states(s.study_uid for s in fault_studies)
    waiting = sum(1 for st in states.values() if st and st.status == StudyStatus.DELIVERING)
    fault_pacs.start()
    fault_end = utcnow()
    run.figures.notes.append(f"PACS down {PACS_DOWN_SECONDS:g} s, {waiting} studies waited")
    assert waiting >= 1, states

    _settle_and_verify(run, fault_pacs, fault_studies, timeout=120, fault_ended_at=fault_end)


# --- listener killed ------------------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_listener_killed_mid_association_and_the_scanner_sends_again(
    tmp_path: Path,
    fault_studies: list[PhantomStudy],
    own_redis: OwnRedis,
    fault_pacs: Pacs,
    postgresql_url: str,
    run_factory: list[Run],
) -> None:
    """The listener is SIGKILLed in the middle of an association; restarted, it
    cleans half-written files and keeps every acknowledged instance; the scanner's resend of
    the studies completes them."""
    rng = rng_for("listener")
    run = _start(
        run_factory,
        tmp_path,
        "6 listener SIGKILL mid-association",
        database_url=postgresql_url,
        broker_url=own_redis.url,
        pacs=fault_pacs,
    )
    total = sum(len(s.sop_of) for s in fault_studies)
    sender = run.scanner.start(*_folders(fault_studies))
    run.gateway.wait_for_instances(rng.randrange(5, total - 5))
    run.gateway.kill_listener()
    run.figures.faults_injected = 1
    cut = run.scanner.finish(sender)
    assert cut.returncode != 0 and len(cut.acknowledged) < total, cut.output[-2000:]
    run.gateway.start_listener()
    fault_end = utcnow()
    again = run.scanner.send(*_folders(fault_studies))  # a scanner resends the whole study
    assert again.returncode == 0, again.output[-2000:]
    run.figures.notes.append(f"{len(cut.acknowledged)} instances acknowledged before the kill")

    _settle_and_verify(run, fault_pacs, fault_studies, timeout=150, fault_ended_at=fault_end)
    recovered = re.search(
        r"recovered from an unclean stop: ([^\n]+)", run.gateway.listener_log.read_text()
    )
    assert recovered, "the restarted listener reconciled nothing"
    run.figures.notes.append(recovered.group(1))


# --- spool disk full ------------------------------------------------------------------------------


def _mount_small(folder: Path, size_bytes: int) -> str:
    """A tmpfs of ``size_bytes`` at ``folder`` (or a loop-mounted image); the way to grow it."""
    folder.mkdir(parents=True, exist_ok=True)
    size = f"size={size_bytes // 1024}k"
    tmpfs = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", size, "tmpfs", str(folder)], capture_output=True, text=True
    )
    if tmpfs.returncode == 0:
        return "tmpfs"
    pytest.skip(f"cannot mount a small file system for the spool: {tmpfs.stderr.strip()}")


@pytest.mark.timeout(300)
def test_spool_disk_full_refuses_then_ingest_resumes(
    tmp_path: Path,
    fault_studies: list[PhantomStudy],
    own_redis: OwnRedis,
    fault_pacs: Pacs,
    postgresql_url: str,
    run_factory: list[Run],
) -> None:
    """The spool's file system fills up during a transfer: the scanner gets 0xA700
    (out of resources), no study missing a refused instance is analysed, and once space
    returns the scanner's resend completes every study."""
    rng = rng_for("disk")
    spool = tmp_path / "gateway" / "var" / "spool"
    total = sum(p.stat().st_size for s in fault_studies for p in s.sop_of)
    room = int(total * rng.uniform(0.35, 0.6))
    _mount_small(spool, room)
    try:
        run = _start(
            run_factory,
            tmp_path,
            "7 spool disk full",
            database_url=postgresql_url,
            broker_url=own_redis.url,
            pacs=fault_pacs,
        )
        sent = run.scanner.send(*_folders(fault_studies))
        statuses = set(sent.statuses[p] for p in sent.refused)
        assert sent.refused and all("OutOfResources" in s for s in statuses), statuses
        run.figures.faults_injected = 1
        incomplete = [s for s in fault_studies if any(p in sent.refused for p in s.sop_of)]
        time.sleep(2 * 2 + 1)  # two quiet periods: nothing with a refused instance moves on
        states = run.gateway.states(s.study_uid for s in incomplete)
        assert all(st is None or st.status == StudyStatus.RECEIVING for st in states.values())
        subprocess.run(["mount", "-o", "remount,size=512m", str(spool)], check=True)
        fault_end = utcnow()
        resends = _resend_until_acknowledged(run, fault_studies)
        run.figures.notes.append(
            f"{len(sent.refused)} C-STOREs refused 0xA700 in {len(incomplete)} studies, "
            f"{resends} resend rounds"
        )
        run.gateway.wait_settled(fault_studies, timeout=150)
        verify(
            run.gateway,
            fault_pacs,
            fault_studies,
            run.scanner,
            run.figures,
            fault_ended_at=fault_end,
        )
    finally:
        for run in run_factory:
            run.gateway.stop()
        subprocess.run(["umount", "-l", str(spool)], check=False)


# --- poison study ---------------------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_poison_study_fails_after_the_attempt_limit_and_blocks_nothing(
    tmp_path: Path,
    fault_studies: list[PhantomStudy],
    own_redis: OwnRedis,
    fault_pacs: Pacs,
    postgresql_url: str,
    run_factory: list[Run],
) -> None:
    """One study kills the process analysing it every time (the test SIGKILLs the
    pool process holding it whenever it is ``processing``, as a decoder crash would): it ends
    ``failed`` with a reason after HRCT_MAX_ATTEMPTS, and every other study is done."""
    rng = rng_for("poison")
    poison = rng.choice([s for s in fault_studies if s.expected == StudyStatus.DONE])
    run = _start(
        run_factory,
        tmp_path,
        "8 poison study (crashes its worker every time)",
        database_url=postgresql_url,
        broker_url=own_redis.url,
        pacs=fault_pacs,
    )
    sent = run.scanner.send(*_folders(fault_studies))
    assert sent.returncode == 0, sent.output[-2000:]

    killed: set[int] = set()
    first_kill: float | None = None
    deadline = time.monotonic() + 150
    while time.monotonic() < deadline:
        state = run.gateway.states([poison.study_uid])[poison.study_uid]
        if state is not None and state.status in (StudyStatus.FAILED, StudyStatus.DONE):
            break
        pid = holder_pid(state) if state and state.status == StudyStatus.PROCESSING else None
        if pid is not None and pid not in killed:
            time.sleep(rng.uniform(0.0, 0.2))
            if run.gateway.workers[0].kill_pool_process(pid) == pid:
                killed.add(pid)
                run.figures.faults_injected += 1
                first_kill = first_kill or time.monotonic()
        time.sleep(0.02)
    fault_end = utcnow()

    run.gateway.wait_settled(fault_studies, timeout=120)
    verify(
        run.gateway,
        fault_pacs,
        fault_studies,
        run.scanner,
        run.figures,
        fault_ended_at=fault_end,
        expected={poison.study_uid: StudyStatus.FAILED},
    )
    final = run.gateway.states([poison.study_uid])[poison.study_uid]
    assert final is not None and "3 attempts" in (final.reason or ""), final
    run.figures.notes.append(
        f"poison failed {time.monotonic() - (first_kill or 0):.0f} s after its first crash: "
        f"{final.reason}; recovery 0 = the others were done first"
    )


# --- redelivery after the visibility timeout ------------------------------------------------------


@pytest.mark.timeout(300)
def test_two_workers_and_a_redelivery_after_the_visibility_timeout(
    tmp_path: Path,
    fault_studies: list[PhantomStudy],
    own_redis: OwnRedis,
    fault_pacs: Pacs,
    postgresql_url: str,
    run_factory: list[Run],
) -> None:
    """Two workers; the one analysing a study hangs (SIGSTOP of the whole worker)
    past its lease and the broker's visibility timeout, so Redis hands the message to the
    other. When the first resumes, its analysis is discarded: one analysis, one delivery."""
    rng = rng_for("visibility")
    lease = 5
    run = _start(
        run_factory,
        tmp_path,
        "9 two workers, redelivery after visibility timeout",
        database_url=postgresql_url,
        broker_url=own_redis.url,
        pacs=fault_pacs,
        workers=2,
        HRCT_LEASE_SECONDS=str(lease),
    )
    sent = run.scanner.send(*_folders(fault_studies))
    assert sent.returncode == 0, sent.output[-2000:]
    victim = _processing(run, fault_studies, set(), timeout=120)
    time.sleep(rng.uniform(0.0, 0.2))
    state = run.gateway.states([victim])[victim]
    assert state is not None
    frozen = next(w for w in run.gateway.workers if holder_pid(state) in w.pool_pids())
    os.killpg(frozen.process.pid, signal.SIGSTOP)
    frozen_at = utcnow()
    run.figures.faults_injected = 1
    try:
        run.gateway.wait_for(
            lambda states: all(s and s.status in TERMINAL for s in states.values()),
            [victim],
            timeout=90,
            what="the other worker finishes the hung worker's study",
        )
    finally:
        os.killpg(frozen.process.pid, signal.SIGCONT)
    run.gateway.wait_settled(fault_studies, timeout=120)
    time.sleep(3)  # the resumed worker's late writes, if any, would land now
    # The hang never ends on its own: recovery is counted from its start.
    verify(
        run.gateway, fault_pacs, fault_studies, run.scanner, run.figures, fault_ended_at=frozen_at
    )
    with transaction(run.gateway.sessions) as session:
        study = session.scalar(select(Study).where(Study.study_uid == victim))
        assert study is not None
        claims = session.scalars(
            select(Event.detail).where(
                Event.study_id == study.id, Event.to_status == StudyStatus.PROCESSING
            )
        ).all()
        attempts = session.scalars(
            select(Delivery.attempts)
            .join(Output, Output.id == Delivery.output_id)
            .where(Output.study_id == study.id)
        ).all()
    assert len(claims) == 2 and "lease lapsed" in claims[1], claims
    assert attempts and all(n == 1 for n in attempts), attempts
    run.figures.notes.append(
        f"lease {lease} s, hang counted as the fault; claims of the hung study: {len(claims)}; "
        f"delivery attempts per object: {attempts}"
    )
