"""DICOM TLS (PS3.15 B.1, "Basic TLS Secure Transport Connection Profile" and its successors).

Off unless ``HRCT_TLS_CERT`` and ``HRCT_TLS_KEY`` are set. With ``HRCT_TLS_CA`` client certificates
chaining to it are checked when presented; ``HRCT_TLS_REQUIRE_CLIENT_CERT`` makes one mandatory
(mutual TLS), so only provisioned scanners can connect at all.

pynetdicom does the TLS handshake in its accepting thread, without a time limit, and a handshake
that fails vanishes (socketserver drops the error). So one client that connects and never speaks
TLS would keep every scanner out, and a scanner with a wrong certificate would leave no trace.
``HandshakeInThreadServer`` does the handshake in the connection's own thread, within the ACSE
timeout, and reports each failure so that the listener audits it like a rejected association.
"""

from __future__ import annotations

import logging
import socket
import ssl
from collections.abc import Callable
from typing import Any, cast

from pynetdicom.transport import ThreadedAssociationServer

from hrct_triage.common.settings import Settings

log = logging.getLogger(__name__)

# A client that hangs up before saying anything (a TCP health check, a port scan) is no failed
# handshake worth an audit row.
_HUNG_UP = (ssl.SSLEOFError, ConnectionResetError, BrokenPipeError)


def server_context(settings: Settings) -> ssl.SSLContext | None:
    """The TLS context of the listener socket, or None for plain TCP."""
    if settings.listener.tls_cert is None or settings.listener.tls_key is None:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    # TLS 1.2 is the oldest version the current profiles (PS3.15 B.9 onwards) allow.
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(settings.listener.tls_cert, settings.listener.tls_key)
    if settings.listener.tls_ca is not None:
        context.load_verify_locations(cafile=settings.listener.tls_ca)
        context.verify_mode = (
            ssl.CERT_REQUIRED if settings.listener.tls_require_client_cert else ssl.CERT_OPTIONAL
        )
    return context


class HandshakeInThreadServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with the TLS handshake moved into the connection's thread.

    Set ``handshake_timeout`` (seconds) and ``on_handshake_failure(address, port, reason)``
    before ``serve_forever``; without an ``ssl_context`` it is the plain threaded server.
    """

    handshake_timeout: float = 30.0
    on_handshake_failure: Callable[[str, int, str], None] | None = None

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        client, address = cast(socket.socket, self.socket).accept()
        return client, address  # still plain TCP: no handshake in the accepting thread

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        if self.ssl_context is not None:
            secured = self._handshake(request, client_address)
            if secured is None:
                return
            request = secured
        super().process_request_thread(request, client_address)

    def _handshake(self, client: socket.socket, address: Any) -> ssl.SSLSocket | None:
        host, port = str(address[0]), int(address[1])
        try:
            client.settimeout(self.handshake_timeout)
            secured = cast(ssl.SSLContext, self.ssl_context).wrap_socket(client, server_side=True)
            secured.settimeout(None)  # as pynetdicom's own wrapping leaves it
            return secured
        except _HUNG_UP:
            log.debug("TLS client %s:%d hung up before the handshake", host, port)
        except TimeoutError:
            self._failed(host, port, f"TLS handshake timed out after {self.handshake_timeout:g} s")
        except (OSError, ValueError) as error:
            detail = getattr(error, "reason", None) or type(error).__name__
            self._failed(host, port, f"TLS handshake failed: {detail}")
        client.close()  # wrap_socket has closed its own socket; this one is detached or plain
        return None

    def _failed(self, host: str, port: int, reason: str) -> None:
        if self.on_handshake_failure is not None:
            self.on_handshake_failure(host, port, reason)
