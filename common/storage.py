"""Durable files and UID validation, shared by the listener's spool and the worker's outputs.

A write is durable before anyone is told it happened: a temporary file in the target folder is
written and fsynced, renamed over the final name, and the folder is fsynced so the rename itself
survives a power cut.
"""

from __future__ import annotations

import hashlib
import os
import re
import uuid
from dataclasses import dataclass
from pathlib import Path

from hrct_triage.common.errors import DicomInputError

# DICOM PS3.5 9.1: digits and dots, no empty or zero-padded components, at most 64 characters.
_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
TEMP_SUFFIX = ".partial"


class InvalidUID(DicomInputError):
    """A UID from the network that must not name a file."""


def validate_uid(value: object, name: str) -> str:
    """Return ``value`` as a UID string, or raise InvalidUID naming the attribute."""
    text = str(value).strip().rstrip("\x00") if value is not None else ""
    if not text:
        raise InvalidUID(f"{name} is missing")
    if len(text) > 64:
        raise InvalidUID(f"{name} is longer than 64 characters")
    if _UID.match(text) is None:
        raise InvalidUID(f"{name} {text[:64]!r} is not a valid UID")
    return text


@dataclass(frozen=True)
class SpooledFile:
    """A file on disk with its name: where it is, its size and the SHA-256 of its content."""

    path: Path
    size_bytes: int
    sha256: str


def write_durably(path: Path, data: bytes) -> SpooledFile:
    """Write ``data`` to ``path`` so that it is complete and on disk when this returns."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}{TEMP_SUFFIX}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        temporary.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(temporary, path)
    fsync_dir(path.parent)
    return SpooledFile(path, len(data), hashlib.sha256(data).hexdigest())


def fsync_dir(folder: Path) -> None:
    """Make a rename or unlink in ``folder`` survive a power cut."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
