"""A child process that ends with its parent, however the parent ends.

``hrct-triage up`` and ``demo`` run Celery workers as child processes. When the parent is killed
with SIGKILL (the kernel's OOM killer, a supervisor's last resort) it cannot stop them, and a
worker left behind holds its leases and its memory beside the next ``up``'s. Linux can send a
signal to a process when its parent dies (``prctl(PR_SET_PDEATHSIG)``); the child asks for it
as it starts, since asking between ``fork`` and ``exec`` (``preexec_fn``) is unsafe in a
parent that runs threads, as the listener does.

The request is made by the child after it was started, so the parent may already be gone by
then: the child compares its parent's pid with the one it was given, and ends itself if they
differ. The kernel sends the signal when the parent *thread* that started the child ends, so
the parent starts its children from its main thread.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys

log = logging.getLogger("hrct.processes")

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(parent_pid: int, signum: int = signal.SIGTERM) -> None:
    """Have the kernel send ``signum`` to this process when its parent ``parent_pid`` ends; if
    it has already ended, send it now. Elsewhere than on Linux, log that it cannot be done."""
    if not sys.platform.startswith("linux"):
        log.warning("this process cannot be tied to its parent's life on %s", sys.platform)
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, ctypes.c_ulong(signum), 0, 0, 0) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"prctl(PR_SET_PDEATHSIG): {os.strerror(error)}")
    if os.getppid() != parent_pid:  # the parent ended before the request took hold
        os.kill(os.getpid(), signum)
