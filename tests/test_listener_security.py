"""Who gets in: the calling AE allow list (with ``AE@host``), the called AE check, and DICOM TLS
with a throwaway CA made by the ``openssl`` command line for each test run."""

from __future__ import annotations

import contextlib
import socket
import ssl
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pynetdicom import AE
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from hrct_triage.common.settings import Settings
from hrct_triage.db.models import Association
from hrct_triage.db.session import transaction
from hrct_triage.listener.scp import Listener
from tests.helpers.dicom_peers import require_tool
from tests.helpers.listeners import listener_settings, wait_until_no_open_association

VERIFICATION = "1.2.840.10008.1.1"


def _echo(
    port: int,
    calling: str,
    called: str = "HRCT_TRIAGE",
    tls_args: tuple[ssl.SSLContext, str] | None = None,
    connection_timeout: float | None = None,
) -> bool:
    """True when an association is accepted and answers C-ECHO."""
    ae = AE(ae_title=calling)
    ae.connection_timeout = connection_timeout
    ae.add_requested_context(VERIFICATION)
    assoc = ae.associate("127.0.0.1", port, ae_title=called, tls_args=tls_args)
    if not assoc.is_established:
        return False
    ok = assoc.send_c_echo().Status == 0x0000
    assoc.release()
    return bool(ok)


def test_only_allowed_calling_aes_from_their_hosts_get_in(
    tmp_path: Path, sqlite_url: str, sqlite_sessions: sessionmaker[Session]
) -> None:
    # given an allow list: CT_SCANNER from this host, PACS from anywhere, REMOTE only from afar
    settings = listener_settings(
        tmp_path / "var",
        sqlite_url,
        allowed_aets="CT_SCANNER@127.0.0.1,PACS,REMOTE@192.0.2.7",
    )
    listener = Listener(settings, sqlite_sessions, run_dispatcher=False)
    listener.start()
    try:
        # when each of them, an unknown AE and a wrong called AE try to associate
        outcomes = {
            "CT_SCANNER": _echo(listener.port, "CT_SCANNER"),
            "PACS": _echo(listener.port, "PACS"),
            "REMOTE from the wrong host": _echo(listener.port, "REMOTE"),
            "INTRUDER": _echo(listener.port, "INTRUDER"),
            "wrong called AE": _echo(listener.port, "CT_SCANNER", called="SOMEONE_ELSE"),
        }
        wait_until_no_open_association(sqlite_sessions)
    finally:
        listener.stop()
    # then only the allowed ones got in
    assert outcomes == {
        "CT_SCANNER": True,
        "PACS": True,
        "REMOTE from the wrong host": False,
        "INTRUDER": False,
        "wrong called AE": False,
    }
    # and every rejection is recorded with the peer's address, AE titles and the reason
    with transaction(sqlite_sessions) as session:
        rejected = session.scalars(
            select(Association).where(Association.state == "rejected").order_by(Association.id)
        ).all()
    assert [(r.calling_ae, r.called_ae, r.peer_address) for r in rejected] == [
        ("REMOTE", "HRCT_TRIAGE", "127.0.0.1"),
        ("INTRUDER", "HRCT_TRIAGE", "127.0.0.1"),
        ("CT_SCANNER", "SOMEONE_ELSE", "127.0.0.1"),
    ]
    reasons = [r.rejection_reason or "" for r in rejected]
    assert "not allowed from 127.0.0.1" in reasons[0]
    assert "not in HRCT_ALLOWED_AETS" in reasons[1]
    assert "called AE" in reasons[2]


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _ca(folder: Path, name: str) -> None:
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        "-subj", f"/CN={name}", "-keyout", f"{name}.key", "-out", f"{name}.pem",
        cwd=folder,
    )  # fmt: skip


def _signed(folder: Path, name: str, ca: str, *, server: bool) -> None:
    _openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
        "-keyout", f"{name}.key", "-out", f"{name}.csr",
        cwd=folder,
    )  # fmt: skip
    extensions = folder / f"{name}.ext"
    extensions.write_text(
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"
        if server
        else "extendedKeyUsage=clientAuth\n"
    )
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
        "-CAcreateserial", "-days", "2", "-extfile", extensions.name, "-out", f"{name}.pem",
        cwd=folder,
    )  # fmt: skip


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A hospital CA with a server and a scanner certificate, and a stranger's CA and cert."""
    require_tool("openssl")
    folder = tmp_path_factory.mktemp("pki")
    _ca(folder, "hospital-ca")
    _signed(folder, "server", "hospital-ca", server=True)
    _signed(folder, "scanner", "hospital-ca", server=False)
    _ca(folder, "stranger-ca")
    _signed(folder, "stranger", "stranger-ca", server=False)
    return folder


def _client_tls(pki: Path, cert: str | None) -> tuple[ssl.SSLContext, str]:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=pki / "hospital-ca.pem")
    if cert is not None:
        context.load_cert_chain(pki / f"{cert}.pem", pki / f"{cert}.key")
    return context, "localhost"


def _mutual_tls_settings(tmp_path: Path, sqlite_url: str, pki: Path, **overrides: Any) -> Settings:
    """A listener that speaks only TLS and wants a client certificate from the hospital CA."""
    return listener_settings(
        tmp_path / "var",
        sqlite_url,
        tls_cert=pki / "server.pem",
        tls_key=pki / "server.key",
        tls_ca=pki / "hospital-ca.pem",
        tls_require_client_cert=True,
        **overrides,
    )


def test_mutual_tls_lets_in_only_clients_with_a_hospital_certificate(
    tmp_path: Path, sqlite_url: str, sqlite_sessions: sessionmaker[Session], pki: Path
) -> None:
    # given a listener that requires a client certificate from the hospital CA
    settings = _mutual_tls_settings(tmp_path, sqlite_url, pki)
    listener = Listener(settings, sqlite_sessions, run_dispatcher=False)
    listener.start()
    try:
        # when a scanner with a hospital certificate, a client without one, a client with a
        # stranger's certificate and a plain-TCP client connect
        outcomes = {
            "hospital cert": _echo(
                listener.port, "CT_SCANNER", tls_args=_client_tls(pki, "scanner")
            ),
            "no cert": _echo(listener.port, "CT_SCANNER", tls_args=_client_tls(pki, None)),
            "stranger cert": _echo(
                listener.port, "CT_SCANNER", tls_args=_client_tls(pki, "stranger")
            ),
            "plain TCP": _echo(listener.port, "CT_SCANNER"),
            "hospital cert again": _echo(
                listener.port, "CT_SCANNER", tls_args=_client_tls(pki, "scanner")
            ),
        }
        wait_until_no_open_association(sqlite_sessions)
    finally:
        listener.stop()
    # then only the scanner with the hospital certificate gets in, and the listener keeps serving
    assert outcomes == {
        "hospital cert": True,
        "no cert": False,
        "stranger cert": False,
        "plain TCP": False,
        "hospital cert again": True,
    }
    # and each failed handshake is audited with the peer and what went wrong
    rejected = _rows_when(sqlite_sessions, lambda rows: len(_rejected(rows)) == 3)
    assert [row.tls for row in rejected if row.state != "rejected"] == [True, True]
    reasons = [row.rejection_reason or "" for row in _rejected(rejected)]
    assert len(reasons) == 3  # no certificate, a stranger's certificate, plain TCP
    assert all(reason.startswith("TLS handshake failed: ") for reason in reasons), reasons
    assert sum("CERTIFICATE" in reason for reason in reasons) == 2, reasons  # none, stranger's
    assert {row.peer_address for row in _rejected(rejected)} == {"127.0.0.1"}


def _rejected(rows: list[Association]) -> list[Association]:
    return [row for row in rows if row.state == "rejected"]


def _rows_when(
    sessions: sessionmaker[Session], ready: Callable[[list[Association]], bool]
) -> list[Association]:
    """The association audit rows once ``ready`` says so (the listener writes them in its
    connection threads, just after the client has seen the outcome); the last read at 10 s."""
    deadline = time.monotonic() + 10
    while True:
        with transaction(sessions) as session:
            rows = list(session.scalars(select(Association).order_by(Association.id)).all())
            session.expunge_all()
        if ready(rows) or time.monotonic() > deadline:
            return rows
        time.sleep(0.05)


def test_a_client_that_never_speaks_tls_keeps_no_scanner_out(
    tmp_path: Path, sqlite_url: str, sqlite_sessions: sessionmaker[Session], pki: Path
) -> None:
    # given a TLS listener with a 2 s ACSE timeout
    settings = _mutual_tls_settings(tmp_path, sqlite_url, pki, acse_timeout_seconds=2)
    listener = Listener(settings, sqlite_sessions, run_dispatcher=False)
    listener.start()
    silent = socket.create_connection(("127.0.0.1", listener.port))
    try:
        # when a client connects and says nothing, and a scanner connects while it waits
        scanner_in = _echo(
            listener.port,
            "CT_SCANNER",
            tls_args=_client_tls(pki, "scanner"),
            connection_timeout=5,
        )
        # then the scanner gets in at once
        assert scanner_in
        # and the silent client is cut off after the ACSE timeout, and audited
        silent.settimeout(10)
        with contextlib.suppress(ConnectionResetError):
            assert silent.recv(1) == b""
        rows = _rows_when(sqlite_sessions, lambda rows: len(_rejected(rows)) == 1)
    finally:
        silent.close()
        listener.stop()
    assert [row.rejection_reason for row in _rejected(rows)] == [
        "TLS handshake timed out after 2 s"
    ]
