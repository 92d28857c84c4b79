"""Every Specific Character Set end to end: one phantom study per case of
tests/helpers/charset_cases.py (every Defined Term, the multi-valued forms, scanners' mistakes), its
headers rewritten as a scanner of that language writes them, all sent by DCMTK storescu to one
``hrct-triage up`` whose results go to DCMTK storescp and to Orthanc. Then, per study: analysed and
delivered; every output valid for dciodvfy and carrying the source's name and description; the
worklist (``show``, the JSON API, the web page) showing the descriptions and any substitution;
Orthanc's REST API showing the name and description the scanner sent.

The studies are the phantom's thin series at half resolution (256 x 256), so that all 48
analyses fit one run on two CPU cores (about six minutes).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import highdicom as hd
import pydicom
import pytest
import uvicorn
from markupsafe import escape
from pydicom import Dataset
from pydicom.uid import generate_uid
from pydicom.valuerep import PersonName
from sqlalchemy import select

from hrct_triage.db.models import Study, StudyStatus
from hrct_triage.db.session import make_engine, make_sessionmaker, transaction
from hrct_triage.web.app import create_app
from tests.helpers.charset_cases import ALL, Case, apply_case
from tests.helpers.dicom_peers import Orthanc, StoreSCP, dciodvfy_errors, storescu
from tests.helpers.ports import free_port, wait_for_port

pytestmark = [pytest.mark.dcmtk, pytest.mark.orthanc, pytest.mark.timeout(1800)]

TERMINAL = (StudyStatus.DONE, StudyStatus.FAILED, StudyStatus.NOT_APPLICABLE)
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"
TOKEN = "charset-matrix-token"
NOTE = "Specific Character Set"  # how every substitution note begins


# ------------------------------------------------------------------------------ the studies


def _template(folder: Path) -> list[Dataset]:
    """The thin series of one phantom study, at half resolution (headers as the phantom has)."""
    from hrct_triage.phantoms import write_phantom_studies

    write_phantom_studies(folder, covid=1, healthy=0, slices=24, seed=5)
    thin: list[Dataset] = []
    for path in sorted(folder.rglob("CT_02*.dcm")):
        ds = pydicom.dcmread(path)
        pixels = ds.pixel_array[::2, ::2]
        ds.PixelData = pixels.tobytes()
        ds.Rows, ds.Columns = pixels.shape
        ds.PixelSpacing = [float(v) * 2 for v in ds.PixelSpacing]
        thin.append(ds)
    assert len(thin) == 24
    return thin


def _write_study(template: list[Dataset], case: Case, index: int, folder: Path) -> str:
    """``template`` as a study of its own, its headers written as ``case``'s scanner writes."""
    study_uid, series_uid, frame_uid = generate_uid(), generate_uid(), generate_uid()
    folder.mkdir(parents=True)
    for number, source in enumerate(template):
        ds = copy.deepcopy(source)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.AccessionNumber = f"CS{index:02d}"
        apply_case(ds, case)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns on the misspelt declarations
            ds.save_as(folder / f"CT_{number:03d}.dcm", enforce_file_format=True)
    return study_uid


# ------------------------------------------------------------------------------ the gateway


class Gateway:
    """``hrct-triage up`` on the embedded defaults (SQLite, embedded broker) in a subprocess."""

    def __init__(self, folder: Path, destinations: str) -> None:
        self.port = free_port()
        self.log = folder / "gateway.log"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("HRCT_")}
        self.env.update(
            {
                "HRCT_DATA_DIR": str(folder / "var"),
                "HRCT_PORT": str(self.port),
                "HRCT_QUIET_SECONDS": "2",
                "HRCT_POLL_SECONDS": "0.5",
                "HRCT_DESTINATIONS": destinations,
                "HRCT_MAX_ATTEMPTS": "1",
                "HRCT_HEATMAPS": "1",
                "HRCT_METRICS_PORT": "0",
            }
        )
        self.database_url = f"sqlite:///{folder / 'var' / 'worklist.sqlite'}"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "hrct_triage", "up", "--workers", "2"],
            env=self.env,
            stdout=self.log.open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        wait_for_port(self.port, timeout=60)
        self.sessions = make_sessionmaker(make_engine(self.database_url))

    def wait_for(self, uids: list[str], timeout: float) -> dict[str, Study]:
        deadline = time.monotonic() + timeout
        found: dict[str, Study] = {}
        while time.monotonic() < deadline:
            with transaction(self.sessions) as session:
                rows = session.scalars(select(Study).where(Study.study_uid.in_(uids))).all()
                for row in rows:
                    session.expunge(row)
            found = {row.study_uid: row for row in rows}
            if len(found) == len(uids) and all(s.status in TERMINAL for s in found.values()):
                return found
            assert self.process.poll() is None, self.log.read_text(errors="replace")[-3000:]
            time.sleep(1)
        raise AssertionError(
            f"{sum(s.status in TERMINAL for s in found.values())} of "
            f"{len(uids)} studies finished in {timeout} s\n"
            + self.log.read_text(errors="replace")[-3000:]
        )

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "hrct_triage", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, 9)
            self.process.wait()


class Web:
    """The web worklist over the gateway's database, on a free port in this process."""

    def __init__(self, gateway: Gateway) -> None:
        self.port = free_port()
        self.server = uvicorn.Server(
            uvicorn.Config(
                create_app(gateway.sessions, token=TOKEN),
                host="127.0.0.1",
                port=self.port,
                log_level="warning",
                lifespan="off",
            )
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        wait_for_port(self.port)

    def get(self, path: str) -> bytes:
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}")
        request.add_header("Authorization", f"Bearer {TOKEN}")
        with urllib.request.urlopen(request, timeout=30) as answer:
            body: bytes = answer.read()
            return body

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@dataclass
class Run:
    gateway: Gateway
    web: Web
    orthanc: Orthanc
    studies: dict[str, Study]  # by case id
    outputs: dict[str, dict[str, list[Path]]]  # by study UID, then SOP Class UID


def _outputs(pacs: StoreSCP) -> dict[str, dict[str, list[Path]]]:
    found: dict[str, dict[str, list[Path]]] = {}
    for path in pacs.files():
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        by_class = found.setdefault(str(ds.StudyInstanceUID), {SR_CLASS: [], SC_CLASS: []})
        by_class.setdefault(str(ds.SOPClassUID), []).append(path)
    return found


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    """Every case's study sent in one storescu call to one gateway; waits for all of them."""
    folder = tmp_path_factory.mktemp("charsets")
    template = _template(folder / "phantom")
    uids = {
        case.id: _write_study(template, case, index, folder / "send" / f"{index:02d}")
        for index, case in enumerate(ALL)
    }
    pacs = StoreSCP(folder / "pacs").start()
    orthanc = Orthanc(folder / "orthanc").start()
    gateway = Gateway(folder, f"{pacs.destination},{orthanc.destination}")
    web: Web | None = None
    try:
        sent = storescu(gateway.port, folder / "send")
        assert sent.returncode == 0, sent.stderr[-2000:]
        by_uid = gateway.wait_for(list(uids.values()), timeout=1500)
        expected = len(ALL) * 2  # an SR and one heat map each
        deadline = time.monotonic() + 60
        while len(pacs.files()) < expected and time.monotonic() < deadline:
            time.sleep(0.5)
        web = Web(gateway)
        yield Run(
            gateway,
            web,
            orthanc,
            {case_id: by_uid[uid] for case_id, uid in uids.items()},
            _outputs(pacs),
        )
    finally:
        if web is not None:
            web.stop()
        gateway.stop()
        orthanc.stop()
        pacs.stop()


def _same_name(read: object, expected: str) -> bool:
    return PersonName(str(read)).components == PersonName(expected).components


# --------------------------------------------------------------------------------- checks


@pytest.mark.parametrize("case", ALL, ids=[case.id for case in ALL])
def test_every_study_is_analysed_and_its_outputs_carry_the_scanners_text(
    run: Run, case: Case
) -> None:
    # given the study sent with this Specific Character Set
    study = run.studies[case.id]

    # then it was analysed and delivered, like any other
    assert study.status == StudyStatus.DONE, f"{study.status}: {study.reason}"
    outputs = run.outputs[study.study_uid]
    assert len(outputs[SR_CLASS]) == 1
    assert len(outputs[SC_CLASS]) == 1

    # and each output is valid, in UTF-8, and reads back with the name and description the
    # scanner sent, in pydicom and highdicom
    for path in outputs[SR_CLASS] + outputs[SC_CLASS]:
        assert dciodvfy_errors(path) == [], path.name
        ds = pydicom.dcmread(path)
        assert ds.SpecificCharacterSet == "ISO_IR 192"
        assert _same_name(ds.PatientName, case.text.patient_name)
        assert ds.StudyDescription == case.text.study_description
    sr = hd.sr.srread(outputs[SR_CLASS][0])
    assert _same_name(sr.PatientName, case.text.patient_name)
    assert sr.StudyDescription == case.text.study_description
    sc = hd.imread(outputs[SC_CLASS][0])
    assert _same_name(sc.PatientName, case.text.patient_name)
    assert sc.StudyDescription == case.text.study_description


def _notes(events: list[dict[str, Any]]) -> list[str]:
    return [str(e["detail"]) for e in events if str(e["detail"] or "").startswith(NOTE)]


@pytest.mark.parametrize("case", ALL, ids=[case.id for case in ALL])
def test_the_worklist_shows_the_description_and_any_substitution(run: Run, case: Case) -> None:
    # given the analysed study
    uid = run.studies[case.id].study_uid

    # when an operator asks `show`, a script the JSON API, a reader the web page
    shown = run.gateway.cli("show", uid, "--json")
    assert shown.returncode == 0, shown.stderr
    detail = json.loads(shown.stdout)
    api = json.loads(run.web.get(f"/api/studies/{uid}"))
    page = run.web.get(f"/studies/{uid}").decode("utf-8")

    # then each shows the series description as the scanner meant it
    for document in (detail, api):
        assert [s["description"] for s in document["series"]] == [case.text.series_description]
        assert document["accession_number"] == run.studies[case.id].accession_number
    assert escape(case.text.series_description) in page

    # and says why the text was read in another set than declared, exactly when it was
    notes = _notes(detail["events"])
    assert _notes(api["events"]) == notes
    assert len(notes) == (1 if case.substituted else 0), notes
    for note in notes:
        assert escape(note) in page


def test_the_logs_hold_no_patient_name(run: Run) -> None:
    log = run.gateway.log.read_text(errors="replace")
    assert "Specific Character Set" in log  # the substitutions were logged
    for case in ALL:
        for group in case.text.patient_name.split("="):
            for part in group.split("^"):
                assert len(part) < 2 or part not in log, (case.id, part)


@pytest.mark.parametrize("case", ALL, ids=[case.id for case in ALL])
def test_orthanc_shows_the_name_the_scanner_sent(run: Run, case: Case) -> None:
    # given Orthanc as a second PACS, which received the study's SR and heat map
    uid = run.studies[case.id].study_uid
    (found,) = _lookup(run.orthanc, uid)

    # then its study view and the SR's tags show the name and description the scanner sent
    study = run.orthanc.get(f"/studies/{found}")
    assert _same_name(study["PatientMainDicomTags"]["PatientName"], case.text.patient_name)
    assert study["MainDicomTags"]["StudyDescription"] == case.text.study_description
    (sr,) = [
        instance
        for series in run.orthanc.get(f"/studies/{found}/series")
        if series["MainDicomTags"]["Modality"] == "SR"
        for instance in series["Instances"]
    ]
    tags = run.orthanc.get(f"/instances/{sr}/simplified-tags")
    assert _same_name(tags["PatientName"], case.text.patient_name)
    assert tags["StudyDescription"] == case.text.study_description


def _lookup(orthanc: Orthanc, study_uid: str) -> list[str]:
    """Orthanc's identifiers of the study with ``study_uid``."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{orthanc.http_port}/tools/lookup", data=study_uid.encode(), method="POST"
    )
    with urllib.request.urlopen(request, timeout=30) as answer:
        return [item["ID"] for item in json.load(answer) if item["Type"] == "Study"]
