"""``worker.memory``: with its settings a freed large block is reused rather than unmapped, so
allocating the next one costs no page faults. Each case runs in a fresh interpreter, since the
settings last for the whole process."""

from __future__ import annotations

import subprocess
import sys

_PROBE = """
import resource, sys
from hrct_triage.worker.memory import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "kept" else None
def touched(size):
    block = bytearray(size)  # zero-filled: every page is written
    block[::4096] = b"x" * len(block[::4096])
    return block
size = 64 * 1024 * 1024
first = touched(size)
del first
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
second = touched(size)
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults_of_second_block(mode: str) -> tuple[str, int]:
    result = subprocess.run(
        [sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True
    )
    applied, faults = result.stdout.split()
    return applied, int(faults)


def test_a_freed_block_is_reused_without_page_faults() -> None:
    # given the same two 64 MiB allocations, the first freed before the second
    _, default_faults = _faults_of_second_block("default")
    applied, kept_faults = _faults_of_second_block("kept")

    # then glibc's default maps the second afresh (a fault per 4 KiB page) and ours reuses
    assert applied == "True"
    assert default_faults > 10_000
    assert kept_faults < default_faults / 20
