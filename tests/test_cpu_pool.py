"""The worker's CPU thread pool: same results as a plain loop, sized by HRCT_CPU_THREADS."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest

from hrct_triage.worker.method import cpu_pool
from hrct_triage.worker.method.cpu_pool import ENV_THREADS, cpu_map, cpu_threads
from hrct_triage.worker.method.preprocess import lung_slices


def test_results_in_order_on_pool_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_THREADS, "3")
    names: set[str] = set()

    def square(x: int) -> int:
        names.add(threading.current_thread().name)
        return x * x

    assert cpu_map(square, range(50)) == [x * x for x in range(50)]
    assert names and all(name.startswith("hrct-cpu") for name in names)


def test_one_thread_runs_inline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_THREADS, "1")
    assert (
        cpu_map(lambda _: threading.current_thread().name, range(4))
        == [threading.current_thread().name] * 4
    )


def test_first_exception_propagates(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_THREADS, "2")

    def fail_on_three(x: int) -> int:
        if x == 3:
            raise KeyError(x)
        return x

    with pytest.raises(KeyError):
        cpu_map(fail_on_three, range(6))


def test_thread_count(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_THREADS, raising=False)
    assert cpu_threads() == len(os.sched_getaffinity(0))
    monkeypatch.setenv(ENV_THREADS, "0")
    with pytest.raises(ValueError, match=ENV_THREADS):
        cpu_threads()


def test_forked_child_builds_its_own_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_THREADS, "2")
    cpu_map(abs, [-1, -2])  # the parent's pool exists now
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: the inherited pool has no threads; a fresh one must do the work
        os.close(read)
        ok = cpu_pool._pool is None and cpu_map(abs, [-1, -2, -3]) == [1, 2, 3]
        os.write(write, b"1" if ok else b"0")
        os._exit(0)
    os.close(write)
    _, status = os.waitpid(pid, 0)
    assert os.read(read, 1) == b"1" and status == 0


def test_lung_slices_same_on_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks on threads select exactly the slices the inline loop does."""
    rng = np.random.default_rng(7)
    hu = rng.normal(0.0, 40.0, size=(37, 96, 96)).astype(np.float32)  # soft tissue
    hu[:, :4], hu[:, -4:] = -1000.0, -1000.0  # air around the body
    for index in range(37):  # lungs of growing size, some too small
        radius = index % 19
        hu[index, 48 - radius : 48 + radius, 20 : 20 + 2 * radius] = -850.0
    monkeypatch.setenv(ENV_THREADS, "1")
    inline = lung_slices(hu, pixel_spacing=(2.0, 2.0))
    monkeypatch.setenv(ENV_THREADS, "4")
    threaded = lung_slices(hu, pixel_spacing=(2.0, 2.0))
    assert 0 < inline.sum() < len(inline)
    np.testing.assert_array_equal(threaded, inline)
