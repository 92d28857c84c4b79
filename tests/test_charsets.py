"""Every Specific Character Set a scanner sends, without the network: how it is resolved
(``common.charsets``), read by the listener (``listener.dicom_header``) and carried into the SR
and SC (``worker.outputs``), over the matrix of tests/helpers/charset_cases.py.

The end-to-end run of the same matrix through the listener, the worker and a PACS is
tests/test_charsets_e2e.py.
"""

from __future__ import annotations

import subprocess
import warnings
from datetime import UTC, datetime, timedelta
from io import BytesIO
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom import Dataset
from pydicom.charset import decode_bytes, encode_string
from pydicom.dataelem import DataElement
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import PersonName
from sqlalchemy.orm import Session, sessionmaker

from hrct_triage.common.charsets import DEFINED_TERMS, decoded, of_dataset, resolve
from hrct_triage.db import queries, worklist
from hrct_triage.db.session import transaction
from hrct_triage.listener.dicom_header import SERIES_DESCRIPTION, read_header
from hrct_triage.worker.method.results import HeatMap, ModelInfo, SliceResult, StudyAnalysis
from hrct_triage.worker.outputs.files import write_output
from hrct_triage.worker.outputs.objects import build_outputs
from hrct_triage.worker.outputs.sr import build_not_analysed_sr
from tests.helpers.charset_cases import ALL, MISTAKES, STANDARD, Case, apply_case
from tests.helpers.dicom_peers import dciodvfy_errors, require_tool

WHEN = datetime(2024, 3, 4, 11, 12, 13)
SIZE = 32
MODEL = ModelInfo(
    name="hrct-triage DenseNet-121",
    version="0.1.0+phantom.untrained",
    sha256="ab" * 32,
    untrained=True,
    trained_on="synthetic phantoms",
)


def _ids(cases: list[Case]) -> list[str]:
    return [case.id for case in cases]


def _header(index: int, study: str, series: str, frame: str) -> Dataset:
    """An axial CT slice header with what the SR and SC read (no pixels)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.StudyDate, ds.StudyTime = "20240304", "101500"
    ds.AccessionNumber, ds.StudyID = "ACC0042", "42"
    ds.Modality, ds.Manufacturer = "CT", "Phantom CT Co"
    ds.ReferringPhysicianName = ""
    ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "PAT-0001", "19700101", "F"
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
    ds.PositionReferenceIndicator = ""
    ds.SeriesNumber, ds.InstanceNumber = 3, index + 1
    ds.BodyPartExamined = "CHEST"
    ds.ImagePositionPatient = [-160.0, -160.0, -5.0 * index]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.SliceThickness, ds.PixelSpacing = 5.0, [10.0, 10.0]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows = ds.Columns = SIZE
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    return ds


def _as_received(ds: Dataset) -> pydicom.FileDataset:
    """``ds`` written and read back, so its text is raw bytes as the worker reads a file."""
    buffer = BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns on the misspelt declarations
        ds.save_as(buffer, enforce_file_format=True)
    return pydicom.dcmread(BytesIO(buffer.getvalue()))


def _study(case: Case, slices: int = 4) -> list[pydicom.FileDataset]:
    uids = generate_uid(), generate_uid(), generate_uid()
    headers = []
    for index in range(slices):
        ds = _header(index, *uids)
        apply_case(ds, case)
        headers.append(_as_received(ds))
    return headers


def _analysis(headers: list[pydicom.FileDataset]) -> StudyAnalysis:
    uids = [str(ds.SOPInstanceUID) for ds in headers]
    grey = np.full((SIZE, SIZE), 0.5, np.float32)
    return StudyAnalysis(
        study_uid=str(headers[0].StudyInstanceUID),
        series_uid=str(headers[0].SeriesInstanceUID),
        probability=0.9,
        threshold=0.8,
        positive=True,
        slices=[SliceResult(uid, 0.9) for uid in uids],
        kept=uids,
        heatmaps=[HeatMap(uids[1], 1.0, 0.9, grey, grey)],
        model=MODEL,
    )


def _same_name(read: object, expected: str) -> bool:
    """Equal in every component group (pydicom drops trailing empty groups either way)."""
    return isinstance(read, PersonName) and read.components == PersonName(expected).components


# ------------------------------------------------------------------------- the test data


# DCMTK (built on the C library's iconv here) converts only sets without code extensions, and
# 3.6.7 predates Latin alphabet No. 9 and maps ISO_IR 13 to another JIS X 0201 than PS3.3's.
_DCMTK_CONVERTS = [
    case
    for case in STANDARD
    if case.declared
    and "2022" not in case.declared
    and case.declared not in ("ISO_IR 203", "ISO_IR 13")
]


@pytest.mark.dcmtk
@pytest.mark.parametrize("case", _DCMTK_CONVERTS, ids=_ids(_DCMTK_CONVERTS))
def test_the_matrix_bytes_read_in_dcmtk_as_the_text_they_stand_for(
    case: Case, tmp_path: Path
) -> None:
    # given a header written as a scanner of that language writes it
    require_tool("dcmconv")
    ds = _header(0, generate_uid(), generate_uid(), generate_uid())
    apply_case(ds, case)
    source = tmp_path / "source.dcm"
    ds.save_as(source, enforce_file_format=True)

    # when DCMTK (another implementation of PS3.5 6.1) converts it to UTF-8
    converted = tmp_path / "utf8.dcm"
    subprocess.run(["dcmconv", "+U8", str(source), str(converted)], check=True, timeout=60)

    # then it reads the text the case stands for: the test bytes are right
    back = pydicom.dcmread(converted)
    assert back.SpecificCharacterSet == "ISO_IR 192"
    assert _same_name(back.PatientName, case.text.patient_name)
    assert back.StudyDescription == case.text.study_description
    assert back.SeriesDescription == case.text.series_description


# PS3.5 Annexes H, I and K: each example name in its bytes, as the standard prints them.
_STANDARD_EXAMPLES = {
    "\\ISO 2022 IR 87": b"Yamada^Tarou=\x1b$B;3ED\x1b(B^\x1b$BB@O:\x1b(B="
    b"\x1b$B$d$^$@\x1b(B^\x1b$B$?$m$&\x1b(B",
    "ISO 2022 IR 13\\ISO 2022 IR 87": b"\xd4\xcf\xc0\xde^\xc0\xdb\xb3=\x1b$B;3ED\x1b(J^"
    b"\x1b$BB@O:\x1b(J=\x1b$B$d$^$@\x1b(J^\x1b$B$?$m$&\x1b(J",
    "\\ISO 2022 IR 149": b"Hong^Gildong=\x1b$)C\xfb\xf3^\x1b$)C\xd1\xce\xd4\xd7="
    b"\x1b$)C\xc8\xab^\x1b$)C\xb1\xe6\xb5\xbf",
}


@pytest.mark.parametrize("declared", list(_STANDARD_EXAMPLES))
def test_the_matrix_bytes_are_the_standards_examples(declared: str) -> None:
    (case,) = [case for case in STANDARD if case.declared == declared]
    ds = Dataset()
    apply_case(ds, case)
    assert ds["PatientName"].value.original_string == _STANDARD_EXAMPLES[declared]


# PS3.3 C.12.1.1.2, Tables C.12-2 to C.12-5
_SINGLE_BYTE = ["100", "101", "109", "110", "144", "127", "126", "138", "148", "203", "13", "166"]
_STANDARD_TERMS = {
    "",
    *(f"ISO_IR {number}" for number in _SINGLE_BYTE),
    *(f"ISO 2022 IR {number}" for number in ["6", *_SINGLE_BYTE, "87", "159", "149", "58"]),
    "ISO_IR 192",
    "GB18030",
    "GBK",
}


def test_the_matrix_covers_every_defined_term() -> None:
    declared = {term for case in STANDARD for term in (case.declared or "").split("\\")}
    assert declared == _STANDARD_TERMS == DEFINED_TERMS


# ------------------------------------------------------------------------------- resolve


@pytest.mark.parametrize("case", ALL, ids=_ids(ALL))
def test_a_substitution_is_named_exactly_when_one_is_made(case: Case) -> None:
    # given the header as received
    (header, *_) = _study(case, slices=1)

    # when its character set is resolved
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # resolved terms never make pydicom guess
        character_set = of_dataset(header)
        name = decoded(header).PatientName

    # then only a wrong declaration is substituted, and the sentence names no patient text
    assert (character_set.substitution is not None) == case.substituted
    assert set(character_set.terms) <= DEFINED_TERMS
    assert _same_name(name, case.text.patient_name)
    if character_set.substitution:
        for group in case.text.patient_name.split("="):
            for part in group.split("^"):
                assert not part or part not in character_set.substitution


@pytest.mark.parametrize(
    ("declared", "terms"),
    [
        ("ISO_IR 149", ("ISO 2022 IR 149",)),
        ("ISO IR 100", ("ISO_IR 100",)),
        ("iso-ir-144", ("ISO_IR 144",)),
        ("ISO 2022 IR 192", ("ISO_IR 192",)),
        ("ISO_IR 6", ("",)),
        ("ISO_8859-7", ("ISO_IR 126",)),
        ("utf-8", ("ISO_IR 192",)),
        ("gb18030", ("GB18030",)),
        (["ISO_IR 192", "ISO 2022 IR 87"], ("ISO_IR 192",)),
        (["", "ISO_IR 192", "ISO 2022 IR 87"], ("", "ISO 2022 IR 87")),
        (["", "NONSENSE", "ISO 2022 IR 149"], ("", "ISO 2022 IR 149")),
        (["ISO_IR 87", "ISO_IR 159"], ("ISO 2022 IR 87", "ISO 2022 IR 159")),
    ],
)
def test_misspelt_and_misused_terms_become_defined_terms(
    declared: str | list[str], terms: tuple[str, ...]
) -> None:
    character_set = resolve(declared, [b"ASCII only"])
    assert character_set.terms == terms
    assert character_set.substitution is not None


def test_a_missing_declaration_over_ascii_is_no_substitution() -> None:
    assert resolve(None, [b"Smith^John"]).terms == ("",)
    assert resolve(None, [b"Smith^John"]).substitution is None
    assert resolve(["", ""], []).substitution is None


def test_pydicom_reads_and_writes_gb2312_and_latin9_code_extensions() -> None:
    # PS3.5 Example K.2-1: "Zhang^XiaoDong=张^小东=" in \ISO 2022 IR 58
    raw = b"Zhang^XiaoDong=\x1b$)A\xd5\xc5^\x1b$)A\xd0\xa1\xb6\xab"
    encodings = resolve(["", "ISO 2022 IR 58"]).encodings
    assert str(PersonName(raw + b"=", encodings=encodings)) == "Zhang^XiaoDong=张^小东"
    assert PersonName("Zhang^XiaoDong=张^小东").encode(encodings) == raw
    # Latin alphabet No. 9 after its escape sequence ESC 02/13 06/02
    latin9 = resolve(["", "ISO 2022 IR 203"]).encodings
    assert decode_bytes(b"\x1b-b\xbcuvre 10 \xa4", latin9, set()) == "Œuvre 10 €"
    assert encode_string("Œuvre", latin9) == b"\x1b-b\xbcuvre"


# ---------------------------------------------------------------------------- the listener


@pytest.mark.parametrize("case", ALL, ids=_ids(ALL))
def test_the_listener_reads_the_series_description_as_the_scanner_meant_it(case: Case) -> None:
    ds = _header(0, generate_uid(), generate_uid(), generate_uid())
    apply_case(ds, case)
    buffer = BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.save_as(buffer, enforce_file_format=False)
    data = buffer.getvalue()
    assert read_header(data, ExplicitVRLittleEndian).text(SERIES_DESCRIPTION) == (
        case.text.series_description
    )


# ------------------------------------------------------------------------------ worklist


@pytest.mark.services
def test_the_worklist_keeps_descriptions_and_the_substitution_note(
    sessions: sessionmaker[Session],
) -> None:
    # given an instance whose header the listener read in a resolved character set
    (case,) = [case for case in MISTAKES if case.declared == "ISO_IR 149"]
    ds = _header(0, generate_uid(), generate_uid(), generate_uid())
    apply_case(ds, case)
    ds.add(DataElement(0x00080050, "SH", "흉부0042".encode("euc_kr")))  # as the scanner sends it
    buffer = BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.save_as(buffer, enforce_file_format=False)
    header = read_header(buffer.getvalue(), ExplicitVRLittleEndian)
    now = datetime(2026, 1, 1, 12, tzinfo=UTC)
    facts = worklist.InstanceFacts(
        study_uid=str(ds.StudyInstanceUID),
        series_uid=str(ds.SeriesInstanceUID),
        sop_instance_uid=str(ds.SOPInstanceUID),
        sop_class_uid=CTImageStorage,
        transfer_syntax_uid=ExplicitVRLittleEndian,
        path="/spool/x.dcm",
        size_bytes=10,
        sha256="a" * 64,
        series_description=header.text(SERIES_DESCRIPTION),
        accession_number=header.text(0x00080050),
    )
    assert header.character_set.substitution is not None
    with transaction(sessions) as session:
        worklist.record_instance(session, facts, association_id=None, now=now)
    with transaction(sessions) as session:
        (study_id,) = worklist.complete_ready_studies(
            session, quiet_seconds=1, now=now + timedelta(seconds=5)
        )

    # when the worker notes the substitution under its claim
    with transaction(sessions) as session:
        claim = worklist.claim(session, study_id, worker="w", lease_seconds=60, now=now)
        assert claim is not None
        noted = worklist.note_analysis(
            session, claim, detail=header.character_set.substitution, now=now
        )

    # then the study shows the description, the accession number and the note as they were
    with transaction(sessions) as session:
        detail = queries.study_detail(session, facts.study_uid)
    assert noted and detail is not None
    assert [s["description"] for s in detail["series"]] == [case.text.series_description]
    assert detail["accession_number"] == "흉부0042"
    assert detail["events"][-1]["detail"] == header.character_set.substitution
    assert detail["events"][-1]["to"] == "processing"


# ------------------------------------------------------------------------------- outputs


@pytest.mark.dcmtk
@pytest.mark.parametrize("case", ALL, ids=_ids(ALL))
def test_outputs_are_utf8_with_the_source_text_and_valid(case: Case, tmp_path: Path) -> None:
    # given a study whose headers are as the scanner sent them
    headers = _study(case)

    # when the SR and SC are built and written
    outputs = build_outputs(_analysis(headers), headers, content_datetime=WHEN)
    paths = [write_output(ds, tmp_path) for ds in outputs.all]

    # then each declares UTF-8, passes dciodvfy, and reads back with the source's text, in
    # pydicom and in highdicom
    for path in paths:
        assert dciodvfy_errors(path) == [], path
        ds = pydicom.dcmread(path)
        assert ds.SpecificCharacterSet == "ISO_IR 192"
        assert _same_name(ds.PatientName, case.text.patient_name)
        assert ds.StudyDescription == case.text.study_description
    sr = hd.sr.srread(paths[-1])
    assert _same_name(sr.PatientName, case.text.patient_name)
    assert sr.StudyDescription == case.text.study_description
    sc = hd.imread(paths[0])
    assert _same_name(sc.PatientName, case.text.patient_name)
    assert sc.StudyDescription == case.text.study_description


@pytest.mark.parametrize(
    "case", MISTAKES[:1] + STANDARD[-4:-1], ids=_ids(MISTAKES[:1] + STANDARD[-4:-1])
)
def test_the_not_analysed_sr_carries_the_source_text(case: Case) -> None:
    headers = _study(case, slices=2)
    sr = build_not_analysed_sr(headers, "no axial CT series", MODEL, content_datetime=WHEN)
    back = pydicom.dcmread(BytesIO(_bytes(sr)))
    assert back.SpecificCharacterSet == "ISO_IR 192"
    assert _same_name(back.PatientName, case.text.patient_name)
    assert back.StudyDescription == case.text.study_description


def _bytes(ds: Dataset) -> bytes:
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
