"""The Storage SCP: AE configuration, presentation contexts and the server's life cycle."""

from __future__ import annotations

import logging
import threading
from datetime import UTC, datetime
from typing import Any

from pydicom import uid
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from sqlalchemy.orm import Session, sessionmaker

from db import worklist
from db.session import make_engine, make_sessionmaker, transaction
from db.settings import Settings
from listener import handlers
from listener.dispatch import Dispatcher
from listener.spool import remove_partial_files

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

# Limits, each with its reason.
MAX_ASSOCIATIONS = 32  # several scanners at once, each may open a few associations
MAX_PDU = 0  # unlimited receive PDU: fewer, larger P-DATA PDUs are faster for 512x512 CT
ACSE_TIMEOUT = 30  # seconds to finish association negotiation
DIMSE_TIMEOUT = 60  # seconds between messages of an operation
NETWORK_TIMEOUT = 120  # an idle association is closed so its study can complete


def build_ae(settings: Settings) -> AE:
    ae = AE(ae_title=settings.ae_title)
    ae.add_supported_context(Verification)
    for context in AllStoragePresentationContexts:
        if context.abstract_syntax is not None:
            ae.add_supported_context(context.abstract_syntax, ACCEPTED_TRANSFER_SYNTAXES)
    ae.maximum_associations = MAX_ASSOCIATIONS
    ae.maximum_pdu_size = MAX_PDU
    ae.acse_timeout = ACSE_TIMEOUT
    ae.dimse_timeout = DIMSE_TIMEOUT
    ae.network_timeout = NETWORK_TIMEOUT
    ae.require_called_aet = True
    if settings.allowed_aets:
        ae.require_calling_aet = list(settings.allowed_aets)
    return ae


def event_handlers(state: handlers.ListenerState) -> list[Any]:
    return [
        (evt.EVT_C_ECHO, handlers.handle_echo),
        (evt.EVT_C_STORE, handlers.handle_store, [state]),
        (evt.EVT_ACCEPTED, handlers.handle_accepted, [state]),
        (evt.EVT_REJECTED, handlers.handle_rejected, [state]),
        (evt.EVT_RELEASED, handlers.handle_closed, [state, "released"]),
        (evt.EVT_ABORTED, handlers.handle_closed, [state, "aborted"]),
        (evt.EVT_CONN_CLOSE, handlers.handle_closed, [state, "closed"]),
    ]


class Listener:
    """The SCP plus its dispatcher thread; ``start`` returns once the port is listening."""

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
        self.state = handlers.ListenerState(settings, self.sessions)
        self.dispatcher = Dispatcher(settings, self.sessions)
        self._stop = threading.Event()
        self._server: Any = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.settings.spool_dir.mkdir(parents=True, exist_ok=True)
        removed = remove_partial_files(self.settings.spool_dir)
        with transaction(self.sessions) as session:
            orphaned = worklist.close_orphaned_associations(session, now=datetime.now(UTC))
        if removed or orphaned:
            log.warning(
                "recovered from an unclean stop: %d partial files removed, %d associations closed",
                removed,
                orphaned,
            )
        ae = build_ae(self.settings)
        self._server = ae.start_server(
            (self.settings.bind_address, self.settings.port),
            block=False,
            evt_handlers=event_handlers(self.state),
        )
        self.port = int(self._server.server_address[1])
        if self.run_dispatcher:
            self._thread = threading.Thread(
                target=self.dispatcher.run_forever,
                args=(self._stop,),
                name="hrct-dispatcher",
                daemon=True,
            )
            self._thread.start()
        log.info(
            "listening as %s on %s:%d",
            self.settings.ae_title,
            self.settings.bind_address,
            self.settings.port,
        )

    def stop(self) -> None:
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def wait(self) -> None:
        self._stop.wait()
