"""STOW-RS (DICOMweb store, PS3.18 10.5) for destinations given as ``https://.../dicom-web``.

Why: many PACS and vendor-neutral archives take results over HTTP more readily than over a DICOM
association (firewalls, load balancers, cloud archives). The contract is
``worker.delivery.dimse``'s: one ``SendResult`` per file, never an exception for trouble with the
peer, and a warning counts as delivered. The HTTP work is dicomweb-client's; here is what the answer
means per object:

* 200 OK: every instance stored.
* 202 Accepted / 409 Conflict: the Store Instances Response Module says per instance: a
  ``FailedSOPSequence`` item (Failure Reason, e.g. 0xA700) is not delivered; a
  ``ReferencedSOPSequence`` item is stored, with its Warning Reason (e.g. 0xB000) kept when given.
  An instance the answer does not name is not counted as delivered.
* Any other status, or no answer: nothing delivered, the HTTP status or error in words.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

import requests
from dicomweb_client.api import DICOMwebClient
from pydicom import Dataset

from hrct_triage.common.settings import Destination
from hrct_triage.worker.delivery.outcomes import EchoResult, SendResult

log = logging.getLogger("hrct.delivery")

# The HTTP "status" recorded for an object: the DICOM code when the answer gives one per instance,
# else 0x0000 for an instance stored under 200 OK.
SUCCESS = 0x0000
# Processing failure, recorded for an object the answer did not mention.
UNLISTED = 0x0110


def _client(
    destination: Destination, *, token: str | None, ca: Path | None, timeout: float
) -> DICOMwebClient:
    session = requests.Session()
    if ca is not None:
        session.verify = str(ca)
    headers = {"Authorization": f"Bearer {token}"} if token else None
    assert destination.url is not None
    client = DICOMwebClient(destination.url, session=session, headers=headers, timeout=timeout)
    # Retries are the worklist's (backoff across rounds and worker restarts), not the library's.
    client.set_http_retry_params(retry=False)
    return client


def stow_files(
    destination: Destination,
    paths: Sequence[Path],
    datasets: Sequence[Dataset],
    *,
    token: str | None,
    ca: Path | None,
    timeout: float,
) -> list[SendResult]:
    """POST ``datasets`` (read from ``paths``) in one multipart request; one result per path."""
    client = _client(destination, token=token, ca=ca, timeout=timeout)
    try:
        answer = client.store_instances(list(datasets))
        http_status = 200
    except requests.HTTPError as error:
        response = error.response
        http_status = response.status_code if response is not None else 0
        partial = _answer_of(response) if http_status in (202, 409) else None
        if partial is None:
            reason = f"STOW-RS to {destination} answered HTTP {http_status}"
            return [SendResult(path, None, reason) for path in paths]
        answer = partial
    except (requests.RequestException, OSError, ValueError) as error:
        reason = f"STOW-RS to {destination} failed: {type(error).__name__}"
        return [SendResult(path, None, reason) for path in paths]
    return _per_instance(destination, paths, datasets, answer, http_status)


def _answer_of(response: requests.Response | None) -> Dataset | None:
    """The Store Instances Response of a 202/409 answer, when it is DICOM JSON."""
    if response is None or not response.content:
        return None
    if "json" not in response.headers.get("Content-Type", ""):
        return None
    try:
        return Dataset.from_json(response.json())
    except ValueError:
        return None


def _per_instance(
    destination: Destination,
    paths: Sequence[Path],
    datasets: Sequence[Dataset],
    answer: Dataset,
    http_status: int,
) -> list[SendResult]:
    failed = {
        str(item.get("ReferencedSOPInstanceUID", "")): int(item.get("FailureReason", UNLISTED))
        for item in answer.get("FailedSOPSequence", [])
    }
    stored = {
        str(item.get("ReferencedSOPInstanceUID", "")): item.get("WarningReason")
        for item in answer.get("ReferencedSOPSequence", [])
    }
    results: list[SendResult] = []
    for path, dataset in zip(paths, datasets, strict=True):
        uid = str(dataset.SOPInstanceUID)
        if uid in failed:
            code = failed[uid]
            reason = f"STOW-RS to {destination}: failure 0x{code:04X} (HTTP {http_status})"
            results.append(SendResult(path, code, reason))
        elif uid in stored:
            warning = stored[uid]
            if warning is not None:
                log.warning("%s stored %s with warning 0x%04X", destination, path.name, warning)
            results.append(SendResult(path, int(warning) if warning is not None else SUCCESS, None))
        elif http_status == 200:
            results.append(SendResult(path, SUCCESS, None))  # 200: all stored, list optional
        else:
            reason = f"STOW-RS to {destination}: HTTP {http_status} without this instance"
            results.append(SendResult(path, None, reason))
    return results


def check(
    destination: Destination, *, token: str | None, ca: Path | None, timeout: float
) -> EchoResult:
    """The DICOMweb counterpart of C-ECHO: a QIDO-RS study search limited to one answer, so a
    green check means the service answers and accepts our credentials."""
    started = time.monotonic()
    client = _client(destination, token=token, ca=ca, timeout=timeout)
    try:
        client.search_for_studies(limit=1)
    except requests.HTTPError as error:
        status = error.response.status_code if error.response is not None else None
        detail = f"QIDO-RS answered HTTP {status}"
        return EchoResult(destination, False, status, detail, time.monotonic() - started)
    except (requests.RequestException, OSError, ValueError) as error:
        detail = f"QIDO-RS failed: {type(error).__name__}"
        return EchoResult(destination, False, None, detail, time.monotonic() - started)
    return EchoResult(destination, True, 200, "HTTP 200 (QIDO-RS)", time.monotonic() - started)
