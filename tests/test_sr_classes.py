"""Which SR classes our SR can be written in, and the SR rewritten for each, judged by the tools
that read PS3.3 independently of us: dciodvfy checks the IOD (modules, value types, by-reference
links), DCMTK's dsrdump checks the content relationships against the IOD's table, highdicom reads
the document back as its class.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from pydicom import Dataset

from hrct_triage.common.settings import Destination, Settings
from hrct_triage.common.sop_classes import (
    COMPREHENSIVE_3D_SR,
    COMPREHENSIVE_SR,
    ENHANCED_SR,
    SR_CLASSES,
)
from hrct_triage.worker.outputs.files import write_output
from hrct_triage.worker.outputs.objects import build_outputs
from hrct_triage.worker.outputs.sr import build_not_analysed_sr
from hrct_triage.worker.outputs.sr_classes import (
    as_class,
    content_problems,
    writable_classes,
    write_as_class,
)
from hrct_triage.worker.outputs.uids import sr_uid_for_class
from tests.helpers.dicom_peers import dciodvfy_errors, require_tool
from tests.helpers.fake_study import WHEN, ct_series, make_analysis

_HIGHDICOM_CLASS = {
    COMPREHENSIVE_3D_SR: hd.sr.Comprehensive3DSR,
    COMPREHENSIVE_SR: hd.sr.ComprehensiveSR,
    ENHANCED_SR: hd.sr.EnhancedSR,
}


@pytest.fixture(scope="module")
def stored_sr(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The SR of an analysis as the worker files it (Comprehensive 3D SR)."""
    headers = ct_series(20, 32, pixels=False)
    outputs = build_outputs(make_analysis(headers), headers, content_datetime=WHEN)
    return write_output(outputs.sr, tmp_path_factory.mktemp("sr"))


def _dsrdump(path: Path) -> subprocess.CompletedProcess[str]:
    require_tool("dsrdump")
    return subprocess.run(
        ["dsrdump", "-v", str(path)], capture_output=True, text=True, timeout=60, check=False
    )


def _without_uids(ds: Dataset) -> Dataset:
    copy = Dataset(dict(ds.items()))
    del copy.SOPClassUID
    del copy.SOPInstanceUID
    return copy


def test_our_sr_can_be_written_in_every_sr_class_most_specific_first(stored_sr: Path) -> None:
    # given the SR of an analysis and the SR saying a study was not analysed
    headers = ct_series(4, 16, pixels=False)
    model = make_analysis(ct_series(20, 32, pixels=False)).model
    not_analysed = build_not_analysed_sr(headers, "no axial CT", model, content_datetime=WHEN)
    # then each fits all three classes, the Comprehensive 3D SR it is built as first
    assert writable_classes(pydicom.dcmread(stored_sr)) == SR_CLASSES
    assert writable_classes(not_analysed) == SR_CLASSES
    assert content_problems(not_analysed, ENHANCED_SR) == []


@pytest.mark.dcmtk
@pytest.mark.parametrize("sop_class", [COMPREHENSIVE_SR, ENHANCED_SR])
def test_rewritten_sr_is_valid_in_its_class_and_reads_back_as_it(
    stored_sr: Path, sop_class: str
) -> None:
    # when the stored SR is written as another class
    path = write_as_class(stored_sr, sop_class)
    # then it sits beside the stored one under its own derived UID
    original = pydicom.dcmread(stored_sr)
    rewritten = pydicom.dcmread(path)
    uid = sr_uid_for_class(str(original.SOPInstanceUID), sop_class)
    assert path == stored_sr.with_name(f"{uid}.dcm")
    assert (rewritten.SOPClassUID, rewritten.SOPInstanceUID) == (sop_class, uid)
    assert rewritten.file_meta.MediaStorageSOPInstanceUID == uid
    # and dciodvfy finds no error in it as that IOD, and DCMTK reads its content tree
    assert dciodvfy_errors(path) == []
    dump = _dsrdump(path)
    assert dump.returncode == 0, dump.stderr
    assert "E:" not in dump.stderr and "Imaging Measurement Report" in dump.stdout
    # and highdicom reads it back as that class, with the same content as the stored SR
    assert isinstance(hd.sr.srread(path), _HIGHDICOM_CLASS[sop_class])
    assert _without_uids(rewritten) == _without_uids(original)
    # and the stored SR is untouched
    assert pydicom.dcmread(stored_sr).SOPClassUID == COMPREHENSIVE_3D_SR


def test_rewriting_is_deterministic_and_each_class_has_its_own_uid(
    stored_sr: Path, tmp_path: Path
) -> None:
    # given the stored SR, rewritten twice for each class
    sr = pydicom.dcmread(stored_sr)
    first = {c: as_class(sr, c) for c in (COMPREHENSIVE_SR, ENHANCED_SR)}
    again = {c: as_class(pydicom.dcmread(stored_sr), c) for c in (COMPREHENSIVE_SR, ENHANCED_SR)}
    # then the same class gives the same bytes, each class its own UID, none the stored one's
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for sop_class in first:
        a = write_output(first[sop_class], tmp_path / "a")
        b = write_output(again[sop_class], tmp_path / "b")
        assert a.read_bytes() == b.read_bytes()
    uids = {str(ds.SOPInstanceUID) for ds in first.values()} | {str(sr.SOPInstanceUID)}
    assert len(uids) == 3
    # and its own class is the stored object itself
    assert as_class(sr, COMPREHENSIVE_3D_SR) is sr
    assert write_as_class(stored_sr, COMPREHENSIVE_3D_SR) == stored_sr
    # and a rewritten SR is never rewritten back up into a more specific class
    with pytest.raises(ValueError, match="only in less specific classes, not Comprehensive SR"):
        as_class(first[ENHANCED_SR], COMPREHENSIVE_SR)


def _positions(ds: Dataset, path: tuple[int, ...] = (1,)) -> list[tuple[tuple[int, ...], Dataset]]:
    """Every content item with its position (the root is (1,), its first child (1, 1))."""
    found = []
    for index, item in enumerate(ds.get("ContentSequence", []), start=1):
        found.append(((*path, index), item))
        found.extend(_positions(item, (*path, index)))
    return found


def _bytes(ds: Dataset) -> bytes:
    buffer = pydicom.filebase.DicomBytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


@pytest.mark.dcmtk
def test_content_the_weaker_classes_forbid_is_refused(stored_sr: Path, tmp_path: Path) -> None:
    sr = pydicom.dcmread(stored_sr)
    # given our SR with a by-reference relationship (the measurement group containing, by
    # reference, an image of the image library), and one with a 3D point
    with_reference = pydicom.dcmread(pydicom.filebase.DicomBytesIO(_bytes(sr)))
    items = _positions(with_reference)
    image = next(position for position, item in items if item.ValueType == "IMAGE")
    group = next(item for _, item in items if item.ValueType == "CONTAINER" and "NUM" in {
        child.ValueType for child in item.get("ContentSequence", [])
    })  # fmt: skip
    by_reference = Dataset()
    by_reference.RelationshipType = "CONTAINS"
    by_reference.ReferencedContentItemIdentifier = list(image)
    group.ContentSequence.append(by_reference)
    point = Dataset()
    point.RelationshipType = "CONTAINS"
    point.ValueType = "SCOORD3D"
    point.ConceptNameCodeSequence = [sr.ConceptNameCodeSequence[0]]
    point.GraphicType = "POINT"
    point.GraphicData = [1.0, 2.0, 3.0]
    point.ReferencedFrameOfReferenceUID = "1.2.3"
    with_point = pydicom.dcmread(pydicom.filebase.DicomBytesIO(_bytes(sr)))
    with_point.ContentSequence.append(point)
    # then we refuse to write the first as Enhanced SR (no by-reference) but not as
    # Comprehensive SR, and the second as either (no 3D coordinates)
    assert content_problems(with_reference, COMPREHENSIVE_SR) == []
    assert any("by reference" in p for p in content_problems(with_reference, ENHANCED_SR))
    assert writable_classes(with_reference) == (COMPREHENSIVE_3D_SR, COMPREHENSIVE_SR)
    assert writable_classes(with_point) == (COMPREHENSIVE_3D_SR,)
    assert "SCOORD3D" in content_problems(with_point, COMPREHENSIVE_SR)[0]
    with pytest.raises(ValueError, match="by reference"):
        as_class(with_reference, ENHANCED_SR)
    # and the validators agree on the 3D point: relabelled by force as Comprehensive SR,
    # dciodvfy rejects its value type and DCMTK refuses its relationship. (On by-reference links
    # they do not judge by class: dciodvfy flags one in either class and dsrdump in neither,
    # so that rule is PS3.3's text, A.35.2.3.1.2 against A.35.3.3.1.2.)
    copy = pydicom.dcmread(pydicom.filebase.DicomBytesIO(_bytes(with_point)))
    copy.SOPClassUID = COMPREHENSIVE_SR
    copy.file_meta.MediaStorageSOPClassUID = COMPREHENSIVE_SR
    forced = tmp_path / "point-as-comprehensive.dcm"
    copy.save_as(forced, enforce_file_format=True)
    assert any("SCOORD3D" in line for line in dciodvfy_errors(forced))
    assert _dsrdump(forced).returncode != 0


def test_destination_option_pins_the_sr_class_and_a_bad_entry_is_named() -> None:
    # given destinations with and without the sr= option
    pinned = Destination.parse("PACS@pacs.example:104?sr=comprehensive")
    web = Destination.parse("https://pacs.example/dicom-web?sr=enhanced")
    # then the option pins the class, and the name the worklist records is the peer's
    assert pinned.sr_class == COMPREHENSIVE_SR and str(pinned) == "PACS@pacs.example:104"
    assert web.sr_class == ENHANCED_SR and str(web) == "https://pacs.example/dicom-web"
    assert Destination.parse("PACS@pacs.example:104").sr_class is None
    # and a bad option is refused at start, naming the entry and what it may say
    for entry, words in (
        ("PACS@h:104?sr=basic", "sr='basic' is not one of comprehensive3d, comprehensive"),
        ("PACS@h:104?tls=1", "the only option is sr=<comprehensive3d|comprehensive|enhanced>"),
        ("https://h/dicom-web?sr=enhanced&x=1", "the only option is sr="),
    ):
        with pytest.raises(ValueError, match="HRCT_DESTINATIONS entry") as refused:
            Settings(_env_file=None, destinations=entry)
        assert entry in str(refused.value) and words in str(refused.value)
