"""The Storage SCP: AE configuration, presentation contexts and the server's life cycle.

Start-up order matters: the spool is reconciled with the worklist (``listener.reconcile``) before
the port opens, so no association ever sees a half-recovered spool.
"""

from __future__ import annotations

import copy
import logging
import socket
import threading
from functools import partial
from typing import Any, cast

from pydicom import uid
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from sqlalchemy.orm import Session, sessionmaker

from hrct_triage.common.errors import ConfigurationError
from hrct_triage.common.settings import Settings
from hrct_triage.db.priority import reprioritise
from hrct_triage.db.session import make_engine, make_sessionmaker, transaction
from hrct_triage.listener import handlers, spool
from hrct_triage.listener.access import AccessPolicy
from hrct_triage.listener.dispatch import Dispatcher
from hrct_triage.listener.drift_watch import DriftCollector, DriftWatch
from hrct_triage.listener.metrics import MetricsServer
from hrct_triage.listener.multiprocess import DataFolderLock, Followers
from hrct_triage.listener.reconcile import reconcile
from hrct_triage.listener.store_stream import DataPhase, StreamingRequestHandler
from hrct_triage.listener.tls import HandshakeInThreadServer, server_context
from hrct_triage.listener.worklist_gauges import WorklistCollector

log = logging.getLogger("hrct.listener")

# Stored as received: uncompressed and the compressed syntaxes CT scanners and PACS use.
ACCEPTED_TRANSFER_SYNTAXES = [
    uid.ExplicitVRLittleEndian,
    uid.ImplicitVRLittleEndian,
    uid.DeflatedExplicitVRLittleEndian,
    uid.ExplicitVRBigEndian,
    uid.JPEGLosslessSV1,
    uid.JPEGLossless,
    uid.JPEGLSLossless,
    uid.JPEGLSNearLossless,
    uid.JPEG2000Lossless,
    uid.JPEG2000,
    uid.RLELossless,
    uid.JPEGBaseline8Bit,
    uid.JPEGExtended12Bit,
]


def build_ae(settings: Settings) -> AE:
    """The AE with every storage SOP class, our transfer syntaxes and the limits in settings."""
    ae = AE(ae_title=settings.listener.ae_title)
    ae.add_supported_context(Verification)
    for context in AllStoragePresentationContexts:
        if context.abstract_syntax is not None:
            ae.add_supported_context(context.abstract_syntax, ACCEPTED_TRANSFER_SYNTAXES)
    ae.maximum_associations = settings.listener.max_associations
    ae.maximum_pdu_size = settings.listener.max_pdu_bytes
    ae.acse_timeout = settings.listener.acse_timeout_seconds
    ae.dimse_timeout = settings.listener.dimse_timeout_seconds
    ae.network_timeout = settings.listener.network_timeout_seconds
    # The access policy (called AE, AE@host allow list) runs in handle_requested; this is the
    # same called-AE check kept as a second line.
    ae.require_called_aet = True
    return ae


def event_handlers(state: handlers.ListenerState) -> list[Any]:
    return [
        (evt.EVT_C_ECHO, handlers.handle_echo),
        (evt.EVT_C_STORE, handlers.handle_store, [state]),
        (evt.EVT_REQUESTED, handlers.handle_requested, [state]),
        (evt.EVT_ACCEPTED, handlers.handle_accepted, [state]),
        (evt.EVT_REJECTED, handlers.handle_rejected, [state]),
        (evt.EVT_RELEASED, handlers.handle_closed, [state, "released"]),
        (evt.EVT_ABORTED, handlers.handle_closed, [state, "aborted"]),
        (evt.EVT_CONN_CLOSE, handlers.handle_closed, [state, "closed"]),
    ]


class SupportedContexts(list[PresentationContext]):
    """The server's supported presentation contexts, copied cheaply for each association.

    pynetdicom gives every accepted association ``deepcopy(server.contexts)``: for our 171
    contexts and 2,214 transfer syntaxes that re-validated every UID and cost 13 ms of the GIL
    per association (profiled: nine tenths of accepting one), which eight scanners connecting at
    once felt as a stall of every C-STORE in the process. The copy here is as deep as anything
    mutable goes (each context and its list of transfer syntaxes); the UIDs themselves are
    immutable strings and are shared.
    """

    def __deepcopy__(self, memo: dict[int, object]) -> list[PresentationContext]:
        copies = []
        for context in self:
            duplicate = copy.copy(context)
            duplicate._transfer_syntax = list(context._transfer_syntax)
            copies.append(duplicate)
        return copies


class _SharedPortServer(HandshakeInThreadServer):
    """pynetdicom's threaded server with ``SO_REUSEPORT``, so that the listener's processes
    (``hrct_triage.listener.multiprocess``) all accept on the one port."""

    def server_bind(self) -> None:
        if not hasattr(socket, "SO_REUSEPORT"):
            raise ConfigurationError("HRCT_LISTENER_PROCESSES above 1 needs SO_REUSEPORT (Linux)")
        listening = cast(socket.socket, self.socket)
        listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()


class Listener:
    """The SCP plus its dispatcher thread and its ``/metrics`` endpoint (``HRCT_METRICS_PORT``,
    on ``HRCT_BIND_ADDRESS``); ``start`` returns once the DICOM port is listening, in every
    process of ``HRCT_LISTENER_PROCESSES``.

    ``follower_index`` > 0 makes this one of the primary's followers (``listener.multiprocess``):
    it neither reconciles, reprioritises, dispatches nor starts processes of its own.
    """

    def __init__(
        self,
        settings: Settings,
        sessions: sessionmaker[Session] | None = None,
        *,
        run_dispatcher: bool = True,
        follower_index: int = 0,
    ) -> None:
        self.settings = settings
        self.follower_index = follower_index
        self.primary = follower_index == 0
        self.run_dispatcher = run_dispatcher and self.primary
        self.shared_port = settings.listener.listener_processes > 1
        self.sessions = sessions or make_sessionmaker(
            make_engine(settings.resolved_database_url, take_turns=True)
        )
        self.state = handlers.ListenerState(
            settings,
            self.sessions,
            AccessPolicy.from_settings(settings.listener.ae_title, settings.listener.allowed_aets),
            settings.spool_dir.resolve(),
            tls=settings.listener.tls_enabled,
        )
        self.dispatcher = Dispatcher(settings, self.sessions)
        metrics = self.state.metrics
        metrics.track_open_associations(lambda: len(self.state.associations))
        self.drift_watch = DriftWatch(settings, self.sessions)
        if self.primary:  # worklist figures are the same from every process: served once
            metrics.registry.register(WorklistCollector(self.sessions))
            metrics.registry.register(DriftCollector(self.drift_watch))
        self.metrics_server = (
            MetricsServer(
                metrics.registry,
                settings.listener.bind_address,
                settings.listener.metrics_port + follower_index,
            )
            if settings.listener.metrics_port
            else None
        )
        # Set when a follower process died: the listener must stop (see listener.multiprocess).
        self.failed = threading.Event()
        self._stop = threading.Event()
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._drift_thread: threading.Thread | None = None
        self._lock: DataFolderLock | None = None
        self._followers: Followers | None = None

    def start(self) -> None:
        try:
            self._start()
        except BaseException:
            self.stop()  # nothing half-started stays behind: followers, the lock, the port
            raise

    def _start(self) -> None:
        self.settings.spool_dir.mkdir(parents=True, exist_ok=True)
        if self.primary:
            if self.shared_port:
                self._lock = DataFolderLock(self.settings.data_dir)
            self.reconciliation = reconcile(self.state.spool_dir, self.sessions)
            with transaction(self.sessions) as session:
                # HRCT_PRIORITY_BANDS may have changed since the priorities were stored.
                changed = reprioritise(session, self.settings.worklist.priority_bands)
            if changed:
                log.info("worklist priorities recomputed for %d studies", changed)
        self._server = self._serve()
        self.port = int(self._server.server_address[1])
        if self.metrics_server is not None:
            self.metrics_server.start()
        if self.run_dispatcher:
            self._thread = threading.Thread(
                target=self.dispatcher.run_forever,
                args=(self._stop,),
                name="hrct-dispatcher",
                daemon=True,
            )
            self._thread.start()
            if self.settings.worklist.drift_check_seconds > 0:
                self._drift_thread = threading.Thread(
                    target=self.drift_watch.run_forever,
                    args=(self._stop,),
                    name="hrct-drift",
                    daemon=True,
                )
                self._drift_thread.start()
        if self.primary and self.shared_port:
            self._followers = Followers(
                self.settings,
                self.port,
                self.settings.listener.listener_processes - 1,
                type(self),
            )
            self.failed = self._followers.failed
        log.info(
            "listening as %s on %s:%d%s%s",
            self.settings.listener.ae_title,
            self.settings.listener.bind_address,
            self.port,
            " (TLS)" if self.state.tls else "",
            f" (process {self.follower_index + 1} of {self.settings.listener.listener_processes})"
            if self.shared_port
            else "",
        )

    def _serve(self) -> Any:
        """What ``start_server(block=False)`` does, with our server class (TLS handshakes in the
        connection's thread; ``SO_REUSEPORT`` when the listener runs as several processes) and
        our request handler (C-STOREs read by ``hrct_triage.listener.store_stream``)."""
        ae = build_ae(self.settings)
        server_class: type[HandshakeInThreadServer] = (
            _SharedPortServer if self.shared_port else HandshakeInThreadServer
        )
        server = cast(  # make_server returns an instance of server_class
            HandshakeInThreadServer,
            ae.make_server(
                (self.settings.listener.bind_address, self.settings.listener.port),
                ssl_context=server_context(self.settings),
                evt_handlers=event_handlers(self.state),
                server_class=server_class,
                request_handler=StreamingRequestHandler,
            ),
        )
        server.handshake_timeout = self.settings.listener.acse_timeout_seconds
        server.contexts = SupportedContexts(server.contexts)
        state = self.state
        server.data_phase = DataPhase(  # type: ignore[attr-defined]  # StreamingRequestHandler's
            store=partial(handlers.store_instance, state),
            begin=partial(handlers.begin_instance, state),
            prepare=partial(handlers.prepare_instance, state),
            aborting=partial(handlers.record_abort, state),
            keep_at_most=self.settings.listener.max_instance_bytes,
        )
        server.on_handshake_failure = lambda host, port, reason: handlers.record_failed_handshake(
            state, host, port, reason
        )
        threading.Thread(target=server.serve_forever, name="hrct-acceptor", daemon=True).start()
        ae._servers.append(server)  # server.shutdown() removes it from there
        return server

    @property
    def follower_pids(self) -> list[int]:
        return self._followers.pids if self._followers is not None else []

    def stop(self) -> None:
        self._stop.set()
        if self._followers is not None:
            self._followers.stop()
            self._followers = None
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        if self.metrics_server is not None:
            self.metrics_server.stop()
        for thread in (self._thread, self._drift_thread):
            if thread is not None:
                thread.join(timeout=10)
        self.state.commits.close()
        spool.close_spares(self.state.spool_dir)
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def wait(self) -> None:
        self._stop.wait()
