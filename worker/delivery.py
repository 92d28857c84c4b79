"""C-STORE SCU: sends our SR and SC objects to a destination PACS.

One association per destination and round; each object gets its own status. Warning statuses
(0xB000 range) count as delivered and are recorded: the PACS has the object.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread, uid
from pynetdicom import AE
from pynetdicom.status import code_to_category

from db.settings import Destination

log = logging.getLogger("hrct.delivery")

OFFERED_TRANSFER_SYNTAXES = [uid.ExplicitVRLittleEndian, uid.ImplicitVRLittleEndian]


@dataclass(frozen=True)
class SendResult:
    path: Path
    status: int | None  # the PACS's answer, None when it never answered
    error: str | None  # None when delivered (success or warning)


def send_files(
    destination: Destination, paths: Sequence[Path], *, calling_ae: str, timeout: float
) -> list[SendResult]:
    """Send every file over one association; never raises for network trouble."""
    datasets = [dcmread(path) for path in paths]
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.connection_timeout = timeout
    for sop_class in sorted({str(ds.SOPClassUID) for ds in datasets}):
        ae.add_requested_context(sop_class, OFFERED_TRANSFER_SYNTAXES)
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title)
    if not assoc.is_established:
        reason = f"association with {destination} not established"
        return [SendResult(path, None, reason) for path in paths]
    results: list[SendResult] = []
    try:
        for path, dataset in zip(paths, datasets, strict=True):
            results.append(_send_one(assoc, path, dataset, destination))
    finally:
        if assoc.is_established:
            assoc.release()
    return results


def _send_one(assoc: object, path: Path, dataset: object, destination: Destination) -> SendResult:
    try:
        status = assoc.send_c_store(dataset)  # type: ignore[attr-defined]
    except Exception as error:
        return SendResult(path, None, f"C-STORE to {destination} raised {type(error).__name__}")
    if not status or "Status" not in status:
        return SendResult(path, None, f"no C-STORE response from {destination}")
    code = int(status.Status)
    category = code_to_category(code)
    if category in ("Success", "Warning"):
        if category == "Warning":
            log.warning("%s stored %s with warning 0x%04X", destination, path.name, code)
        return SendResult(path, code, None)
    return SendResult(path, code, f"{destination} answered 0x{code:04X} ({category})")
