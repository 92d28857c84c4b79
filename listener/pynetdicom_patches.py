"""pynetdicom's two loops per association, woken by what they wait for instead of every 1 ms.

Why: each accepted association runs two threads in pynetdicom, its DUL reactor and the
association's own reactor, and both sleep 1 ms between polls of their queues and socket. Eight
idle associations kept 42% of a core busy here and, worse, made the threads that store
instances wait for the GIL behind 16,000 wake-ups a second.

What: ``WakingDUL.run_reactor`` is pynetdicom 3.0's loop with its sleep replaced by a ``select``
on the association's socket and a wake-up socket that ``send_pdu`` and ``stop_dul`` write to.
``WakingAssociation._run_reactor`` is the association's loop waiting on an event that the DUL
sets after each state-machine action (the only place that queues DIMSE messages and ACSE
indications for it) and when it stops. Both still wake at least every ``_LONGEST_WAIT`` seconds,
so the ARTIM and network timers, which are polled, keep their meaning to within that.

Both loops copy pynetdicom's statement for statement apart from the wait; pyproject pins the
pynetdicom minor version they were copied from.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import select
import socket
import ssl
import threading
import time
from typing import Any, cast

from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.transport import AssociationSocket

# pynetdicom's loggers, as in the loops copied
DUL_LOGGER = logging.getLogger("pynetdicom.dul")
ASSOCIATION_LOGGER = logging.getLogger("pynetdicom.association")

_LONGEST_WAIT = 0.05


class WakingDUL(DULServiceProvider):
    """The DUL service provider whose loop sleeps until there is something to do."""

    _wake_reader: socket.socket
    _wake_writer: socket.socket
    _assoc_wake: threading.Event

    def _prepare_wakeups(self, assoc_wake: threading.Event) -> None:
        self._wake_reader, self._wake_writer = socket.socketpair()
        self._wake_reader.setblocking(False)
        self._wake_writer.setblocking(False)
        self._assoc_wake = assoc_wake

    def _wake(self) -> None:
        # OSError: full (a wake-up is already pending) or closed (the loop has ended)
        with contextlib.suppress(OSError):
            self._wake_writer.send(b"\0")

    def send_pdu(self, primitive: Any) -> None:
        super().send_pdu(primitive)
        self._wake()

    def stop_dul(self) -> bool:
        if self.state_machine.current_state == "Sta1":
            self._kill_thread = True
            self._wake()
        return super().stop_dul()

    def _wait_for_work(self) -> None:
        """Until the peer sends, our side queues a primitive, or ``_LONGEST_WAIT`` passes."""
        sock = cast(AssociationSocket, self.socket).socket if self.socket else None
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return  # decrypted bytes waiting that select cannot see
        try:
            watched = [self._wake_reader] if sock is None else [sock, self._wake_reader]
            readable, _, _ = select.select(watched, [], [], _LONGEST_WAIT)
        except (OSError, ValueError):  # the socket is closed: pynetdicom's own pace
            time.sleep(self._run_loop_delay)
            return
        if self._wake_reader in readable:
            with contextlib.suppress(OSError):  # BlockingIOError once drained
                while self._wake_reader.recv(4096):
                    pass

    def run(self) -> None:
        # pynetdicom bound the thread's target to the base class's run_reactor at __init__,
        # before the class was swapped; Thread.start calls run, which sees the subclass.
        self.run_reactor()

    def run_reactor(self) -> None:
        """pynetdicom 3.0's ``DULServiceProvider.run_reactor`` but for the wait."""
        try:
            self._run_reactor()
        finally:
            self._assoc_wake.set()  # the association checks ``dul.is_alive`` next
            self._wake_reader.close()
            self._wake_writer.close()

    def _run_reactor(self) -> None:
        self._idle_timer.start()
        self.socket = cast("AssociationSocket", self.socket)
        sleep = False

        while True:
            if not self.assoc._dul_ready.is_set():
                self.assoc._dul_ready.set()
                sleep = True

            if sleep:
                self._wait_for_work()

            if self._kill_thread:
                break

            if self.artim_timer.expired:
                self.event_queue.put("Evt18")

            try:
                if self._process_recv_primitive():
                    pass
                elif self._is_transport_event():
                    self._idle_timer.restart()
            except Exception as exc:
                DUL_LOGGER.error("Exception in DUL.run(), aborting association")
                DUL_LOGGER.exception(exc)
                abort_pdu = A_ABORT_RQ()
                abort_pdu.source = 0x02
                abort_pdu.reason_diagnostic = 0x00
                self.socket.send(abort_pdu.encode())
                self.assoc.is_aborted = True
                self.assoc.is_established = False
                self.assoc._kill = True
                self._kill_thread = True
                return

            try:
                event = self.event_queue.get(block=False)
            except queue.Empty:
                sleep = True
                continue

            self.state_machine.do_action(event)
            self._assoc_wake.set()
            sleep = False


class WakingAssociation(Association):
    """The association whose acceptor loop sleeps until its DUL has acted."""

    _wake: threading.Event

    def _run_reactor(self) -> None:
        """pynetdicom 3.0's ``Association._run_reactor`` but for the wait."""
        self._is_paused = False
        while not self._kill:
            self._wake.wait(_LONGEST_WAIT)
            self._wake.clear()  # what is queued from here on sets it again

            self._is_paused = True
            self._reactor_checkpoint.wait()
            self._is_paused = False

            context_id, msg = self.dimse.get_msg(block=False)
            if msg:
                self._serve_request(msg, cast(int, context_id))
                self._wake.set()  # another message may be queued behind this one

            if self.is_established and self.acse.is_release_requested():
                # Flagged before the reply goes out (pynetdicom flags it after): the DUL now
                # sends at once, and the peer's close (EVT_CONN_CLOSE) may be handled before
                # EVT_RELEASED; the flag tells the close handler it was a release.
                self.is_released = True
                self.acse.send_release(is_response=True)
                ASSOCIATION_LOGGER.info("Association Released")
                self.is_established = False
                evt.trigger(self, evt.EVT_RELEASED, {})
                self.kill()
                return

            if self.acse.is_aborted():
                log_msg = "Association Aborted"
                if self.acse.is_aborted("a-p-abort"):
                    log_msg += " (A-P-ABORT)"
                ASSOCIATION_LOGGER.info(log_msg)
                self.dul.receive_pdu(wait=False)
                self.is_aborted = True
                self.is_established = False
                evt.trigger(self, evt.EVT_ABORTED, {})
                self.kill()
                return

            if not self.dul.is_alive():
                self.kill()
                return

            if self.dul.idle_timer_expired():
                ASSOCIATION_LOGGER.error("Network timeout reached")
                if self.network_timeout_response == "A-RELEASE":
                    self._is_paused = True
                    self._reactor_checkpoint.wait()
                    self.release()
                    self._is_paused = False
                else:
                    self.abort()

                self.kill()
                return


def make_waking(assoc: Association, dul_class: type[WakingDUL] = WakingDUL) -> None:
    """Give an accepted association (before ``start``) the waking loops; ``dul_class`` may be a
    subclass of ``WakingDUL``. Only the classes change: every attribute pynetdicom set stays."""
    wake = threading.Event()
    assoc.__class__ = WakingAssociation
    cast(WakingAssociation, assoc)._wake = wake
    dul = assoc.dul
    dul.__class__ = dul_class
    cast(WakingDUL, dul)._prepare_wakeups(wake)
