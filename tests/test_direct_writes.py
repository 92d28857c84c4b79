"""Spool files written past the page cache (``listener.direct_writes``) hold exactly the bytes
given, whatever their size and however they arrive, and the write really is direct here."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import pytest

from listener.direct_writes import ALIGNMENT, CHUNK, DirectWriter


def _direct_file(folder: Path) -> int:
    return os.open(folder / "f", os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o640)


@pytest.mark.parametrize(
    "size",
    [0, 1, ALIGNMENT - 1, ALIGNMENT, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 700_001],
)
def test_the_file_is_the_bytes_given(tmp_path: Path, size: int) -> None:
    # given bytes arriving in uneven pieces, as the fragments of a data set do
    data = os.urandom(size)
    fd = _direct_file(tmp_path)
    try:
        writer = DirectWriter(fd)
        for start in range(0, size, 70_001):
            writer.write(data[start : start + 70_001])
        # when the writer finishes
        assert writer.finish() == size
        # then the file holds exactly those bytes, written past the page cache
        assert writer.direct
        assert fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT
    finally:
        os.close(fd)
    assert (tmp_path / "f").read_bytes() == data


def test_a_thread_reuses_its_buffer_and_a_finished_writer_refuses_more(tmp_path: Path) -> None:
    fd = _direct_file(tmp_path)
    try:
        first = DirectWriter(fd)
        buffer = first._buffer
        first.write(b"a" * 10)
        first.finish()
        with pytest.raises(ValueError):
            first.write(b"b")
        # the next instance of the association's reader takes the same buffer: no new mapping
        # (and no fresh pages to fault in) per instance
        assert DirectWriter(fd)._buffer is buffer
        # while a writer holds it, another writer in the same thread gets its own
        assert DirectWriter(fd)._buffer is not buffer
    finally:
        os.close(fd)
