"""Structured logs: JSON lines parse and carry study_uid; a real C-STORE of a phantom with a
known patient name, ID and birth date leaves none of them in any log line."""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pynetdicom import AE
from sqlalchemy.orm import Session, sessionmaker

from hrct_triage.common.logs import JsonFormatter, configure_logging, make_formatter
from hrct_triage.common.settings import Settings
from hrct_triage.listener.scp import Listener
from tests.helpers.listeners import listener_settings, thin_series, wait_until_no_open_association

PATIENT_NAME = "Zzyzx^Philomena^Quintessa"
PATIENT_ID = "PID-8675309-XQ"
BIRTH_DATE = "19370412"


@pytest.fixture
def json_lines() -> Iterator[io.StringIO]:
    """Every record of every logger, DEBUG and up, as the JSON formatter writes it."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    previous = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    yield stream
    root.removeHandler(handler)
    root.setLevel(previous)


def parsed(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line]


def wait_for_line(stream: io.StringIO, fragment: str) -> None:
    """The listener logs the association's end in its own thread, just after the client returns."""
    deadline = time.monotonic() + 10
    while fragment not in stream.getvalue():
        if time.monotonic() > deadline:
            raise AssertionError(f"no log line with {fragment!r} within 10 s")
        time.sleep(0.05)


def test_json_line_has_the_fields_and_only_listed_extras() -> None:
    # given a record with context and a field that is not on the list
    record = logging.LogRecord("hrct.worker", logging.INFO, __file__, 1, "study %d", (7,), None)
    record.study_uid = "1.2.3"
    record.association = 12
    record.dataset = "PatientName=Doe^Jane"
    # when formatted as JSON
    document = json.loads(JsonFormatter().format(record))
    # then it carries time, level, logger, message and the listed context only
    assert document["level"] == "INFO" and document["logger"] == "hrct.worker"
    assert document["message"] == "study 7"
    assert document["study_uid"] == "1.2.3" and document["association"] == 12
    assert document["time"].endswith("+00:00")
    assert "dataset" not in document


def test_configure_logging_replaces_its_own_handler(tmp_path: Path) -> None:
    root = logging.getLogger()
    before = list(root.handlers)
    level = root.level
    settings = Settings(_env_file=None, data_dir=tmp_path, log_format="json")
    try:
        configure_logging(settings, "WARNING")
        configure_logging(settings, "INFO")
        added = [h for h in root.handlers if h not in before]
        assert len(added) == 1 and isinstance(added[0].formatter, JsonFormatter)
        assert root.level == logging.INFO
    finally:
        for handler in root.handlers[:]:
            if handler not in before:
                root.removeHandler(handler)
        root.setLevel(level)
    with pytest.raises(ValueError, match="log_format"):
        make_formatter("xml")


def _phantom_with_identifiers(phantom_dir: Path) -> pydicom.Dataset:
    dataset = pydicom.dcmread(thin_series(phantom_dir)[0])
    dataset.PatientName = PATIENT_NAME
    dataset.PatientID = PATIENT_ID
    dataset.PatientBirthDate = BIRTH_DATE
    return dataset


def _store(port: int, dataset: pydicom.Dataset) -> int:
    ae = AE(ae_title="CT_SCANNER")
    ae.add_requested_context(dataset.SOPClassUID, dataset.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="HRCT_TRIAGE")
    assert assoc.is_established
    status = int(assoc.send_c_store(dataset).Status)
    assoc.release()
    return status


def _assert_no_identifier(text: str) -> None:
    for identifier in (PATIENT_NAME, "Zzyzx", "Philomena", PATIENT_ID, BIRTH_DATE, "1937-04-12"):
        assert identifier not in text


@pytest.mark.parametrize("disk_full", [False, True], ids=["stored", "refused"])
def test_store_of_a_named_phantom_logs_no_patient_identifier(
    tmp_path: Path,
    database_url: str,
    sessions: sessionmaker[Session],
    phantom_dir: Path,
    json_lines: io.StringIO,
    disk_full: bool,
) -> None:
    # given a listener (one whose spool is too full, for the refusal path) and a phantom slice
    # carrying a patient name, ID and birth date
    overrides: dict[str, Any] = {"metrics_port": 0}
    if disk_full:
        overrides["min_free_disk_bytes"] = 1 << 62
    scp = Listener(
        listener_settings(tmp_path / "var", database_url, **overrides),
        sessions,
        run_dispatcher=False,
    )
    scp.start()
    dataset = _phantom_with_identifiers(phantom_dir)
    try:
        # when a scanner stores it over a real association, with every logger at DEBUG
        status = _store(scp.port, dataset)
        wait_until_no_open_association(sessions)
        wait_for_line(json_lines, "refused)")  # "association N released|closed after ..."
    finally:
        scp.stop()
    # then it was answered as expected and logged, and no line holds an identifier
    assert status == (0xA700 if disk_full else 0x0000)
    lines = parsed(json_lines)
    assert any(line.get("association") for line in lines)
    _assert_no_identifier(json_lines.getvalue())
    if disk_full:
        # and the refusal line carries the study UID and the reason, as JSON fields
        refusal = next(line for line in lines if "C-STORE refused" in line["message"])
        assert refusal["study_uid"] == str(dataset.StudyInstanceUID)
        assert refusal["status"] == "0xA700" and refusal["reason_kind"] == "disk_full"
        assert refusal["level"] == "WARNING" and refusal["logger"] == "hrct.listener"
