"""One delivery round of a study: each destination's pending outputs sent over one association,
the SR offered in every class it can be written in (or the one its destination is pinned to),
every answer recorded, and a destination that refused a class checked again.

Where the outputs (which SR classes fit, the rewritten SR) meet delivery (the network) and the
worklist (the records), so neither of those has to know the others.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from functools import partial
from pathlib import Path

from pydicom import dcmread
from sqlalchemy.orm import Session

from hrct_triage.common.settings import Destination, Settings
from hrct_triage.common.sop_classes import SR_CLASSES, sop_class_name
from hrct_triage.db import worklist
from hrct_triage.worker.delivery.capabilities import check_capabilities
from hrct_triage.worker.delivery.dimse import send_files
from hrct_triage.worker.delivery.outcomes import Capabilities, Outgoing, SendResult
from hrct_triage.worker.outputs.sr_classes import content_problems, writable_classes, write_as_class

log = logging.getLogger("hrct.worker")

Transaction = Callable[[], AbstractContextManager[Session]]


@dataclass(frozen=True)
class Pending:
    """A delivery still owed: which output file goes to which destination."""

    delivery_id: int
    destination: str
    attempts: int
    path: Path
    kind: str = "sc"  # "sr" or "sc", as in the outputs table
    sop_class_uid: str = ""  # of the stored output


def deliver_round(
    settings: Settings,
    transaction: Transaction,
    study_id: int,
    pending: Sequence[Pending],
    now: Callable[[], datetime],
) -> int:
    """Send ``pending``, one association per destination, and record every answer as it
    comes. Returns the most attempts any delivery still pending has had (0: none is), which
    sets the backoff; a permanent failure is final and sets none."""
    # A delivery row names its peer; the settings add its ``?sr=`` pin, clinical or shadow.
    configured = {
        str(d): d
        for d in (*settings.delivery.shadow_destination_list, *settings.delivery.destination_list)
    }
    by_destination: dict[str, list[Pending]] = defaultdict(list)
    for item in pending:
        by_destination[item.destination].append(item)
    most_attempts = 0
    for name, items in by_destination.items():
        destination = configured.get(name) or Destination.parse(name)
        offers = [_offer(item, destination) for item in items]
        outgoing = [offer for offer in offers if isinstance(offer, Outgoing)]
        sent = send_files(
            destination,
            outgoing,
            calling_ae=settings.listener.ae_title,
            timeout=settings.delivery.delivery_timeout_seconds,
            dicomweb_token=settings.delivery.dicomweb_token,
            dicomweb_ca=settings.delivery.dicomweb_ca,
        ) if outgoing else []  # fmt: skip
        results = _merge(offers, sent)
        if any(r.refused_classes or r.permanent for r in results):
            results = _check_again(settings, transaction, destination, items, results, now())
        with transaction() as session:
            for item, result in zip(items, results, strict=True):
                worklist.record_delivery(
                    session,
                    item.delivery_id,
                    status_code=result.status,
                    error=result.error,
                    max_attempts=settings.delivery.delivery_attempts,
                    now=now(),
                    permanent=result.permanent,
                    sop_class_uid=result.sop_class_uid,
                    sop_instance_uid=result.sop_instance_uid,
                )
                if result.error and not result.permanent:
                    most_attempts = max(most_attempts, item.attempts + 1)
        _log(study_id, destination, items, results)
    return most_attempts


def _offer(item: Pending, destination: Destination) -> Outgoing | SendResult:
    """What to send for ``item``: an SR in its own class and each less specific one (the
    pinned one only, when the destination is pinned), anything else as stored; or, when a pin
    cannot be honoured, the permanent failure to record instead.

    Whether the SR's content fits a less specific class is checked when that class is needed
    (``write_as_class`` refuses it), not every round: reading a 300-image SR's content tree
    takes a noticeable part of a second. A pin is checked here, to say exactly why it fails.
    """
    if item.kind != "sr" or item.sop_class_uid not in SR_CLASSES:
        return Outgoing(item.path)
    pin = destination.sr_class
    if pin is None or pin == item.sop_class_uid:
        classes = SR_CLASSES[SR_CLASSES.index(item.sop_class_uid) :]
        return Outgoing(
            item.path, classes if pin is None else (pin,), partial(write_as_class, item.path)
        )
    try:
        sr = dcmread(item.path)
        fits = pin in writable_classes(sr)
        why = "" if fits else "; ".join(content_problems(sr, pin)[:3])
    except Exception:  # a lost or damaged file: sending it records "cannot read"
        return Outgoing(item.path)
    if not fits:
        return SendResult(
            item.path,
            None,
            f"{destination} is pinned to {sop_class_name(pin)} (sr= option), which this SR "
            f"cannot be written as: {why or 'a more specific class than it is stored in'}",
            permanent=True,
        )
    return Outgoing(item.path, (pin,), partial(write_as_class, item.path))


def _merge(offers: Sequence[Outgoing | SendResult], sent: Sequence[SendResult]) -> list[SendResult]:
    """One result per offer, in order: the answers to what was sent, the refusals made here."""
    answers = iter(sent)
    return [offer if isinstance(offer, SendResult) else next(answers) for offer in offers]


def _check_again(
    settings: Settings,
    transaction: Transaction,
    destination: Destination,
    items: Sequence[Pending],
    results: list[SendResult],
    now: datetime,
) -> list[SendResult]:
    """Ask ``destination`` again what it accepts, when it refused a class or rejected us for
    good, and keep the answer. A permanent failure the fresh answer contradicts (a class it
    now accepts) is retried after all. A refusal the kept answer already knew of is not
    checked again, so a PACS that always refuses one class costs no extra association."""
    permanent = any(r.permanent for r in results)
    with transaction() as session:
        known = worklist.load_capabilities(session, str(destination))
        kept = None if known is None else (list(known.answers), known.problem)
    if not permanent and kept is not None and _refusals_known(kept[0], results):
        return results
    fresh = check_capabilities(
        destination,
        calling_ae=settings.listener.ae_title,
        timeout=settings.delivery.delivery_timeout_seconds,
    )
    with transaction() as session:
        worklist.save_capabilities(
            session,
            str(destination),
            answers=[asdict(answer) for answer in fresh.answers],
            problem=fresh.problem,
            now=now,
        )
    return [
        _confirmed(item, destination, result, fresh)
        for item, result in zip(items, results, strict=True)
    ]


def _refusals_known(answers: Sequence[dict[str, object]], results: Sequence[SendResult]) -> bool:
    """True when the kept answers already record every class just refused as refused."""
    refused = {str(a["sop_class_uid"]) for a in answers if not a.get("accepted")}
    accepted = {str(a["sop_class_uid"]) for a in answers if a.get("accepted")}
    return all(c in refused and c not in accepted for r in results for c in r.refused_classes)


def _confirmed(
    item: Pending, destination: Destination, result: SendResult, fresh: Capabilities
) -> SendResult:
    """``result``, no longer permanent when the fresh check accepts a class it may go as."""
    if not result.permanent or result.sop_class_uid is not None or fresh.problem is not None:
        return result
    offer = _offer(item, destination)
    if not isinstance(offer, Outgoing):
        return result  # a pin it cannot honour: no answer changes that
    classes = offer.classes or _stored_class(item.path)
    if offer.write_as is not None:
        classes = tuple(c for c in classes if c in _writable(item.path))
    now_accepted = [c for c in classes if fresh.accepts(c)]
    if not now_accepted:
        return result
    words = (
        f"{result.error}; a check just after accepted {sop_class_name(now_accepted[0])}, "
        "so it is tried again"
    )
    return replace(result, error=words, permanent=False)


def _writable(path: Path) -> tuple[str, ...]:
    try:
        return writable_classes(dcmread(path))
    except Exception:
        return ()


def _stored_class(path: Path) -> tuple[str, ...]:
    try:
        return (str(dcmread(path, stop_before_pixels=True).SOPClassUID),)
    except Exception:
        return ()


def _log(
    study_id: int, destination: Destination, items: Sequence[Pending], results: Sequence[SendResult]
) -> None:
    """One line per distinct problem, and one per SR that went in a fallback class."""
    for item, result in zip(items, results, strict=True):
        if item.kind == "sr" and result.error is None and result.refused_classes:
            log.info(
                "study %d: SR sent to %s as %s (refused: %s)",
                study_id,
                destination,
                sop_class_name(result.sop_class_uid or ""),
                ", ".join(sop_class_name(c) for c in result.refused_classes),
                extra={"study_id": study_id},
            )
    problems: dict[str, int] = defaultdict(int)
    for result in results:
        if result.error:
            problems[result.error] += 1
    for words, count in problems.items():
        log.warning(
            "study %d: %d of %d objects not delivered to %s: %s",
            study_id,
            count,
            len(results),
            destination,
            words,
            extra={"study_id": study_id},
        )
