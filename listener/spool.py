"""The spool: every stored instance as received, at a path made only from validated UIDs.

``spool/<study>/<series>/<sop>.<sha16>.dcm``: the content hash in the name means a changed
version of an instance never overwrites the acknowledged one before the worklist has switched to
it, and an identical resend lands on the same name. A file is written to a hidden temporary name
in its folder, fsynced, renamed, and the folder fsynced: when ``write_instance`` returns the file
is whole and on disk, and a crash leaves at most a temporary file that start-up removes.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import struct
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from db.storage import TEMP_SUFFIX, validate_uid

# Our Implementation Class UID (PS3.7 D.3.3.2) in the File Meta of spooled files; a UUID-derived
# UID under 2.25 needs no registered root.
IMPLEMENTATION_CLASS_UID = "2.25." + str(
    uuid.uuid5(uuid.NAMESPACE_URL, "https://github.com/hrct-triage/listener").int
)
IMPLEMENTATION_VERSION = "HRCT_TRIAGE_01"
_HASH_CHARS = 16  # 64 bits of the SHA-256 tell versions of one instance apart


@dataclass(frozen=True)
class SpooledFile:
    path: Path
    size_bytes: int
    sha256: str


def instance_dir(spool_dir: Path, study_uid: str, series_uid: str) -> Path:
    """``spool/<study>/<series>``; raises InvalidUID before any path is made."""
    validate_uid(study_uid, "StudyInstanceUID")
    validate_uid(series_uid, "SeriesInstanceUID")
    return spool_dir / study_uid / series_uid


def instance_path(
    spool_dir: Path, study_uid: str, series_uid: str, sop_uid: str, sha256: str
) -> Path:
    """Where one version of an instance lies; raises InvalidUID before any path is made."""
    validate_uid(sop_uid, "SOPInstanceUID")
    if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
        raise ValueError("sha256 must be 64 lowercase hex digits")
    folder = instance_dir(spool_dir, study_uid, series_uid)
    return folder / f"{sop_uid}.{sha256[:_HASH_CHARS]}.dcm"


def file_meta(sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str) -> bytes:
    """Preamble, ``DICM`` and File Meta Information (PS3.10 7.1) for a received data set.

    Deterministic on purpose (no time, no sender): the same data set always gives the same file,
    so an identical resend hashes the same and changes nothing.
    """
    elements = b"".join(
        (
            _meta_element(0x0001, b"OB", b"\x00\x01"),
            _meta_element(0x0002, b"UI", _ui(sop_class_uid)),
            _meta_element(0x0003, b"UI", _ui(sop_instance_uid)),
            _meta_element(0x0010, b"UI", _ui(transfer_syntax_uid)),
            _meta_element(0x0012, b"UI", _ui(IMPLEMENTATION_CLASS_UID)),
            _meta_element(0x0013, b"SH", IMPLEMENTATION_VERSION.encode("ascii")),
        )
    )
    group_length = _meta_element(0x0000, b"UL", struct.pack("<L", len(elements)))
    return b"\x00" * 128 + b"DICM" + group_length + elements


def _ui(value: str) -> bytes:
    raw = value.encode("ascii")
    return raw + b"\x00" if len(raw) % 2 else raw


def _meta_element(element: int, vr: bytes, value: bytes) -> bytes:
    if len(value) % 2:
        value += b" "
    if vr == b"OB":
        return struct.pack("<HH2sHL", 0x0002, element, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


def content_hash(meta: bytes, dataset: bytes | memoryview) -> str:
    digest = hashlib.sha256(meta)
    digest.update(dataset)
    return digest.hexdigest()


def write_instance(
    path: Path, meta: bytes, dataset: bytes | memoryview, sha256: str
) -> SpooledFile:
    """Write File Meta + data set to ``path`` durably (see the module docstring)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}{TEMP_SUFFIX}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    try:
        buffers = [memoryview(meta), memoryview(dataset)]
        while buffers:
            written = os.writev(fd, buffers)
            while buffers and written >= len(buffers[0]):
                written -= len(buffers[0])
                buffers.pop(0)
            if buffers and written:
                buffers[0] = buffers[0][written:]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        temporary.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(temporary, path)
    fsync_dir(path.parent)
    return SpooledFile(path, len(meta) + len(dataset), sha256)


def fsync_dir(folder: Path) -> None:
    """Make a rename or unlink in ``folder`` survive a power cut."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def free_bytes(spool_dir: Path) -> int:
    """Free space for an unprivileged writer on the spool's file system."""
    return shutil.disk_usage(spool_dir).free


def spooled_files(spool_dir: Path) -> Iterator[Path]:
    """Every finished instance file in the spool (temporary files excluded)."""
    if spool_dir.exists():
        for path in spool_dir.glob("*/*/*.dcm"):
            if not path.name.startswith("."):
                yield path


def remove_partial_files(spool_dir: Path) -> int:
    """Delete temporary files a killed listener left behind; return how many."""
    removed = 0
    if not spool_dir.exists():
        return 0
    for leftover in spool_dir.rglob(f".*{TEMP_SUFFIX}"):
        leftover.unlink(missing_ok=True)
        removed += 1
    return removed
