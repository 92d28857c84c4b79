"""The spool: every stored instance as received, at a path made only from validated UIDs.

``spool/<study>/<series>/<sop>.<sha16>.dcm``: the content hash in the name means a changed
version of an instance never overwrites the acknowledged one before the worklist has switched to
it, and an identical resend lands on the same name.

A C-STORE read by the listener's own reader is written while its data set arrives, to a file
with no name in the spool folder (``Streaming``, ``O_TMPFILE``), and hard-linked to its final name
once stored. Otherwise (pynetdicom's path, or a file system that cannot make nameless files) a
file is written whole to a hidden temporary name in its folder, hard-linked to its final name
and the temporary name dropped. A link never replaces: a final name only ever holds whole
content, and a file already there is never swapped for a copy that is not yet on disk. Then the
file and its folder are fsynced. A folder made for the instance has its parent fsynced too
(``make_folder``). When ``write_instance`` returns, the file and its name are on disk.

``start_instance`` returns before those fsyncs are done, so that the listener commits the
instance's worklist row first or meanwhile. A C-STORE alone in its process has them run in other
threads, at the same time as each other and as the commit (two fsyncs in flight cost about one
flush, where one after the other cost two); beside other C-STOREs, where the CPUs rather than the
flushes are the limit, they run in ``Syncing.wait``, after the commit (see ``start_instance``).
Success is answered only after ``Syncing.wait``. A power cut after the commit but
before the fsyncs can leave a row whose file is partial or missing; such a row belongs to a study
still receiving (its association was open), and start-up reconciliation checks every file of
those studies against its row's hash (``listener.reconcile``). A changed version of an instance
is different: its row replaces the acknowledged one, so it is committed only once its file is on
disk (``hrct_triage.listener.group_commit``).

A power cut before the fsyncs can leave a final name whose content never reached the disk. Such
a file was never acknowledged (success comes only after the fsyncs); when the worklist does not
name it, start-up reconciliation tells it apart by its content hash, which must match its name
(``name_matches_content``). A crash also leaves at most temporary files, which start-up
removes.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import struct
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent import futures
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from hrct_triage.common.dicom_elements import explicit_element, uid_value
from hrct_triage.common.storage import TEMP_SUFFIX, SpooledFile, fsync_dir, validate_uid

# Our Implementation Class UID (PS3.7 D.3.3.2) in the File Meta of spooled files: fixed, under
# 2.25 (a UUID's decimal value), so it needs no registered root. It is part of every spooled
# file's bytes, hence of its content hash: changing it makes every resend a new version.
IMPLEMENTATION_CLASS_UID = "2.25.73833319994810865772592426700708241355"
IMPLEMENTATION_VERSION = "HRCT_TRIAGE_01"  # SH of an even length: written as it is
_PREAMBLE = b"\x00" * 128 + b"DICM"
_META_VERSION = explicit_element(0x00020001, b"OB", b"\x00\x01")
_META_IMPLEMENTATION = explicit_element(
    0x00020012, b"UI", uid_value(IMPLEMENTATION_CLASS_UID)
) + explicit_element(0x00020013, b"SH", IMPLEMENTATION_VERSION.encode("ascii"))
_HASH_CHARS = 16  # 64 bits of the SHA-256 tell versions of one instance apart
# The fsyncs of spooled files and of their folders run here, beside the worklist commit (fsync
# releases the GIL): two per C-STORE in flight, for every association of the process.
_SYNCS = ThreadPoolExecutor(max_workers=32, thread_name_prefix="hrct-fsync")
# Instance folders whose entries this process has made durable (``make_folder``), newest last.
_DURABLE_FOLDERS: OrderedDict[Path, None] = OrderedDict()
_DURABLE_FOLDERS_KEPT = 1024
_DURABLE_LOCK = threading.Lock()
# Nameless files opened for C-STOREs still to come (``Streaming.prepare``), per spool folder.
_SPARES: dict[Path, list[int]] = {}
_SPARES_KEPT = 4  # each is an empty inode and a descriptor, nothing on the disk
_SPARES_LOCK = threading.Lock()


def instance_dir(spool_dir: Path, study_uid: str, series_uid: str) -> Path:
    """``spool/<study>/<series>``; raises InvalidUID before any path is made."""
    validate_uid(study_uid, "StudyInstanceUID")
    validate_uid(series_uid, "SeriesInstanceUID")
    return spool_dir / study_uid / series_uid


def _instance_name(sop_uid: str, sha256: str) -> str:
    """``<sop>.<sha16>.dcm``, for a UID ``start_instance`` has validated and a hex digest."""
    return f"{sop_uid}.{sha256[:_HASH_CHARS]}.dcm"


def file_meta(sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str) -> bytes:
    """Preamble, ``DICM`` and File Meta Information (PS3.10 7.1) for a received data set.

    Deterministic on purpose (no time, no sender): the same data set always gives the same file,
    so an identical resend hashes the same and changes nothing. The bytes are those of pydicom's
    ``write_file_meta_info`` (tests/test_spool.py compares them), built here because pydicom's
    writer takes about a hundred times longer, a sizeable share of the listener's CPU time per
    instance (``benchmarks/file_meta.py`` prints the ratio).
    """
    elements = b"".join(
        (
            _META_VERSION,
            explicit_element(0x00020002, b"UI", uid_value(sop_class_uid)),
            explicit_element(0x00020003, b"UI", uid_value(sop_instance_uid)),
            explicit_element(0x00020010, b"UI", uid_value(transfer_syntax_uid)),
            _META_IMPLEMENTATION,
        )
    )
    group_length = explicit_element(0x00020000, b"UL", struct.pack("<L", len(elements)))
    return _PREAMBLE + group_length + elements


def content_hash(meta: bytes, dataset: bytes | memoryview) -> str:
    digest = hashlib.sha256(meta)
    digest.update(dataset)
    return digest.hexdigest()


def write_instance(
    folder: Path, sop_uid: str, meta: bytes, dataset: bytes | memoryview
) -> SpooledFile:
    """Write File Meta + data set durably to ``folder`` (see the module docstring)."""
    return start_instance(folder, sop_uid, meta, dataset).wait()


@dataclass
class Syncing:
    """A spooled file whose name is published and whose fsyncs (the file's and its folder's)
    are in flight in other threads, or deferred to ``wait``; ``wait`` returns once both are
    done, or raises what one raised (again on every later call)."""

    spooled: SpooledFile
    _syncs: tuple[Future[None], ...] = ()
    _deferred: Callable[[], None] | None = None
    _error: BaseException | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def wait(self) -> SpooledFile:
        if self._deferred is not None or self._error is not None:
            with self._lock:  # the group committer may call it for a replacing row
                deferred, self._deferred = self._deferred, None
                if deferred is not None:
                    try:
                        deferred()
                    except BaseException as error:
                        self._error = error
                if self._error is not None:
                    raise self._error
        for sync in self._syncs:
            sync.result()
        return self.spooled


def start_instance(
    folder: Path,
    sop_uid: str,
    meta: bytes,
    dataset: bytes | memoryview,
    *,
    overlap: bool = True,
) -> Syncing:
    """Write File Meta + data set to ``folder`` under its content's name and start making it
    durable: the caller commits the instance's worklist row, and answers only after ``wait``.
    Raises InvalidUID before any file is made when ``sop_uid`` could not name one.

    ``overlap`` is for a C-STORE that has the process to itself, where the time to the answer
    is what counts: the content hash (the name) is computed in another thread while the file is
    written, and the file's and folder's fsyncs run in other threads while the caller commits
    (hashing, writing and fsync release the GIL). When other C-STOREs are being stored at the
    same time the CPUs are the limit instead, and each hand-off to a pool thread costs two
    context switches and a turn at the GIL; so without ``overlap`` the same work runs in the
    caller's thread, the fsyncs in ``wait`` (after the commit, file then folder)."""
    validate_uid(sop_uid, "SOPInstanceUID")
    if overlap:
        hashing = _SYNCS.submit(content_hash, meta, dataset)
    else:
        hashing = Future()
        hashing.set_result(content_hash(meta, dataset))
    try:
        make_folder(folder)
        temporary = folder / f".{sop_uid}.{uuid.uuid4().hex}{TEMP_SUFFIX}"
        try:
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        except FileNotFoundError:  # the folder was removed since (``purge``): make it again
            make_folder(folder, again=True)
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    except BaseException:
        futures.wait([hashing])  # it reads ``dataset``, which the caller may reuse
        raise
    try:
        _write_all(fd, meta, dataset)
        sha256 = hashing.result()
        path = folder / _instance_name(sop_uid, sha256)
        published = _publish(fd, temporary, path)
    except BaseException:
        futures.wait([hashing])
        os.close(fd)
        temporary.unlink(missing_ok=True)
        raise
    spooled = SpooledFile(path, len(meta) + len(dataset), sha256)
    if published is None:  # no hard links here: already synced the classic way
        os.close(fd)
        return Syncing(spooled)
    return _syncing(fd, spooled, published, overlap=overlap)


def _syncing(fd: int, spooled: SpooledFile, published: bool, *, overlap: bool) -> Syncing:
    """Make the file just given its name (open as ``fd``, which this closes) and its folder
    durable: in pool threads with ``overlap``, else in ``Syncing.wait``. ``published`` is False
    when a file of that name (the same bytes) was already there: those are made durable."""
    folder = spooled.path.parent
    if not published:
        os.close(fd)
        fd = os.open(spooled.path, os.O_RDONLY)
    if not overlap:
        return Syncing(spooled, _deferred=partial(_fsync_file_and_folder, fd, folder))
    return Syncing(spooled, (_SYNCS.submit(_fsync_and_close, fd), _SYNCS.submit(fsync_dir, folder)))


class Streaming:
    """An instance written to the spool while its data set arrives, as a file with no name yet
    (``O_TMPFILE`` in the spool folder) that ``publish`` links under its content's name.

    Why: each fragment is hashed and copied into the page cache while it is still in the CPU's
    cache, straight after it was read off the socket. Written whole at the end, the 512 KiB of a
    CT slice are read back from memory twice more (hash, then write): on the development VM
    that cost 1.6-1.9 ms of CPU per instance against 1.0-1.6 ms streamed (a microbenchmark).
    A file that is never published has no name, so a refused or broken-off instance leaves
    nothing behind, even after a crash.

    ``meta`` is the File Meta the caller built from the C-STORE request; ``publish`` is only
    for a data set whose own UIDs gave the same (``listener.handlers`` checks). A write error is
    kept and raised by ``publish``.
    """

    def __init__(self, fd: int, meta: bytes) -> None:
        self.meta = meta
        self.size = 0  # bytes written: File Meta and data set so far
        self._fd: int | None = fd
        self._digest = hashlib.sha256()
        self._error: OSError | None = None
        self.add(meta)

    @classmethod
    def open(cls, spool_dir: Path, meta: bytes) -> Streaming | None:
        """A nameless file in ``spool_dir``, or None where the file system cannot make one (the
        caller then writes the instance whole, ``start_instance``)."""
        fd = _spare(spool_dir)
        if fd is None:
            try:
                fd = _nameless(spool_dir)
            except OSError:
                return None
        return cls(fd, meta)

    @staticmethod
    def prepare(spool_dir: Path) -> None:
        """Open a nameless file in ``spool_dir`` for a C-STORE still to come, which ``open``
        then takes. Why: making an inode is a file system's slow step (44 us in a quiet folder
        on the development VM's ext4, 0.3 ms and more after thousands of files were removed),
        and a reader calls this just after answering an instance, while the sender reads its
        next file, instead of on the way to the next answer. A few are kept per process; any
        failure here leaves ``open`` to try again."""
        with _SPARES_LOCK:
            if len(_SPARES.get(spool_dir, ())) >= _SPARES_KEPT:
                return
        try:
            fd = _nameless(spool_dir)
        except OSError:
            return
        with _SPARES_LOCK:
            spares = _SPARES.setdefault(spool_dir, [])
            if len(spares) < _SPARES_KEPT:
                spares.append(fd)
                return
        os.close(fd)

    def add(self, fragment: bytes | memoryview) -> None:
        """Hash and write the next bytes of the data set."""
        if self._fd is None or self._error is not None:
            return
        self._digest.update(fragment)
        try:
            _write_all(self._fd, fragment, b"")
        except OSError as error:
            self._error = error
            return
        self.size += len(fragment)

    def publish(self, folder: Path, sop_uid: str, *, overlap: bool) -> Syncing | None:
        """Give the file its name in ``folder`` and start making it durable, as
        ``start_instance`` does; None (the file dropped) where no name can be linked to it here,
        so the caller writes the instance whole instead. Raises the write's error, if one
        failed, or InvalidUID."""
        validate_uid(sop_uid, "SOPInstanceUID")
        if self._error is not None:
            self.close()
            raise self._error
        fd = self._fd
        if fd is None:
            raise ValueError("publish of a closed streaming file")
        sha256 = self._digest.hexdigest()
        path = folder / _instance_name(sop_uid, sha256)
        make_folder(folder)
        try:
            published = _link_nameless(fd, path)
        except FileNotFoundError:  # the folder was removed since (``purge``): make it again
            make_folder(folder, again=True)
            published = _link_nameless(fd, path)
        except OSError:  # no /proc, or no hard links on this file system
            self.close()
            return None
        self._fd = None  # _syncing closes it
        return _syncing(fd, SpooledFile(path, self.size, sha256), published, overlap=overlap)

    def close(self) -> None:
        """Drop the file unless it was published (no name: its space is freed at once)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def __del__(self) -> None:  # an association thread that ended mid-instance
        self.close()


def close_spares(spool_dir: Path) -> None:
    """Close the nameless files prepared in ``spool_dir`` (the listener is stopping); having no
    name, they leave nothing behind."""
    with _SPARES_LOCK:
        spares = _SPARES.pop(spool_dir, [])
    for fd in spares:
        os.close(fd)


def _nameless(spool_dir: Path) -> int:
    return os.open(spool_dir, os.O_TMPFILE | os.O_WRONLY, 0o640)


def _spare(spool_dir: Path) -> int | None:
    """A nameless file ``Streaming.prepare`` opened in ``spool_dir``, if one is left."""
    with _SPARES_LOCK:
        spares = _SPARES.get(spool_dir)
        return spares.pop() if spares else None


_PROC: int | None = None  # an O_PATH descriptor of /proc, for ``_link_nameless``


def _link_nameless(fd: int, path: Path) -> bool:
    """Link the ``O_TMPFILE`` file open as ``fd`` to ``path``: True, or False when a file of
    that name is already there. ``linkat`` with ``AT_SYMLINK_FOLLOW`` on ``/proc/self/fd/N`` is
    the unprivileged way (``AT_EMPTY_PATH`` needs CAP_DAC_READ_SEARCH); Python uses ``linkat``
    only when given a directory descriptor, hence ``_PROC``."""
    global _PROC
    with _DURABLE_LOCK:
        if _PROC is None:
            _PROC = os.open("/proc", os.O_PATH | os.O_DIRECTORY)
    try:
        os.link(f"self/fd/{fd}", path, src_dir_fd=_PROC, follow_symlinks=True)
    except FileExistsError:
        return False
    return True


def _fsync_file_and_folder(fd: int, folder: Path) -> None:
    try:
        _fsync_and_close(fd)
    finally:
        fsync_dir(folder)


def _fsync_and_close(fd: int) -> None:
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, meta: bytes | memoryview, dataset: bytes | memoryview) -> None:
    buffers = [memoryview(meta), memoryview(dataset)]
    while buffers:
        written = os.writev(fd, buffers)
        while buffers and written >= len(buffers[0]):
            written -= len(buffers[0])
            buffers.pop(0)
        if buffers and written:
            buffers[0] = buffers[0][written:]


def _publish(fd: int, temporary: Path, path: Path) -> bool | None:
    """Give the whole temporary file (open as ``fd``) its final name: True once linked, False
    (temporary removed) when a file of that name (same hash) is already there, None when the
    file system has no hard links and the file was renamed and synced one flush after the other.
    """
    try:
        os.link(temporary, path)
    except FileExistsError:
        temporary.unlink()
        return False
    except OSError as error:
        if error.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK):
            raise
        os.fsync(fd)
        os.replace(temporary, path)
        fsync_dir(path.parent)
        return None
    temporary.unlink()
    return True


def make_folder(folder: Path, *, again: bool = False) -> None:
    """Create an instance folder (``spool/<study>/<series>``) so that it survives a power cut:
    the series and study folders' parents are fsynced once per process, even when the folders
    already existed (another thread or process may have created them without its fsync done
    yet). Later instances of the series find it in a small cache and pay nothing; ``again``
    skips the cache (the folder was removed since)."""
    with _DURABLE_LOCK:
        if folder in _DURABLE_FOLDERS and not again:
            _DURABLE_FOLDERS.move_to_end(folder)
            return
    folder.mkdir(parents=True, exist_ok=True)
    fsync_dir(folder.parent)
    fsync_dir(folder.parent.parent)
    with _DURABLE_LOCK:
        _DURABLE_FOLDERS[folder] = None
        while len(_DURABLE_FOLDERS) > _DURABLE_FOLDERS_KEPT:
            _DURABLE_FOLDERS.popitem(last=False)


def name_matches_content(path: Path, sha256: str) -> bool:
    """Whether a spooled file's name carries this content hash (``<sop>.<sha16>.dcm``)."""
    stem = path.name.removesuffix(".dcm")
    return "." in stem and stem.rsplit(".", 1)[1] == sha256[:_HASH_CHARS]


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
