"""The Storage SCP: AE configuration, presentation contexts and the server's life cycle.

Start-up order matters: the spool is reconciled with the worklist (``listener.reconcile``) before
the port opens, so no association ever sees a half-recovered spool.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from pydicom import uid
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from sqlalchemy.orm import Session, sessionmaker

from db.metrics import WorklistCollector
from db.priority import reprioritise
from db.session import make_engine, make_sessionmaker, transaction
from db.settings import Settings
from listener import handlers
from listener.access import AccessPolicy
from listener.dispatch import Dispatcher
from listener.metrics import MetricsServer
from listener.reconcile import reconcile
from listener.tls import server_context

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
    ae = AE(ae_title=settings.ae_title)
    ae.add_supported_context(Verification)
    for context in AllStoragePresentationContexts:
        if context.abstract_syntax is not None:
            ae.add_supported_context(context.abstract_syntax, ACCEPTED_TRANSFER_SYNTAXES)
    ae.maximum_associations = settings.max_associations
    ae.maximum_pdu_size = settings.max_pdu_bytes
    ae.acse_timeout = settings.acse_timeout_seconds
    ae.dimse_timeout = settings.dimse_timeout_seconds
    ae.network_timeout = settings.network_timeout_seconds
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


class Listener:
    """The SCP plus its dispatcher thread and its ``/metrics`` endpoint (``HRCT_METRICS_PORT``,
    on ``HRCT_BIND_ADDRESS``); ``start`` returns once the DICOM port is listening."""

    def __init__(
        self,
        settings: Settings,
        sessions: sessionmaker[Session] | None = None,
        *,
        run_dispatcher: bool = True,
    ) -> None:
        self.settings = settings
        self.run_dispatcher = run_dispatcher
        self.sessions = sessions or make_sessionmaker(make_engine(settings.resolved_database_url))
        self.state = handlers.ListenerState(
            settings,
            self.sessions,
            AccessPolicy.from_settings(settings.ae_title, settings.allowed_aets),
            settings.spool_dir.resolve(),
            tls=settings.tls_enabled,
        )
        self.dispatcher = Dispatcher(settings, self.sessions)
        metrics = self.state.metrics
        metrics.track_open_associations(lambda: len(self.state.associations))
        metrics.registry.register(WorklistCollector(self.sessions))
        self.metrics_server = (
            MetricsServer(metrics.registry, settings.bind_address, settings.metrics_port)
            if settings.metrics_port
            else None
        )
        self._stop = threading.Event()
        self._server: Any = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.settings.spool_dir.mkdir(parents=True, exist_ok=True)
        self.reconciliation = reconcile(self.state.spool_dir, self.sessions)
        with transaction(self.sessions) as session:
            # HRCT_PRIORITY_BANDS may have changed since the priorities were stored.
            changed = reprioritise(session, self.settings.priority_bands)
        if changed:
            log.info("worklist priorities recomputed for %d studies", changed)
        ae = build_ae(self.settings)
        self._server = ae.start_server(
            (self.settings.bind_address, self.settings.port),
            block=False,
            ssl_context=server_context(self.settings),
            evt_handlers=event_handlers(self.state),
        )
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
        log.info(
            "listening as %s on %s:%d%s",
            self.settings.ae_title,
            self.settings.bind_address,
            self.port,
            " (TLS)" if self.state.tls else "",
        )

    def stop(self) -> None:
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()
        if self.metrics_server is not None:
            self.metrics_server.stop()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def wait(self) -> None:
        self._stop.wait()
