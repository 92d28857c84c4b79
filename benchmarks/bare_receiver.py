"""How fast a bare Python storage receiver doing only the listener's durable work can be here.

Run from the repository root (needs DCMTK; shares the phantoms of ``listener_throughput.py``):

    .venv/bin/python benchmarks/bare_receiver.py --repeat 3

Why: the listener aims at 0.6x of ``storescp --fork``'s throughput with 8 senders. This bounds what
any Python receiver that keeps the listener's contract can reach on the machine it runs on, so a
shortfall can be put down to the contract's own work or to what the listener does beyond it.

What: a receiver with nothing of the listener but its data-phase PDU helpers
(``listener.store_stream``). Like ``storescp --fork`` it forks one process per association and
accepts every proposed presentation context with its first transfer syntax, unchecked. Per
instance it writes the data set as received, then, level by level:

* ``bare``: nothing more (storescp's own work, in Python);
* ``fsync``: fsyncs the file and its folder before the success status;
* ``hash``: also SHA-256 of the data set (the spool names files by it);
* ``row``: also one row committed per instance in a SQLite database shared by the processes
  (WAL, ``synchronous=FULL``, ``BEGIN IMMEDIATE``, as ``hrct_triage.db.session`` sets it).

It does none of the listener's other work: no access policy, no association audit, no header
walk or UID validation, no worklist schema (studies, series), no group commit, no spool layout,
no metrics. Eight storescu processes (``TCP_NODELAY=1``) send 100 slices each to every level and
to ``storescp --fork``, taking turns; each server's CPU time per instance (its children's
included, see ``listener_throughput``), then the medians' ratios to storescp, are printed last.

It is a measuring stick, not a product path: it answers success to whatever it receives.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import shutil
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from listener_throughput import (
    Server,
    Turn,
    _free_port,
    _fresh,
    _settle,
    _wait_for_port,
    make_series,
    median_turn,
    send,
    start_storescp,
)

from hrct_triage.listener.store_stream import c_store_rsp, fragments, parse_command

LEVELS = ("bare", "fsync", "hash", "row")
_APPLICATION_CONTEXT = b"1.2.840.10008.3.1.1.1"
_IMPLEMENTATION_UID = b"1.2.826.0.1.3680043.10.543.1"  # any valid UID: nobody checks it
_MAX_PDU = 131072


def _exactly(conn: socket.socket, length: int) -> bytearray:
    buffer = bytearray(length)
    view, received = memoryview(buffer), 0
    while received < length:
        got = conn.recv_into(view[received:])
        if got == 0:
            raise EOFError
        received += got
    return buffer


def _pdu(conn: socket.socket) -> tuple[int, bytearray]:
    header = _exactly(conn, 6)
    pdu_type, _, length = struct.unpack(">BBL", header)
    return pdu_type, header + _exactly(conn, length)


def associate_ac(request: bytes | bytearray) -> bytes:
    """An A-ASSOCIATE-AC (PS3.8 9.3.3) accepting every presentation context of ``request`` (an
    A-ASSOCIATE-RQ PDU, header included) with the first transfer syntax it proposes."""
    items = b""
    position = 74  # PDU header 6, protocol version and reserved 4, AE titles 32, reserved 32
    while position < len(request):
        item_type, item_length = (
            request[position],
            struct.unpack_from(">H", request, position + 2)[0],
        )
        if item_type == 0x20:  # presentation context: id, then abstract and transfer syntaxes
            context_id, transfer_syntax = request[position + 4], b""
            sub = position + 8
            while sub < position + 4 + item_length:
                sub_type, sub_length = request[sub], struct.unpack_from(">H", request, sub + 2)[0]
                if sub_type == 0x40 and not transfer_syntax:
                    transfer_syntax = bytes(request[sub + 4 : sub + 4 + sub_length])
                sub += 4 + sub_length
            syntax = struct.pack(">BBH", 0x40, 0, len(transfer_syntax)) + transfer_syntax
            items += struct.pack(">BBHBBBB", 0x21, 0, 4 + len(syntax), context_id, 0, 0, 0)
            items += syntax
        position += 4 + item_length
    user = struct.pack(">BBHL", 0x51, 0, 4, _MAX_PDU)
    user += struct.pack(">BBH", 0x52, 0, len(_IMPLEMENTATION_UID)) + _IMPLEMENTATION_UID
    body = struct.pack(">HH", 1, 0) + bytes(request[10:42]) + b"\0" * 32  # echoes both AE titles
    body += struct.pack(">BBH", 0x10, 0, len(_APPLICATION_CONTEXT)) + _APPLICATION_CONTEXT
    body += items + struct.pack(">BBH", 0x50, 0, len(user)) + user
    return struct.pack(">BBL", 0x02, 0, len(body)) + body


def _text(command: dict[int, bytes], element: int) -> str:
    return command[element].decode("ascii").rstrip("\0 ")


def _serve_association(conn: socket.socket, out_dir: Path, level: int) -> None:
    """One association, in its own process: every C-STORE stored and answered with success."""
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    _, request = _pdu(conn)
    conn.sendall(associate_ac(request))
    folder = os.open(out_dir, os.O_RDONLY)
    rows = None
    if level >= LEVELS.index("row"):
        rows = sqlite3.connect(out_dir / "rows.sqlite", isolation_level=None, timeout=30)
        rows.execute("PRAGMA journal_mode=WAL")
        rows.execute("PRAGMA synchronous=FULL")
    fd, count, command, digest = -1, 0, {}, hashlib.sha256()
    while True:
        pdu_type, pdu = _pdu(conn)
        if pdu_type == 0x05:  # A-RELEASE-RQ: answer A-RELEASE-RP
            conn.sendall(struct.pack(">BBLL", 0x06, 0, 4, 0))
            return
        if pdu_type != 0x04:  # an abort, or anything else: stop
            return
        view = memoryview(pdu)
        for fragment in fragments(view):
            value = view[fragment.start : fragment.end]
            if fragment.is_command:
                command = parse_command(value)
                path = out_dir / f"{os.getpid()}.{count}.dcm"
                count += 1
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
                digest = hashlib.sha256()
                continue
            os.write(fd, value)
            if level >= LEVELS.index("hash"):
                digest.update(value)
            if not fragment.is_last:
                continue
            if level >= LEVELS.index("fsync"):
                os.fsync(fd)
                os.fsync(folder)
            os.close(fd)
            sop_instance = _text(command, 0x1000)
            if rows is not None:
                rows.execute("BEGIN IMMEDIATE")
                rows.execute(
                    "INSERT INTO instance VALUES (?, ?, ?)",
                    (sop_instance, str(path), digest.hexdigest()),
                )
                rows.execute("COMMIT")
            message_id = struct.unpack("<H", command[0x0110])[0]
            conn.sendall(
                c_store_rsp(
                    fragment.context_id, _text(command, 0x0002), message_id, 0, sop_instance
                )
            )


def _reap_children(_signal: int, _frame: object) -> None:
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass


def serve(out_dir: Path, port: int, level: int) -> None:
    """Accept associations on ``port`` for ever, one forked process each (``storescp --fork``)."""
    if level >= LEVELS.index("row"):
        # closed before any fork: a SQLite connection must not be carried into a child
        with contextlib.closing(sqlite3.connect(out_dir / "rows.sqlite")) as rows:
            rows.execute("PRAGMA journal_mode=WAL")
            rows.execute("CREATE TABLE instance (uid TEXT PRIMARY KEY, path TEXT, sha256 TEXT)")
    # Children reaped here rather than by the kernel (SIG_IGN), so that their CPU time adds up
    # in this process's, which ``Server.cpu_seconds`` reads.
    signal.signal(signal.SIGCHLD, _reap_children)
    with socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", port))
        server.listen(64)
        while True:
            conn, _ = server.accept()
            if os.fork() == 0:
                server.close()
                with contextlib.suppress(EOFError, OSError):
                    _serve_association(conn, out_dir, level)
                os._exit(0)
            conn.close()


def start_receiver(out_dir: Path, level: str) -> Server:
    port = _free_port()
    command = [sys.executable, __file__, "--serve", str(out_dir), str(port), level]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    _wait_for_port(port, process)
    return Server(process, port, "BARE")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="turns per level (medians compared)")
    parser.add_argument("--senders", type=int, default=8, help="concurrent storescu processes")
    parser.add_argument("--sender-slices", type=int, default=100, help="slices per sender")
    parser.add_argument(
        "--work", type=Path, default=Path(tempfile.gettempdir()) / "hrct-bench", help="phantoms"
    )
    parser.add_argument(
        "--serve", nargs=3, metavar=("DIR", "PORT", "LEVEL"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.serve:
        serve(Path(args.serve[0]), int(args.serve[1]), LEVELS.index(args.serve[2]))
        return
    args.work.mkdir(parents=True, exist_ok=True)
    folders = make_series(args.work, studies=args.senders, slices=args.sender_slices)
    scratch = Path(tempfile.mkdtemp(prefix="bare-", dir=args.work))
    turns: dict[str, list[Turn]] = {name: [] for name in (*LEVELS, "storescp")}
    try:
        for turn in range(args.repeat):
            for name in turns:
                out_dir = _fresh(scratch / f"{name}-{turn}")
                server = (
                    start_storescp(out_dir, fork=True)
                    if name == "storescp"
                    else start_receiver(out_dir, name)
                )
                try:
                    turns[name].append(send(server, folders))
                finally:
                    server.stop()
                    _settle(out_dir)
            print("  turn", turn + 1, "  ".join(f"{n} {t[-1].rate:.0f}" for n, t in turns.items()))
        medians = {name: median_turn(measured) for name, measured in turns.items()}
        print(f"{args.senders} senders x {args.sender_slices} slices, server CPU per instance:")
        for name, median in medians.items():
            print(f"  {name:8s} {median.server_cpu_ms:.2f} ms  ({median.rate:.0f} instances/s)")
        for name in LEVELS:
            ratio = medians[name].rate / medians["storescp"].rate
            print(f"ratio bare receiver, {name:5s} / storescp --fork: {ratio:.2f}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
