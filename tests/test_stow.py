"""DICOMweb delivery (STOW-RS) to a real peer: Orthanc with its DICOMweb plugin (Debian package
``orthanc-dicomweb``), driven through the worker's own delivery task and the worklist."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import Dataset

from hrct_triage.common.settings import Destination, Settings
from hrct_triage.db.models import StudyStatus
from hrct_triage.worker.delivery.dimse import echo
from hrct_triage.worker.delivery.stow import _per_instance
from hrct_triage.worker.jobs import run_delivery
from tests.helpers.deliveries import (
    analysed_study,
    deliveries_of,
    sessions_for,
    settings_for,
    worker_context,
)
from tests.helpers.dicom_peers import Orthanc

PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


def dicomweb_orthanc(folder: Path) -> Orthanc:
    if not PLUGIN.exists():
        pytest.fail(f"{PLUGIN} missing: scripts/bootstrap installs orthanc-dicomweb")
    return Orthanc(
        folder,
        extra_config={
            "Plugins": [str(PLUGIN)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        },
    )


def _url(peer: Orthanc) -> str:
    return f"http://127.0.0.1:{peer.http_port}/dicom-web"


@pytest.fixture
def stow_peer(tmp_path: Path) -> Iterator[Orthanc]:
    peer = dicomweb_orthanc(tmp_path / "orthanc").start()
    yield peer
    peer.stop()


def test_outputs_reach_a_dicomweb_archive_by_stow_rs(tmp_path: Path, stow_peer: Orthanc) -> None:
    # given a study whose SR and heat maps are owed to a DICOMweb destination
    url = f"sqlite:///{tmp_path / 'worklist.sqlite'}"
    sessions = sessions_for(url)
    study_id, records = analysed_study(sessions, tmp_path / "out", [_url(stow_peer)])
    uids = [r.sop_instance_uid for r in records]
    # when a worker delivers
    assert run_delivery(worker_context(settings_for(tmp_path, url)), study_id) == StudyStatus.DONE
    # then the archive holds every output once, each delivery recorded as stored
    assert Counter(stow_peer.sop_instance_uids()) == Counter(uids)
    deliveries = deliveries_of(sessions, study_id)
    assert {(d.destination, d.state, d.status_code) for d in deliveries} == {
        (_url(stow_peer), "sent", 0)
    }
    # and the destination check (QIDO-RS) is green
    check = echo(Destination.parse(_url(stow_peer)), calling_ae="HRCT_TRIAGE", timeout=10)
    assert check.ok, check.detail


@pytest.mark.orthanc
def test_dicomweb_archive_down_then_back_gets_everything_once(tmp_path: Path) -> None:
    # given a study owed to a DICOMweb archive that is not running yet
    peer = dicomweb_orthanc(tmp_path / "orthanc")
    url = f"sqlite:///{tmp_path / 'worklist.sqlite'}"
    sessions = sessions_for(url)
    study_id, records = analysed_study(sessions, tmp_path / "out", [_url(peer)])
    uids = [r.sop_instance_uid for r in records]
    settings = settings_for(tmp_path, url)
    # when a worker delivers, the study waits with the reason recorded
    assert run_delivery(worker_context(settings), study_id) == StudyStatus.DELIVERING
    assert all(
        d.state == "pending" and "STOW-RS" in (d.error or "")
        for d in deliveries_of(sessions, study_id)
    )
    assert not echo(Destination.parse(_url(peer)), calling_ae="HRCT_TRIAGE", timeout=5).ok
    # when the archive starts and the next round runs
    peer.start()
    try:
        assert run_delivery(worker_context(settings), study_id) == StudyStatus.DONE
        assert Counter(peer.sop_instance_uids()) == Counter(uids)
    finally:
        peer.stop()


def _item(uid: str, **codes: int) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    item.ReferencedSOPInstanceUID = uid
    for keyword, value in codes.items():
        setattr(item, keyword, value)
    return item


def test_a_partial_stow_answer_is_read_per_instance(tmp_path: Path) -> None:
    # given a 202 answer (PS3.18 Store Instances Response) naming one stored instance with a
    # warning, one failure, and saying nothing of a third
    answer = Dataset()
    answer.ReferencedSOPSequence = [_item("1.2.3", WarningReason=0xB000)]
    answer.FailedSOPSequence = [_item("1.2.4", FailureReason=0xA700)]
    sent = []
    for uid in ("1.2.3", "1.2.4", "1.2.5"):
        ds = Dataset()
        ds.SOPInstanceUID = uid
        sent.append(ds)
    paths = [tmp_path / f"{ds.SOPInstanceUID}.dcm" for ds in sent]
    destination = Destination.parse("https://archive.example/dicom-web")
    # when it is read
    results = _per_instance(destination, paths, sent, answer, 202)
    # then the warning counts as delivered and is kept; the failure and the unnamed one are not
    assert [(r.status, r.error is None) for r in results] == [
        (0xB000, True),
        (0xA700, False),
        (None, False),
    ]


def test_dicomweb_destinations_are_urls_without_credentials() -> None:
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        destinations="PACS@10.0.0.5:104,https://vna.example.org:8443/dicom-web/",
    )
    web = settings.delivery.destination_list[1]
    assert (web.is_dicomweb, web.host, web.port, str(web)) == (
        True,
        "vna.example.org",
        8443,
        "https://vna.example.org:8443/dicom-web",
    )
    assert not settings.delivery.destination_list[0].is_dicomweb
    with pytest.raises(ValueError, match="credentials"):
        Settings(_env_file=None, destinations="https://user:secret@vna.example.org/dicom-web")  # type: ignore[call-arg]
