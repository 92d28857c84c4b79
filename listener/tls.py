"""DICOM TLS (PS3.15 B.1, "Basic TLS Secure Transport Connection Profile" and its successors).

Off unless ``HRCT_TLS_CERT`` and ``HRCT_TLS_KEY`` are set. With ``HRCT_TLS_CA`` client certificates
chaining to it are checked when presented; ``HRCT_TLS_REQUIRE_CLIENT_CERT`` makes one mandatory
(mutual TLS), so only provisioned scanners can connect at all.
"""

from __future__ import annotations

import ssl

from db.settings import Settings


def server_context(settings: Settings) -> ssl.SSLContext | None:
    """The TLS context of the listener socket, or None for plain TCP."""
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    # TLS 1.2 is the oldest version the current profiles (PS3.15 B.9 onwards) allow.
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(settings.tls_cert, settings.tls_key)
    if settings.tls_ca is not None:
        context.load_verify_locations(cafile=settings.tls_ca)
        context.verify_mode = (
            ssl.CERT_REQUIRED if settings.tls_require_client_cert else ssl.CERT_OPTIONAL
        )
    return context
