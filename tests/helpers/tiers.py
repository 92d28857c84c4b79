"""The test tiers: the fixtures that put a test in a tier, and the check that a test uses only
what its markers name.

A marker (registered in ``pyproject.toml``) tells what the machine must have for a test
(``services``: PostgreSQL and Redis; ``dcmtk``: DCMTK and dicom3tools; ``orthanc``; ``browser``:
Chromium; ``gpu``: CUDA), so that ``-m "not ..."`` leaves a tier that runs where only Python is
installed. Markers written by hand
drift, so the check below watches what a test really does, through Python's audit hooks: every
program it starts and every connection it opens to the PostgreSQL or Redis port. A test that runs
DCMTK or reaches Redis without its marker fails on the machine that has them, not only on the one
that has not. PostgreSQL is reached through libpq, below Python's sockets, so its fixture checks
the marker instead (``tests/conftest.py``).
"""

from __future__ import annotations

import contextlib
import os
import shlex
import sys
from collections.abc import Iterable
from pathlib import PurePath
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.helpers.databases import PG_ADMIN, REDIS_URL

# Fixtures whose use puts a test in a tier: the conftest's collection hook adds the marker.
MARKER_OF_FIXTURE = {
    "postgresql_url": "services",
    "pacs": "dcmtk",  # DCMTK storescp
    "orthanc": "orthanc",
    "stow_peer": "orthanc",  # Orthanc with its DICOMweb plugin
    "own_postgres": "services",  # tests/faults start their own servers from the packages
    "own_redis": "services",
}

# The programs of Debian's dcmtk and dicom3tools packages (``dpkg -L dcmtk dicom3tools``).
_DCMTK_PROGRAMS = """
cda2dcm dcm2json dcm2pdf dcm2pnm dcm2xml dcmcjpeg dcmcjpls dcmconv dcmcrle dcmdjpeg dcmdjpls dcmdrle
dcmdspfn dcmdump dcmftest dcmgpdir dcmicmp dcmj2pnm dcml2pnm dcmmkcrv dcmmkdir dcmmklut dcmodify
dcmp2pgm dcmprscp dcmprscu dcmpschk dcmpsmk dcmpsprt dcmpsrcv dcmpssnd dcmqridx dcmqrscp dcmqrti
dcmquant dcmrecv dcmscale dcmsend dcmsign dcod2lum dconvlum drtdump dsr2html dsr2xml dsrdump
dump2dcm echoscu findscu getscu img2dcm movescu pdf2dcm stl2dcm storescp storescu termscu wlmscpfs
xml2dcm xml2dsr
dcdirdmp dcdump dcentvfy dcfile dchist dciodvfy dckey dcposn dcsort dcsrdump dcstats dctable
dctopgm8 dctopgx dctopnm dcunrgb jpegdump
"""
_DCMTK = frozenset(_DCMTK_PROGRAMS.split())
_SHELLS = frozenset({"sh", "bash", "dash"})
_SERVERS = frozenset({"redis-server", "postgres", "pg_ctl", "pg_ctlcluster", "initdb"})


def marker_for_program(argv: Iterable[str]) -> str | None:
    """The marker a test needs to start this command line, or None if any machine has it."""
    words = [str(word) for word in argv]
    if not words:
        return None
    name = PurePath(words[0]).name
    if name in _DCMTK:
        return "dcmtk"
    if name in ("Orthanc", "OrthancRecoverCompressedFile"):
        return "orthanc"
    if name in _SERVERS:
        return "services"
    # Playwright starts its driver (a node program in the playwright package), which starts
    # Chromium; Chromium may be started directly too.
    if any("playwright" in word or PurePath(word).name == "chromium" for word in words):
        return "browser"
    return None


def _service_ports() -> frozenset[int]:
    ports = {5432, 6379}
    for url in (PG_ADMIN, REDIS_URL, os.environ.get("HRCT_DATABASE_URL", "")):
        try:
            port = urlsplit(url).port
        except ValueError:
            continue
        if port is not None:
            ports.add(port)
    return frozenset(ports)


class TierAudit:
    """Watches the running test through ``sys.addaudithook`` (a hook cannot be removed, so the
    one hook installed per session consults whichever test runs now)."""

    def __init__(self) -> None:
        self.item: pytest.Item | None = None
        self.problems: list[str] = []
        self._ports = _service_ports()
        self._cuda_was_initialised = False
        sys.addaudithook(self._hear)

    def start(self, item: pytest.Item) -> None:
        self.item, self.problems = item, []
        self._cuda_was_initialised = _cuda_initialised()

    def finish(self) -> list[str]:
        """What the test used without its marker, from setup to teardown."""
        item = self.item
        if item is not None and not self._cuda_was_initialised and _cuda_initialised():
            self._need(item, "gpu", "initialised CUDA")
        problems = sorted(set(self.problems))
        self.item, self.problems = None, []
        return problems

    def _hear(self, event: str, args: tuple[object, ...]) -> None:
        item = self.item
        if item is None or event not in ("subprocess.Popen", "socket.connect"):
            return
        try:
            self._check(item, event, args)
        except Exception as error:  # an audit hook that raises would fail the call it audits
            self.problems.append(f"the tier check could not read {event} {args!r}: {error!r}")

    def _check(self, item: pytest.Item, event: str, args: tuple[Any, ...]) -> None:
        if event == "subprocess.Popen":
            # (executable, argv as a list, cwd, env); a shell's script is split into its words
            executable, argv = args[0], args[1]
            words = [os.fsdecode(executable), *(os.fsdecode(word) for word in argv[1:])]
            if PurePath(words[0]).name in _SHELLS and words[1:2] == ["-c"] and len(words) > 2:
                with contextlib.suppress(ValueError):  # unbalanced quotes: the shell's own error
                    words = shlex.split(words[2]) or words
            marker = marker_for_program(words)
            if marker is not None:
                self._need(item, marker, f"started {PurePath(words[0]).name}")
        else:  # socket.connect: (socket, address)
            address = args[1]
            if isinstance(address, tuple) and len(address) >= 2 and address[1] in self._ports:
                self._need(item, "services", f"connected to port {address[1]}")

    def _need(self, item: pytest.Item, marker: str, what: str) -> None:
        if item.get_closest_marker(marker) is None:
            self.problems.append(f"{what} but is not marked {marker}")


def _cuda_initialised() -> bool:
    torch = sys.modules.get("torch")
    return bool(torch is not None and torch.cuda.is_initialized())
