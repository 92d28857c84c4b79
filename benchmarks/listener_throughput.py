"""Listener throughput against DCMTK's storescp, and the listener's peak memory.

Run from the repository root (needs DCMTK; makes phantoms with ``hrct_triage.phantoms``):

    .venv/bin/python benchmarks/listener_throughput.py            # single + 8 senders
    .venv/bin/python benchmarks/listener_throughput.py --rss      # also peak RSS, 100/1000 slices

What it does, each case in the same run so the machine's load hits both sides alike:

* single: ``storescu`` (``TCP_NODELAY=1``) sends one ``--slices``-slice 512x512 CT series in one
  association to ``hrct-triage listen`` and to ``storescp -od``;
* concurrent: ``--senders`` storescu processes at once, each its own study of
  ``--sender-slices`` slices, to the listener and to ``storescp --fork``.

Instances per second are counted from storescu's start to the last storescu's exit. The listener
keeps its full guarantees while measured (every file and its folder fsynced, its worklist row
committed with SQLite ``synchronous=FULL`` before the success status; rows of concurrent
C-STOREs share commits); storescp fsyncs nothing. ``--processes`` sets
``HRCT_LISTENER_PROCESSES`` for the concurrent case (the single association is one process's
either way).

* ceiling: what this disk allows anyone who answers success only after the instance's bytes are
  fsynced and its row is committed (the contract): one instance-sized file written and fsynced,
  then one SQLite insert committed with ``synchronous=FULL``, per instance, nothing else (no
  network, no parsing, no folder fsync). Its ratio to storescp bounds the single-association
  ratio any such listener can reach here.

On a shared machine one pass says little, so each case runs ``--repeat`` times, listener and
reference taking turns, and the medians are compared. Ratios are printed last.

Two effects of the 2-core development VM move both servers' figures from one turn to the next, which
is why only ratios of the same run compare. Its ext4 has no journal, and such an ext4 does not reuse
an inode freed less than 60 s ago (360 s while its inode table block is not written back): every
inode allocated passes over all of them again (``recently_deleted``; measured here: 44 us to create
an empty file in a quiet folder, 830 us among a few thousand such inodes). So no turn's files are
removed before the run ends: removing them after each pair of turns, as an earlier version of this
benchmark did, made the listener's turns (always the first after a removal) pay for thousands of
them and the reference's turns for fewer. A run started within minutes of another still inherits
that run's removal. And page-cache writes into memory the VM has not touched before cost several
times a copy into reused pages (``copy_folio_from_iter_atomic``).

storescp fsyncs nothing, so its files are still being written to the disk when its turn ends;
without the ``sync`` after every turn, the kernel wrote them back during the listener's next
turn (competing with its fsyncs). After the ``sync`` each turn's files are also dropped from the
page cache, so every turn writes into pages just freed (``_settle``, not timed): with them kept,
storescp's rate in one hour ranged from 660 to 1,370 instances/s depending on the turn before.

Each turn also counts CPU time, which tells where a rate's limit lies and moves less than rates
with the machine's noise: the server's (its processes and their children, from ``/proc``: user
and system time, live and exited) and the senders' (``getrusage`` of the storescu processes),
each per instance. When every core is busy in both turns, as with eight senders on a small
machine, rates follow from them, roughly (kernel threads' work is counted nowhere): the listener
reaches R times the rate of ``storescp --fork`` only if its CPU per instance is at most (storescp's
+ its senders') / R minus the listener's senders'. The script prints that bound for R = 0.6
beside the listener's own figure.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

STORESCU = ("storescu", "+sd", "+r", "+sp", "*.dcm")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _env(**extra: str) -> dict[str, str]:
    # Without TCP_NODELAY each DCMTK instance stalls ~40 ms on Nagle + delayed ACK.
    return {**os.environ, "TCP_NODELAY": "1", **extra}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _wait_for_port(
    port: int, process: subprocess.Popen[bytes], sockets: int = 1, timeout: float = 60
) -> None:
    """Until ``sockets`` listening sockets are bound to ``port``: one per listener process. The
    first process binds and accepts before it starts the others, so a connection alone would
    start the clock while they still import, and their start-up would count as their work."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode} before listening")
        if _listening_sockets(port) >= sockets:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    return
        time.sleep(0.05)
    raise TimeoutError(f"fewer than {sockets} sockets listen on port {port}")


def _listening_sockets(port: int) -> int:
    """Listening TCP sockets bound to ``port`` (``SO_REUSEPORT`` lets several share it)."""
    found = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":
                found += 1
    return found


def make_series(folder: Path, *, studies: int, slices: int) -> list[Path]:
    """``studies`` folders, each holding only the thin CT series of one phantom study."""
    from hrct_triage.phantoms import write_phantom_studies

    out = folder / f"{studies}x{slices}"
    series_dirs = sorted(p for p in out.glob("series_*") if p.is_dir())
    if len(series_dirs) == studies:
        return series_dirs
    shutil.rmtree(out, ignore_errors=True)
    raw = out / "raw"
    write_phantom_studies(raw, covid=studies, healthy=0, slices=slices, seed=11)
    series_dirs = []
    for index, study in enumerate(sorted(p for p in raw.iterdir() if p.is_dir())):
        by_series: dict[str, list[Path]] = {}
        for path in study.glob("*.dcm"):
            by_series.setdefault(path.name.rsplit("_", 1)[0], []).append(path)
        thin = max(by_series.values(), key=len)
        target = out / f"series_{index:02d}"
        target.mkdir()
        for path in thin:
            path.rename(target / path.name)
        series_dirs.append(target)
    shutil.rmtree(raw)
    return series_dirs


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(entry.name))
    return found


def _cpu_seconds(pid: int) -> float:
    """utime + stime + cutime + cstime of one process (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return sum(int(value) for value in fields[11:15]) / os.sysconf("SC_CLK_TCK")


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    port: int
    called: str

    def peak_rss_kib(self) -> int:
        """The largest VmHWM of the server process and its children (listener processes)."""
        peaks = [0]
        for pid in (self.process.pid, *_children(self.process.pid)):
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            for line in status.splitlines():
                if line.startswith("VmHWM:"):
                    peaks.append(int(line.split()[1]))
        return max(peaks)

    def cpu_seconds(self) -> float:
        """User + system time of the server and of its children so far: those still running or
        not yet reaped from their own ``/proc`` entries, those reaped through the server's."""
        return sum(_cpu_seconds(pid) for pid in (self.process.pid, *_children(self.process.pid)))

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def start_listener(data_dir: Path, processes: int = 1) -> Server:
    port = _free_port()
    command = [str(Path(sys.executable).with_name("hrct-triage")), "listen", "--log-level", "ERROR"]
    process = subprocess.Popen(
        command,
        env=_env(
            HRCT_DATA_DIR=str(data_dir),
            HRCT_PORT=str(port),
            HRCT_QUIET_SECONDS="3600",  # nothing completes, so no analysis is queued mid-run
            HRCT_MIN_FREE_DISK_BYTES="0",
            HRCT_LISTENER_PROCESSES=str(processes),
        ),
        cwd=data_dir,
        stdout=subprocess.DEVNULL,
    )
    _wait_for_port(port, process, sockets=processes)
    return Server(process, port, "HRCT_TRIAGE")


def start_storescp(out_dir: Path, *, fork: bool) -> Server:
    port = _free_port()
    out_dir.mkdir(parents=True, exist_ok=True)
    command = ["storescp", *(["--fork"] if fork else []), "-od", str(out_dir), str(port)]
    process = subprocess.Popen(
        command, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    _wait_for_port(port, process)
    return Server(process, port, "STORESCP")


@dataclass(frozen=True)
class Turn:
    """One server's turn: instances per second, and CPU milliseconds per instance."""

    rate: float
    server_cpu_ms: float
    senders_cpu_ms: float


def send(server: Server, folders: list[Path]) -> Turn:
    """One storescu per folder, all started at once, to ``server``."""
    count = sum(len(list(folder.glob("*.dcm"))) for folder in folders)
    server_before = server.cpu_seconds()
    senders_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    senders = [
        subprocess.Popen(
            [*STORESCU, "-aec", server.called, "127.0.0.1", str(server.port), str(folder)],
            env=_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for folder in folders
    ]
    for sender in senders:
        _, errors = sender.communicate(timeout=900)
        if sender.returncode != 0:
            raise RuntimeError(f"storescu failed: {errors.decode(errors='replace')[-500:]}")
    elapsed = time.perf_counter() - started
    senders_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    server_cpu = server.cpu_seconds() - server_before
    senders_cpu = (senders_after.ru_utime + senders_after.ru_stime) - (
        senders_before.ru_utime + senders_before.ru_stime
    )
    return Turn(count / elapsed, 1e3 * server_cpu / count, 1e3 * senders_cpu / count)


@dataclass(frozen=True)
class Case:
    """Medians of a case's turns, listener and reference."""

    ours: Turn
    theirs: Turn
    rss_kib: int

    @property
    def ratio(self) -> float:
        return self.ours.rate / self.theirs.rate

    def cpu_bound(self, ratio: float) -> float:
        """The listener's CPU per instance (ms) at which, with every core busy in both turns,
        its rate would be ``ratio`` times the reference's: the reference's turn spent
        (reference + its senders) per instance, the listener's may spend that / ``ratio``."""
        reference_turn = self.theirs.server_cpu_ms + self.theirs.senders_cpu_ms
        return reference_turn / ratio - self.ours.senders_cpu_ms

    def cpu_line(self, reference: str) -> str:
        return (
            f"CPU per instance: listener {self.ours.server_cpu_ms:.2f} ms, {reference} "
            f"{self.theirs.server_cpu_ms:.2f} ms; its senders {self.ours.senders_cpu_ms:.2f} ms, "
            f"{reference}'s {self.theirs.senders_cpu_ms:.2f} ms"
        )


def median_turn(turns: list[Turn]) -> Turn:
    return Turn(
        statistics.median(turn.rate for turn in turns),
        statistics.median(turn.server_cpu_ms for turn in turns),
        statistics.median(turn.senders_cpu_ms for turn in turns),
    )


def _case(
    scratch: Path, name: str, folders: list[Path], *, fork: bool, repeat: int, processes: int = 1
) -> Case:
    """Medians of the listener's and storescp's turns, taking turns ``repeat`` times (each pair
    printed, for the spread), and the listener's peak RSS."""
    ours: list[Turn] = []
    theirs: list[Turn] = []
    rss = 0
    for turn in range(repeat):
        listener = start_listener(_fresh(scratch / f"{name}-listener-{turn}"), processes)
        try:
            ours.append(send(listener, folders))
            rss = max(rss, listener.peak_rss_kib())
        finally:
            listener.stop()
            _settle(scratch / f"{name}-listener-{turn}")
        reference = start_storescp(_fresh(scratch / f"{name}-storescp-{turn}"), fork=fork)
        try:
            theirs.append(send(reference, folders))
        finally:
            reference.stop()
            _settle(scratch / f"{name}-storescp-{turn}")
        print(
            f"  {name} turn {turn + 1}: listener {ours[-1].rate:.0f}, storescp "
            f"{theirs[-1].rate:.0f} inst/s; CPU ms/instance {ours[-1].server_cpu_ms:.2f} / "
            f"{theirs[-1].server_cpu_ms:.2f}"
        )
    return Case(median_turn(ours), median_turn(theirs), rss)


def _settle(folder: Path) -> None:
    """After a turn, untimed: write its files to the disk (storescp's are not yet: the kernel
    would write them back during the next turn) and drop them from the page cache, so that every
    turn writes into pages the kernel has just freed rather than into memory the VM may not
    have backed yet."""
    os.sync()
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def durable_ceiling(folder: Path, sample: Path, count: int) -> float:
    """Instances per second of the bare durability work, one instance after the other."""
    import sqlite3

    data = sample.read_bytes()
    folder = _fresh(folder)
    database = sqlite3.connect(folder / "rows.sqlite", isolation_level=None)
    database.execute("PRAGMA journal_mode=WAL")
    database.execute("PRAGMA synchronous=FULL")
    database.execute("CREATE TABLE instance (uid TEXT PRIMARY KEY, path TEXT, size INTEGER)")
    started = time.perf_counter()
    for index in range(count):
        path = folder / f"{index}.dcm"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        database.execute("BEGIN")
        database.execute(
            "INSERT INTO instance VALUES (?, ?, ?)", (str(index), str(path), len(data))
        )
        database.execute("COMMIT")
    elapsed = time.perf_counter() - started
    database.close()
    return count / elapsed


def _fresh(folder: Path) -> Path:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


def _peak_rss(scratch: Path, folder: Path) -> int:
    listener = start_listener(_fresh(scratch / f"rss-listener-{folder.name}"))
    try:
        send(listener, [folder])
        return listener.peak_rss_kib()
    finally:
        listener.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slices", type=int, default=300, help="slices of the single study")
    parser.add_argument("--senders", type=int, default=8, help="concurrent storescu processes")
    parser.add_argument("--sender-slices", type=int, default=100, help="slices per sender")
    parser.add_argument("--repeat", type=int, default=3, help="turns per case (medians compared)")
    parser.add_argument(
        "--processes", type=int, default=1, help="HRCT_LISTENER_PROCESSES, concurrent case"
    )
    parser.add_argument("--rss", action="store_true", help="also peak RSS at 100 and 1000 slices")
    parser.add_argument(
        "--work", type=Path, default=Path(tempfile.gettempdir()) / "hrct-bench", help="phantoms"
    )
    args = parser.parse_args()
    for tool in ("storescu", "storescp"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} not found: install DCMTK")
    args.work.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="run-", dir=args.work))
    try:
        single = make_series(args.work, studies=1, slices=args.slices)
        many = make_series(args.work, studies=args.senders, slices=args.sender_slices)
        one = _case(scratch, "single", single, fork=False, repeat=args.repeat)
        print(
            f"single association, {args.slices} slices: listener {one.ours.rate:7.1f} inst/s  "
            f"storescp {one.theirs.rate:7.1f} inst/s  (listener peak RSS "
            f"{one.rss_kib / 1024:.0f} MiB)"
        )
        print(f"  {one.cpu_line('storescp')}")
        sample = sorted(single[0].glob("*.dcm"))[0]
        ceiling = statistics.median(
            durable_ceiling(scratch / "ceiling", sample, args.slices) for _ in range(args.repeat)
        )
        print(
            f"durability ceiling (fsync + committed row per instance, nothing else): "
            f"{ceiling:7.1f} inst/s"
        )
        eight = _case(
            scratch, "concurrent", many, fork=True, repeat=args.repeat, processes=args.processes
        )
        print(
            f"{args.senders} senders x {args.sender_slices} slices, {args.processes} listener "
            f"process(es): listener {eight.ours.rate:7.1f} inst/s  storescp --fork "
            f"{eight.theirs.rate:7.1f} inst/s  (listener peak RSS {eight.rss_kib / 1024:.0f} MiB)"
        )
        print(f"  {eight.cpu_line('storescp --fork')}")
        print(
            f"  with every core busy, 0.6x of storescp --fork needs at most "
            f"{eight.cpu_bound(0.6):.2f} ms of listener CPU per instance"
        )
        if args.rss:
            for slices in (100, 1000):
                folder = make_series(args.work, studies=1, slices=slices)[0]
                print(
                    f"listener peak RSS, one {slices}-slice study: "
                    f"{_peak_rss(scratch, folder) / 1024:.0f} MiB"
                )
        print(
            f"ratio ceiling / storescp, single (bounds the next): {ceiling / one.theirs.rate:.2f}"
        )
        print(f"ratio single     (target >= 0.5): {one.ratio:.2f}")
        print(f"ratio {args.senders} senders (target >= 0.6): {eight.ratio:.2f}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
