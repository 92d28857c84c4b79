"""C-STORE SCU and C-ECHO: sends our SR and SC objects to a destination PACS, checks it answers
(DICOMweb destinations go to ``hrct_triage.worker.delivery.stow``).

Contract, written once:

* ``send_files`` never raises for trouble with the peer or a file: each object gets a
  ``SendResult``, delivered (``error is None``) or not, with the status the PACS returned and
  the problem in words (``worker.delivery.association``).
* An object that may be sent in several SOP classes (an SR: ``Outgoing.classes``) is proposed in
  all of them, most specific first, and sent in the first the destination accepts; a failure
  status that refuses the class itself (0x0122, 0xA9xx) moves on to the next accepted one.
  None accepted is a permanent failure: retrying cannot change the PACS's configuration.
* Success (0x0000) and warning (0x0001, 0x0107, 0x0116, 0xB000-0xBFFF) count as delivered: the PACS
  has the object, and the warning code is kept for the record.
* One association per destination and round; message ids increase within it.
* Logs name destinations, files and codes, never patient attributes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from itertools import count
from pathlib import Path
from typing import Any

from pydicom import Dataset, dcmread, uid
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.status import code_to_category

from hrct_triage.common.settings import Destination
from hrct_triage.common.sop_classes import sop_class_name
from hrct_triage.worker.delivery.association import (
    CLASS_REFUSALS,
    PERMANENT_STATUSES,
    Problem,
    Witness,
    associate,
    context_words,
    make_ae,
    no_response,
    not_established,
    status_words,
)
from hrct_triage.worker.delivery.outcomes import EchoResult, Outgoing, SendResult
from hrct_triage.worker.delivery.stow import check as dicomweb_check
from hrct_triage.worker.delivery.stow import stow_files

log = logging.getLogger("hrct.delivery")

# Our files are Explicit VR Little Endian; Implicit is offered too because it is the one
# transfer syntax every PACS must accept (pynetdicom converts when only that is accepted).
OFFERED_TRANSFER_SYNTAXES = [uid.ExplicitVRLittleEndian, uid.ImplicitVRLittleEndian]
_DELIVERED = ("Success", "Warning")


def send_files(
    destination: Destination,
    items: Sequence[Path | Outgoing],
    *,
    calling_ae: str,
    timeout: float,
    dicomweb_token: str | None = None,
    dicomweb_ca: Path | None = None,
) -> list[SendResult]:
    """Send every object over one association (one STOW-RS request for a DICOMweb destination);
    one result per item, in order. A plain path is sent in its stored class only."""
    outgoing = [item if isinstance(item, Outgoing) else Outgoing(item) for item in items]
    datasets: list[Dataset | None] = [_read(item.path) for item in outgoing]
    unreadable = {
        index: SendResult(item.path, None, f"cannot read {item.path.name}")
        for index, (item, ds) in enumerate(zip(outgoing, datasets, strict=True))
        if ds is None
    }
    if len(unreadable) == len(outgoing):
        return [unreadable[index] for index in range(len(outgoing))]
    if destination.is_dicomweb:
        return _stow(
            destination, outgoing, datasets, unreadable, dicomweb_token, dicomweb_ca, timeout
        )
    classes = [_classes(item, ds) for item, ds in zip(outgoing, datasets, strict=True)]
    ae = make_ae(calling_ae, timeout)
    for sop_class in dict.fromkeys(c for candidates in classes for c in candidates):
        ae.add_requested_context(sop_class, OFFERED_TRANSFER_SYNTAXES)
    assoc, witness = associate(ae, destination)
    if assoc is None or (not assoc.is_established and not witness.negotiated):
        problem = not_established(destination, witness, timeout)
        return [
            unreadable.get(index)
            or SendResult(item.path, None, problem.words, permanent=problem.permanent)
            for index, item in enumerate(outgoing)
        ]
    rejected = {str(cx.abstract_syntax): cx for cx in assoc.rejected_contexts}
    round_ = _Round(assoc, witness, destination, timeout, rejected)
    results: list[SendResult] = []
    try:
        for index, (item, dataset) in enumerate(zip(outgoing, datasets, strict=True)):
            if dataset is None:
                results.append(unreadable[index])
            else:
                results.append(round_.send(item, dataset, classes[index]))
        return results
    finally:
        if assoc.is_established:
            assoc.release()


def _classes(item: Outgoing, dataset: Dataset | None) -> tuple[str, ...]:
    if dataset is None:
        return ()
    return item.classes or (str(dataset.SOPClassUID),)


class _Round:
    """The objects of one association, sent one after the other."""

    def __init__(
        self,
        assoc: Any,
        witness: Witness,
        destination: Destination,
        timeout: float,
        rejected: dict[str, Any],
    ) -> None:
        self.assoc = assoc
        self.witness = witness
        self.destination = destination
        self.timeout = timeout
        self.rejected = rejected
        self.accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
        self.message_ids = count(1)
        self.lost: Problem | None = None  # the association broke: why, for what remains

    def send(self, item: Outgoing, dataset: Dataset, candidates: Sequence[str]) -> SendResult:
        """Send ``item`` in the first of ``candidates`` the destination takes."""
        refusals: list[str] = []  # what the destination refused, and why
        unfit: list[str] = []  # classes it accepted that the content does not fit
        refused: tuple[str, ...] = ()
        last_status: int | None = None
        for sop_class in candidates:
            if sop_class not in self.accepted:
                context = self.rejected.get(sop_class)
                refusals.append(context_words(context) if context else sop_class_name(sop_class))
                refused += (sop_class,)
                continue
            if self.lost is not None:
                return SendResult(item.path, None, self.lost.words)
            try:
                path, ds = _as_class(item, dataset, sop_class)
            except ValueError as error:  # its content does not fit this class: try the next
                reason = str(error).removeprefix("sop_class: ")
                unfit.append(
                    f"{sop_class_name(sop_class)} (accepted; the SR does not fit it: {reason})"
                )
                continue
            except Exception as error:  # our own file could not be rewritten: a retry may do
                log.exception("%s could not be written as %s", item.path.name, sop_class)
                words = f"{item.path.name} could not be written as {sop_class_name(sop_class)}"
                return SendResult(item.path, None, f"{words}: {type(error).__name__}")
            code, problem = self._store(ds)
            if problem is not None:
                return SendResult(path, code, problem.words, permanent=problem.permanent)
            assert code is not None
            if code in CLASS_REFUSALS:
                refusals.append(f"{sop_class_name(sop_class)} (answered {status_words(code)})")
                refused += (sop_class,)
                last_status = code
                continue
            instance = str(ds.SOPInstanceUID)
            category = code_to_category(code)
            if category in _DELIVERED:
                if category == "Warning":
                    log.warning(
                        "%s stored %s with warning 0x%04X", self.destination, path.name, code
                    )
                return SendResult(
                    path, code, None, False, sop_class, instance, refused_classes=refused
                )
            words = f"{self.destination} answered {status_words(code)}"
            permanent = code in PERMANENT_STATUSES
            return SendResult(path, code, words, permanent, sop_class, instance, refused)
        what = "this SR" if item.write_as is not None else "this object"
        if unfit:
            words = f"no class {self.destination} accepts fits {what}: " + "; ".join(
                [*refusals, *unfit]
            )
        else:
            words = f"{self.destination} accepts none of the classes {what} can be sent as: "
            words += "; ".join(refusals)
        return SendResult(item.path, last_status, words, permanent=True, refused_classes=refused)

    def _store(self, dataset: Dataset) -> tuple[int | None, Problem | None]:
        """The C-STORE status, or why there is none."""
        if not self.assoc.is_established:
            self.lost = self.lost or no_response(
                self.destination, self.assoc, self.witness, self.timeout, time.monotonic()
            )
            return None, self.lost
        started = time.monotonic()
        try:
            status = self.assoc.send_c_store(dataset, msg_id=next(self.message_ids))
        except Exception as error:  # the association dropped mid-round, or a bad data set
            return None, Problem(
                f"C-STORE to {self.destination} raised {type(error).__name__}: {error}"[:500]
            )
        if not status or "Status" not in status:
            self.lost = no_response(
                self.destination, self.assoc, self.witness, self.timeout, started
            )
            return None, self.lost
        return int(status.Status), None


def _as_class(item: Outgoing, dataset: Dataset, sop_class: str) -> tuple[Path, Dataset]:
    """The file and data set of ``item`` in ``sop_class``."""
    if str(dataset.SOPClassUID) == sop_class:
        return item.path, dataset
    if item.write_as is None:
        raise ValueError(f"{item.path.name} is stored as {dataset.SOPClassUID}, not {sop_class}")
    path = item.write_as(sop_class)
    return path, dcmread(path)


def _stow(
    destination: Destination,
    outgoing: Sequence[Outgoing],
    datasets: Sequence[Dataset | None],
    unreadable: dict[int, SendResult],
    token: str | None,
    ca: Path | None,
    timeout: float,
) -> list[SendResult]:
    """STOW-RS has no negotiation: each object goes in its first (most specific or pinned)
    class."""
    chosen: dict[int, tuple[Path, Dataset]] = {}
    results: dict[int, SendResult] = dict(unreadable)
    for index, (item, dataset) in enumerate(zip(outgoing, datasets, strict=True)):
        if dataset is None:
            continue
        sop_class = _classes(item, dataset)[0]
        try:
            chosen[index] = _as_class(item, dataset, sop_class)
        except Exception as error:
            log.exception("%s could not be written as %s", item.path.name, sop_class)
            words = f"{item.path.name} could not be written as {sop_class_name(sop_class)}"
            results[index] = SendResult(item.path, None, f"{words}: {type(error).__name__}")
    if chosen:
        indexes = list(chosen)
        sent = stow_files(
            destination,
            [chosen[i][0] for i in indexes],
            [chosen[i][1] for i in indexes],
            token=token,
            ca=ca,
            timeout=timeout,
        )
        for index, result in zip(indexes, sent, strict=True):
            ds = chosen[index][1]
            results[index] = SendResult(
                result.path,
                result.status,
                result.error,
                sop_class_uid=str(ds.SOPClassUID),
                sop_instance_uid=str(ds.SOPInstanceUID),
            )
    return [results[index] for index in range(len(outgoing))]


def _read(path: Path) -> Dataset | None:
    """The stored output, or None when it is gone or damaged (recorded as a failed attempt,
    so a lost file ends the study ``failed`` instead of failing the task forever)."""
    try:
        return dcmread(path)
    except Exception as error:
        log.error("output %s cannot be read: %s", path.name, type(error).__name__)
        return None


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
    ae = make_ae(calling_ae, timeout)
    ae.add_requested_context(Verification)
    assoc, witness = associate(ae, destination)
    if assoc is None or not assoc.is_established:
        if assoc is not None and witness.negotiated:
            problem = f"{destination} does not accept the Verification SOP Class"
        else:
            problem = not_established(destination, witness, timeout).words
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
