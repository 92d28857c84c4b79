"""C-STORE SCU and C-ECHO: sends our SR and SC objects to a destination PACS, checks it answers
(DICOMweb destinations go to ``hrct_triage.worker.delivery.stow``).

Contract, written once:

* ``send_files`` never raises for trouble with the peer or a file: each object gets a
  ``SendResult``, delivered (``error is None``) or not, with the status the PACS returned.
* Success (0x0000) and warning (0x0001, 0x0107, 0x0116, 0xB000-0xBFFF) count as delivered: the PACS
  has the object, and the warning code is kept for the record.
* One association per destination and round; message ids increase within it.
* Logs name destinations, files and codes, never patient attributes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydicom import Dataset, dcmread, uid
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.status import code_to_category

from hrct_triage.common.settings import Destination
from hrct_triage.worker.delivery.outcomes import EchoResult, SendResult
from hrct_triage.worker.delivery.stow import check as dicomweb_check
from hrct_triage.worker.delivery.stow import stow_files

log = logging.getLogger("hrct.delivery")

# Our files are Explicit VR Little Endian; Implicit is offered too because it is the one
# transfer syntax every PACS must accept (pynetdicom converts when only that is accepted).
OFFERED_TRANSFER_SYNTAXES = [uid.ExplicitVRLittleEndian, uid.ImplicitVRLittleEndian]
_DELIVERED = ("Success", "Warning")


def _ae(calling_ae: str, timeout: float) -> AE:
    """An SCU application entity whose every wait is bounded by ``timeout``."""
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.connection_timeout = timeout
    return ae


def _association_problem(assoc: Any, destination: Destination) -> str:
    """Why an association was not established, in words an operator can act on.

    pynetdicom reports a refused or timed-out connection as an abort, so only a rejection
    (the peer answered and said no) can be told apart.
    """
    if assoc.is_rejected:
        return f"{destination} rejected the association (called or calling AE title refused)"
    return f"association with {destination} not established (refused, timed out or aborted)"


def send_files(
    destination: Destination,
    paths: Sequence[Path],
    *,
    calling_ae: str,
    timeout: float,
    dicomweb_token: str | None = None,
    dicomweb_ca: Path | None = None,
) -> list[SendResult]:
    """Send every file over one association (one STOW-RS request for a DICOMweb destination);
    one result per path, in order."""
    datasets: list[Dataset | None] = [_read(path) for path in paths]
    readable = [ds for ds in datasets if ds is not None]
    unreadable = {
        p: SendResult(p, None, f"cannot read {p.name}")
        for p, ds in zip(paths, datasets, strict=True)
        if ds is None
    }
    if not readable:
        return [unreadable[path] for path in paths]
    if destination.is_dicomweb:
        readable_paths = [p for p in paths if p not in unreadable]
        sent = stow_files(
            destination, readable_paths, readable,
            token=dicomweb_token, ca=dicomweb_ca, timeout=timeout,
        )  # fmt: skip
        by_path = dict(zip(readable_paths, sent, strict=True))
        return [unreadable.get(path) or by_path[path] for path in paths]
    ae = _ae(calling_ae, timeout)
    for sop_class in sorted({str(ds.SOPClassUID) for ds in readable}):
        ae.add_requested_context(sop_class, OFFERED_TRANSFER_SYNTAXES)
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title)
    if not assoc.is_established:
        reason = _association_problem(assoc, destination)
        return [unreadable.get(path) or SendResult(path, None, reason) for path in paths]
    results: list[SendResult] = []
    try:
        message_id = 0
        for path, dataset in zip(paths, datasets, strict=True):
            if dataset is None:
                results.append(unreadable[path])
                continue
            message_id += 1
            results.append(_send_one(assoc, path, dataset, destination, message_id))
    finally:
        if assoc.is_established:
            assoc.release()
    return results


def _read(path: Path) -> Dataset | None:
    """The stored output, or None when it is gone or damaged (recorded as a failed attempt,
    so a lost file ends the study ``failed`` instead of failing the task forever)."""
    try:
        return dcmread(path)
    except Exception as error:
        log.error("output %s cannot be read: %s", path.name, type(error).__name__)
        return None


def _send_one(
    assoc: Any, path: Path, dataset: Dataset, destination: Destination, message_id: int
) -> SendResult:
    try:
        status = assoc.send_c_store(dataset, msg_id=message_id)
    except Exception as error:  # no accepted context, association dropped mid-round
        return SendResult(path, None, f"C-STORE to {destination} raised {type(error).__name__}")
    if not status or "Status" not in status:
        return SendResult(path, None, f"no C-STORE response from {destination}")
    code = int(status.Status)
    category = code_to_category(code)
    if category in _DELIVERED:
        if category == "Warning":
            log.warning("%s stored %s with warning 0x%04X", destination, path.name, code)
        return SendResult(path, code, None)
    return SendResult(path, code, f"{destination} answered 0x{code:04X} ({category})")


def echo(
    destination: Destination,
    *,
    calling_ae: str,
    timeout: float,
    dicomweb_token: str | None = None,
    dicomweb_ca: Path | None = None,
) -> EchoResult:
    """C-ECHO ``destination`` with the same AE title and timeouts as a delivery would use, so
    a green echo means a delivery would at least associate (a QIDO-RS search for DICOMweb)."""
    if destination.is_dicomweb:
        return dicomweb_check(destination, token=dicomweb_token, ca=dicomweb_ca, timeout=timeout)
    started = time.monotonic()
    ae = _ae(calling_ae, timeout)
    ae.add_requested_context(Verification)
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title)
    if not assoc.is_established:
        problem = _association_problem(assoc, destination)
        return EchoResult(destination, False, None, problem, time.monotonic() - started)
    try:
        status = assoc.send_c_echo()
    finally:
        if assoc.is_established:
            assoc.release()
    seconds = time.monotonic() - started
    if not status or "Status" not in status:
        return EchoResult(destination, False, None, "no C-ECHO response", seconds)
    code = int(status.Status)
    ok = code_to_category(code) == "Success"
    return EchoResult(destination, ok, code, f"0x{code:04X} {code_to_category(code)}", seconds)
