"""SR class fallback against real PACS: DCMTK storescp restricted by its association
configuration file (``-xf``), and Orthanc. A PACS that does not store Comprehensive 3D SR gets
the SR in a class it stores, valid and readable; one that stores no SR class fails the SR at
once, with the reason, while the heat maps are delivered; a pinned class is the only one sent.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import highdicom as hd
import pydicom
import pytest
from highdicom.sr import ValueTypeValues
from highdicom.sr.utils import find_content_items
from sqlalchemy import select

from hrct_triage.common.sop_classes import (
    COMPREHENSIVE_3D_SR,
    COMPREHENSIVE_SR,
    ENHANCED_SR,
    SECONDARY_CAPTURE,
)
from hrct_triage.db import worklist
from hrct_triage.db.models import DestinationCapabilities, Output, Study, StudyStatus
from hrct_triage.db.session import transaction
from hrct_triage.worker.jobs import run_delivery, run_triage
from hrct_triage.worker.outputs.sr import COVID_19
from hrct_triage.worker.outputs.uids import sr_uid_for_class
from tests.helpers.deliveries import (
    analysed_study,
    delivery_rows,
    queued_from_files,
    sessions_for,
    settings_for,
    sop_classes_of,
    worker_context,
)
from tests.helpers.dicom_peers import Orthanc, dciodvfy_errors
from tests.helpers.pacs_peers import ConfiguredStoreSCP, PynetdicomPeer
from tests.helpers.worklist import T0, study_row


@pytest.fixture(scope="module")
def phantom_study(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """A small COVID-like phantom (24 thin slices): enough for a real analysis, quick to make."""
    from hrct_triage.phantoms import write_phantom_studies

    out = tmp_path_factory.mktemp("fallback-phantom")
    (study,) = write_phantom_studies(out, covid=1, healthy=0, slices=24, seed=11)
    return sorted(study.folder.rglob("*.dcm"))


@cache
def _model() -> Any:
    from hrct_triage.worker.method.model import load_model

    return load_model(None, allow_untrained=True, device="cpu")


def _sr_output(sessions: Any, study_id: int) -> Output:
    with transaction(sessions) as session:
        output = session.scalars(
            select(Output).where(Output.study_id == study_id, Output.kind == "sr")
        ).one()
        session.expunge(output)
        return output


def _decision(sr: pydicom.Dataset) -> str:
    """The code of the SR's qualitative evaluation COVID-19 = Present/Absent."""
    (item,) = find_content_items(sr, name=COVID_19, value_type=ValueTypeValues.CODE, recursive=True)
    return str(item.ConceptCodeSequence[0].CodeValue)


def _cli(tmp_path: Path, *args: str, **env_values: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HRCT_")}
    env.update({"HRCT_DATA_DIR": str(tmp_path / "var"), "COLUMNS": "200", **env_values})
    return subprocess.run(
        [sys.executable, "-m", "hrct_triage", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture
def no_3d_pacs(tmp_path: Path) -> Iterator[ConfiguredStoreSCP]:
    scp = ConfiguredStoreSCP(tmp_path / "pacs", "NoComprehensive3D").start()
    yield scp
    scp.stop()


@pytest.mark.dcmtk
def test_pacs_without_comprehensive_3d_sr_gets_the_analysis_as_comprehensive_sr(
    tmp_path: Path, phantom_study: list[Path], no_3d_pacs: ConfiguredStoreSCP
) -> None:
    # given a complete phantom study and a PACS that stores every class of ours but
    # Comprehensive 3D SR (storescp -xf, profile NoComprehensive3D)
    url = f"sqlite:///{tmp_path / 'worklist.sqlite'}"
    sessions = sessions_for(url)
    study_id = queued_from_files(sessions, phantom_study)
    settings = settings_for(tmp_path, url, destinations=[no_3d_pacs.destination])
    # when a worker analyses and delivers it
    outcome = run_triage(worker_context(settings, _model), study_id)
    # then the study is done at the first round
    study = study_row(sessions, study_id)
    assert (outcome, study.status) == (StudyStatus.DONE, StudyStatus.DONE), study.reason
    # and the PACS holds the heat maps and the SR as a Comprehensive SR, under the UID derived
    # for that class from the stored SR's
    received = no_3d_pacs.files()
    assert sop_classes_of(received) == sorted([SECONDARY_CAPTURE] * 2 + [COMPREHENSIVE_SR])
    stored = _sr_output(sessions, study_id)
    assert stored.sop_class_uid == COMPREHENSIVE_3D_SR
    (sr_path,) = [p for p in received if pydicom.dcmread(p).SOPClassUID == COMPREHENSIVE_SR]
    sr = pydicom.dcmread(sr_path)
    assert sr.SOPInstanceUID == sr_uid_for_class(stored.sop_instance_uid, COMPREHENSIVE_SR)
    # and it is valid, and reads back as a Comprehensive SR stating the recorded decision
    assert dciodvfy_errors(sr_path) == []
    assert isinstance(hd.sr.srread(sr_path), hd.sr.ComprehensiveSR)
    assert _decision(sr) == ("52101004" if study.positive else "272519000")
    # and the delivery row says what went out
    (sr_delivery,) = delivery_rows(sessions, study_id)["sr"]
    assert (sr_delivery.state, sr_delivery.sop_class_uid) == ("sent", COMPREHENSIVE_SR)
    assert sr_delivery.sop_instance_uid == sr.SOPInstanceUID
    # and the destination's refusal was checked and kept: 3D refused, the rest accepted
    with transaction(sessions) as session:
        kept = session.scalars(select(DestinationCapabilities)).one()
        answers = {(a["sop_class_uid"], a["accepted"]) for a in kept.answers}
    assert (COMPREHENSIVE_3D_SR, False) in answers and (COMPREHENSIVE_SR, True) in answers


@pytest.mark.dcmtk
def test_pacs_storing_only_enhanced_sr_gets_an_enhanced_sr(tmp_path: Path) -> None:
    # given a study owed to a PACS whose only SR class is Enhanced SR
    pacs = ConfiguredStoreSCP(tmp_path / "pacs", "EnhancedOnly").start()
    try:
        url = f"sqlite:///{tmp_path / 'worklist.sqlite'}"
        sessions = sessions_for(url)
        study_id, records = analysed_study(sessions, tmp_path / "out", [pacs.destination])
        # when it is delivered
        outcome = run_delivery(worker_context(settings_for(tmp_path, url)), study_id)
    finally:
        pacs.stop()
    # then it is done, the SR arrived as a valid Enhanced SR that highdicom reads back
    assert outcome == StudyStatus.DONE
    (sr_path,) = [p for p in pacs.files() if pydicom.dcmread(p).SOPClassUID == ENHANCED_SR]
    assert dciodvfy_errors(sr_path) == []
    assert isinstance(hd.sr.srread(sr_path), hd.sr.EnhancedSR)
    (sr_record,) = [r for r in records if r.kind == "sr"]
    expected = sr_uid_for_class(sr_record.sop_instance_uid, ENHANCED_SR)
    assert pydicom.dcmread(sr_path).SOPInstanceUID == expected
    (sr_delivery,) = delivery_rows(sessions, study_id)["sr"]
    assert (sr_delivery.sop_class_uid, sr_delivery.sop_instance_uid) == (ENHANCED_SR, expected)


@pytest.mark.dcmtk
@pytest.mark.services
def test_pacs_storing_no_sr_class_fails_the_sr_at_once_and_gets_the_heat_maps(
    tmp_path: Path, database_url: str
) -> None:
    # given a study owed to a PACS that stores Secondary Capture but no SR class at all
    pacs = ConfiguredStoreSCP(tmp_path / "pacs", "NoSR").start()
    try:
        url = database_url
        sessions = sessions_for(url)
        study_id, _ = analysed_study(sessions, tmp_path / "out", [pacs.destination])
        # when one delivery round runs
        outcome = run_delivery(worker_context(settings_for(tmp_path, url)), study_id)
    finally:
        pacs.stop()
    # then the study ends failed at once, not after its attempts, and no round is owed
    study = study_row(sessions, study_id)
    assert outcome == study.status == StudyStatus.FAILED
    with transaction(sessions) as session:
        later = T0.replace(year=2100)
        assert worklist.due_publications(session, now=later, republish_seconds=1) == []
    # and the SR's delivery failed after one attempt with what the PACS said of each class
    rows = delivery_rows(sessions, study_id)
    (sr,) = rows["sr"]
    words = (
        f"{pacs.destination} accepts none of the classes this SR can be sent as: "
        "Comprehensive 3D SR (abstract syntax not supported); "
        "Comprehensive SR (abstract syntax not supported); "
        "Enhanced SR (abstract syntax not supported)"
    )
    assert (sr.state, sr.attempts, sr.error) == ("failed", 1, words)
    assert study.reason == f"delivery to {pacs.destination} failed after 1 attempt: {words}"
    # and the heat maps were delivered all the same
    assert {(d.state, d.status_code) for d in rows["sc"]} == {("sent", 0)}
    assert sop_classes_of(pacs.files()) == [SECONDARY_CAPTURE] * 2
    # and `show` prints the reason for the SR
    shown = _cli(tmp_path, "show", study.study_uid, "--json", HRCT_DATABASE_URL=url)
    assert shown.returncode == 0, shown.stderr
    document = json.loads(shown.stdout)
    assert document["reason"] == study.reason
    assert [o["error"] for o in document["outputs"] if o["kind"] == "sr"] == [words]
    # and what the PACS accepts was checked again and kept
    with transaction(sessions) as session:
        kept = session.scalars(select(DestinationCapabilities)).one()
        accepted = {a["sop_class_uid"] for a in kept.answers if a["accepted"]}
    assert accepted == {SECONDARY_CAPTURE}


@pytest.mark.dcmtk
def test_pinned_class_is_the_one_sent_though_the_pacs_takes_more(tmp_path: Path) -> None:
    # given a PACS that stores every class, pinned to Enhanced SR by its destination entry
    pacs = ConfiguredStoreSCP(tmp_path / "pacs", None).start()
    try:
        url = f"sqlite:///{tmp_path / 'worklist.sqlite'}"
        sessions = sessions_for(url)
        study_id, _ = analysed_study(sessions, tmp_path / "out", [pacs.destination])
        settings = settings_for(tmp_path, url, destinations=[f"{pacs.destination}?sr=enhanced"])
        # when the study is delivered
        outcome = run_delivery(worker_context(settings), study_id)
    finally:
        pacs.stop()
    # then the SR went as Enhanced SR, the delivery rows naming the peer without the option
    assert outcome == StudyStatus.DONE
    assert sop_classes_of(pacs.files()) == sorted([SECONDARY_CAPTURE] * 2 + [ENHANCED_SR])
    (sr,) = delivery_rows(sessions, study_id)["sr"]
    assert (sr.destination, sr.sop_class_uid) == (pacs.destination, ENHANCED_SR)


# Orthanc 1.10 cannot be told which SOP classes to accept (no such setting), but a Lua
# filter can drop what it receives while answering success: a PACS that accepts a class and
# mishandles it, the case a pinned class is for.
DROP_3D_SR_LUA = """
function ReceivedInstanceFilter(dicom, origin, info)
  return dicom.SOPClassUID ~= '1.2.840.10008.5.1.4.1.1.88.34'
end
"""


@pytest.mark.dcmtk
@pytest.mark.orthanc
def test_orthanc_that_drops_3d_sr_gets_the_sr_once_pinned_to_comprehensive(tmp_path: Path) -> None:
    # given Orthanc with a filter that drops Comprehensive 3D SR yet answers success
    script = tmp_path / "drop.lua"
    script.write_text(DROP_3D_SR_LUA)
    orthanc = Orthanc(tmp_path / "orthanc", extra_config={"LuaScripts": [str(script)]}).start()
    try:
        url = f"sqlite:///{tmp_path / 'worklist.sqlite'}"
        sessions = sessions_for(url)
        study_id, records = analysed_study(sessions, tmp_path / "out", [orthanc.destination])
        # when the study is delivered as negotiated: Orthanc accepts 3D SR and loses it
        assert run_delivery(worker_context(settings_for(tmp_path, url)), study_id) == "done"
        sr_uid = next(r.sop_instance_uid for r in records if r.kind == "sr")
        assert sr_uid not in orthanc.sop_instance_uids()
        # and, pinned to Comprehensive SR, it is sent again
        with transaction(sessions) as session:
            study = session.get(Study, study_id)
            assert study is not None and worklist.resend(session, study, now=T0) == 3
        pinned = settings_for(
            tmp_path, url, destinations=[f"{orthanc.destination}?sr=comprehensive"]
        )
        assert run_delivery(worker_context(pinned), study_id) == StudyStatus.DONE
        # then Orthanc holds the SR as a Comprehensive SR, valid and readable
        expected = sr_uid_for_class(sr_uid, COMPREHENSIVE_SR)
        assert expected in orthanc.sop_instance_uids()
        (instance,) = [
            i for i in orthanc.get("/instances?expand")
            if i["MainDicomTags"]["SOPInstanceUID"] == expected
        ]  # fmt: skip
        stored = tmp_path / "from-orthanc.dcm"
        file_url = f"http://127.0.0.1:{orthanc.http_port}/instances/{instance['ID']}/file"
        with urllib.request.urlopen(file_url, timeout=30) as answer:
            stored.write_bytes(answer.read())
    finally:
        orthanc.stop()
    assert pydicom.dcmread(stored).SOPClassUID == COMPREHENSIVE_SR
    assert dciodvfy_errors(stored) == []
    assert isinstance(hd.sr.srread(stored), hd.sr.ComprehensiveSR)


def _answers(document: dict[str, Any]) -> dict[str, set[str]]:
    """``{SOP class: {transfer syntaxes accepted}}`` of one destination's JSON report."""
    accepted: dict[str, set[str]] = {}
    for answer in document["answers"]:
        syntaxes = accepted.setdefault(answer["sop_class_uid"], set())
        if answer["accepted"]:
            syntaxes.add(answer["transfer_syntax_uid"])
    return accepted


@pytest.mark.dcmtk
@pytest.mark.orthanc
def test_echo_capabilities_shows_what_each_pacs_accepts_and_keeps_it(tmp_path: Path) -> None:
    # given storescp as shipped (+xa), storescp without Comprehensive 3D SR, one without any SR
    # class, and Orthanc as installed
    default = ConfiguredStoreSCP(tmp_path / "default", None, ae_title="DEFAULT").start()
    no_3d = ConfiguredStoreSCP(tmp_path / "no3d", "NoComprehensive3D", ae_title="NO3D").start()
    no_sr = ConfiguredStoreSCP(tmp_path / "nosr", "NoSR", ae_title="NOSR").start()
    orthanc = Orthanc(tmp_path / "orthanc").start()
    peers = [default.destination, no_3d.destination, no_sr.destination, orthanc.destination]
    url = f"sqlite:///{tmp_path / 'worklist.sqlite'}"
    sessions = sessions_for(url)
    try:
        # when the operator asks for their capabilities, as JSON and as a table
        env = {"HRCT_DESTINATIONS": ",".join(peers), "HRCT_DATABASE_URL": url}
        as_json = _cli(tmp_path, "echo", "--capabilities", "--json", **env)
        table = _cli(tmp_path, "echo", "--capabilities", **env)
        plain = _cli(tmp_path, "echo", HRCT_DESTINATIONS=peers[0])
    finally:
        for peer in (default, no_3d, no_sr, orthanc):
            peer.stop()
    reports = {r["destination"]: r for r in json.loads(as_json.stdout)}
    explicit, implicit = "1.2.840.10008.1.2.1", "1.2.840.10008.1.2"
    both = {explicit, implicit}
    every = {COMPREHENSIVE_3D_SR: both, COMPREHENSIVE_SR: both, ENHANCED_SR: both}
    # then storescp and Orthanc as installed take every class in both syntaxes, the SR as 3D
    for peer in (default.destination, orthanc.destination):
        assert _answers(reports[peer]) == {**every, SECONDARY_CAPTURE: both}
        assert reports[peer]["sr_sent_as"] == COMPREHENSIVE_3D_SR and reports[peer]["ok"]
    # and the restricted storescp refuses what its profile leaves out, saying why
    assert _answers(reports[no_3d.destination]) == {
        **every, COMPREHENSIVE_3D_SR: set(), SECONDARY_CAPTURE: both
    }  # fmt: skip
    assert reports[no_3d.destination]["sr_sent_as"] == COMPREHENSIVE_SR
    refused = [a for a in reports[no_sr.destination]["answers"] if not a["accepted"]]
    assert {a["detail"] for a in refused} == {"abstract syntax not supported"}
    assert reports[no_sr.destination]["sr_sent_as"] is None
    assert not reports[no_sr.destination]["ok"]
    # and the exit code says a destination would refuse an output; the table says which
    assert as_json.returncode == table.returncode == 1, as_json.stderr + table.stderr
    assert f"{no_3d.destination}: SR as Comprehensive SR; heat maps as Secondary Capture" in (
        table.stdout
    )
    assert f"{no_sr.destination}: no SR class accepted: the SR would fail" in table.stdout
    # and plain echo is as it was
    assert plain.returncode == 0 and "0x0000" in plain.stdout
    # and the answers are kept in the worklist for the worker
    with transaction(sessions) as session:
        kept = {row.destination for row in session.scalars(select(DestinationCapabilities))}
    assert kept == set(peers)


def test_a_refusal_already_known_costs_no_second_check_and_purge_finds_the_rewritten_sr(
    tmp_path: Path,
) -> None:
    # given a PACS that stores every class of ours but Comprehensive 3D SR, and two studies
    peer = PynetdicomPeer(
        lambda event: 0x0000, classes=(COMPREHENSIVE_SR, ENHANCED_SR, SECONDARY_CAPTURE)
    )
    url = f"sqlite:///{tmp_path / 'worklist.sqlite'}"
    sessions = sessions_for(url)
    settings = settings_for(tmp_path, url)
    first, _ = analysed_study(sessions, tmp_path / "out1", [peer.destination])
    second, _ = analysed_study(sessions, tmp_path / "out2", [peer.destination])
    try:
        # when the first is delivered: one association to send, one to check what it accepts
        assert run_delivery(worker_context(settings), first) == StudyStatus.DONE
        after_first = peer.associations
        # and then the second, whose refusal the kept answers already know
        assert run_delivery(worker_context(settings), second) == StudyStatus.DONE
    finally:
        peer.stop()
    # then the first round checked once and the second did not check again
    assert (after_first, peer.associations) == (2, 3)
    # and a purge of the first study would delete the SR it sent as Comprehensive SR too
    (sr,) = delivery_rows(sessions, first)["sr"]
    sent = _sr_output(sessions, first)
    rewritten = Path(sent.path).with_name(f"{sr.sop_instance_uid}.dcm")
    assert rewritten.is_file() and sr.sop_class_uid == COMPREHENSIVE_SR
    with transaction(sessions) as session:
        candidates = worklist.purge_candidates(session, older_than=T0.replace(year=2100))
    (candidate,) = [c for c in candidates if c.study_id == first]
    assert str(rewritten) in candidate.paths and sent.path in candidate.paths


@pytest.mark.orthanc
def test_dicomweb_destination_pinned_to_comprehensive_gets_a_comprehensive_sr(
    tmp_path: Path,
) -> None:
    # given Orthanc's DICOMweb service as a destination pinned to Comprehensive SR
    plugin = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
    assert plugin.exists(), f"{plugin} missing: scripts/bootstrap installs orthanc-dicomweb"
    orthanc = Orthanc(
        tmp_path / "orthanc",
        extra_config={
            "Plugins": [str(plugin)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        },
    ).start()
    base = f"http://127.0.0.1:{orthanc.http_port}/dicom-web"
    try:
        url = f"sqlite:///{tmp_path / 'worklist.sqlite'}"
        sessions = sessions_for(url)
        study_id, records = analysed_study(sessions, tmp_path / "out", [base])
        settings = settings_for(tmp_path, url, destinations=[f"{base}?sr=comprehensive"])
        # when a worker delivers by STOW-RS
        outcome = run_delivery(worker_context(settings), study_id)
        held = orthanc.sop_instance_uids()
    finally:
        orthanc.stop()
    # then the archive holds the SR rewritten as Comprehensive SR, recorded as such
    assert outcome == StudyStatus.DONE
    sr_uid = next(r.sop_instance_uid for r in records if r.kind == "sr")
    expected = sr_uid_for_class(sr_uid, COMPREHENSIVE_SR)
    assert expected in held and sr_uid not in held
    (sr,) = delivery_rows(sessions, study_id)["sr"]
    assert (sr.destination, sr.sop_class_uid, sr.sop_instance_uid) == (
        base,
        COMPREHENSIVE_SR,
        expected,
    )
