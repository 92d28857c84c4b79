"""The listener's header reader decodes what pydicom decodes, without pydicom on the ASCII path.

Each data set is encoded by pydicom; the reader's values are checked against pydicom reading the
same bytes, in each transfer syntax the listener may receive uncompressed.
"""

from __future__ import annotations

from io import BytesIO

import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from pydicom.uid import (
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from hrct_triage.listener.dicom_header import (
    ACCESSION_NUMBER,
    MODALITY,
    SERIES_DESCRIPTION,
    SERIES_INSTANCE_UID,
    SERIES_NUMBER,
    SOP_INSTANCE_UID,
    MalformedDataSet,
    read_header,
)


def _encode(dataset: Dataset, transfer_syntax: str) -> bytes:
    """The data set as a scanner sends it in a C-STORE: no preamble, no File Meta."""
    out = DicomBytesIO()
    out.is_implicit_VR = transfer_syntax == ImplicitVRLittleEndian
    out.is_little_endian = transfer_syntax != ExplicitVRBigEndian
    write_dataset(out, dataset)
    return out.getvalue()


def _pydicom_reads(data: bytes, transfer_syntax: str) -> Dataset:
    return read_dataset(
        BytesIO(data),
        is_implicit_VR=transfer_syntax == ImplicitVRLittleEndian,
        is_little_endian=transfer_syntax != ExplicitVRBigEndian,
    )


def _dataset(**values: object) -> Dataset:
    dataset = Dataset()
    dataset.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    dataset.SOPInstanceUID = "1.2.3.4.5"  # odd length: padded with a NUL on the wire
    dataset.StudyInstanceUID = "1.2.3"
    dataset.SeriesInstanceUID = "1.2.3.4"
    for keyword, value in values.items():
        setattr(dataset, keyword, value)
    return dataset


@pytest.mark.parametrize(
    "transfer_syntax", [ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian]
)
def test_ascii_values_are_decoded_as_pydicom_decodes_them(transfer_syntax: str) -> None:
    dataset = _dataset(
        Modality="CT", SeriesDescription="Thorax 1.0 B70f ", AccessionNumber="A1", SeriesNumber=7
    )
    data = _encode(dataset, transfer_syntax)
    header = read_header(data, transfer_syntax)
    theirs = _pydicom_reads(data, transfer_syntax)
    assert header.uid(SOP_INSTANCE_UID) == theirs.SOPInstanceUID == "1.2.3.4.5"
    assert header.uid(SERIES_INSTANCE_UID) == theirs.SeriesInstanceUID
    assert header.text(MODALITY) == theirs.Modality == "CT"
    assert header.text(SERIES_DESCRIPTION) == theirs.SeriesDescription == "Thorax 1.0 B70f"
    assert header.text(ACCESSION_NUMBER) == "A1"
    assert header.integer(SERIES_NUMBER) == 7


@pytest.mark.parametrize(
    ("character_set", "description"),
    [
        ("ISO_IR 100", "Thorax nativ für Lunge"),
        ("ISO_IR 192", "胸部 CT 肺窗"),
        ("ISO_IR 144", "Грудная клетка"),
    ],
)
def test_text_beyond_ascii_is_decoded_in_the_data_sets_character_set(
    character_set: str, description: str
) -> None:
    dataset = _dataset(SpecificCharacterSet=character_set, SeriesDescription=description)
    data = _encode(dataset, ExplicitVRLittleEndian)
    assert not description.isascii()
    assert read_header(data, ExplicitVRLittleEndian).text(SERIES_DESCRIPTION) == description


def test_absent_empty_and_multi_valued_attributes_read_as_none() -> None:
    dataset = _dataset(SeriesDescription="", AccessionNumber=None)
    dataset.add_new(0x00200011, "IS", "1\\2")  # Series Number with two values
    header = read_header(_encode(dataset, ExplicitVRLittleEndian), ExplicitVRLittleEndian)
    assert header.text(MODALITY) is None
    assert header.text(SERIES_DESCRIPTION) is None
    assert header.text(ACCESSION_NUMBER) is None
    assert header.integer(SERIES_NUMBER) is None


def test_a_data_set_cut_short_is_refused() -> None:
    data = _encode(_dataset(Modality="CT"), ExplicitVRLittleEndian)
    with pytest.raises(MalformedDataSet):
        read_header(data[:-3], ExplicitVRLittleEndian)


@pytest.mark.parametrize(
    "transfer_syntax", [ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian]
)
def test_undefined_length_sequences_are_walked_over_to_the_attributes_after_them(
    transfer_syntax: str,
) -> None:
    # given undefined-length sequences, one item nested in another, before the series' UID and
    # number the listener records
    inner = Dataset()
    inner.CodeValue, inner.CodingSchemeDesignator, inner.CodeMeaning = "1", "99X", "x"
    outer = Dataset()
    outer.ReferencedSOPInstanceUID = "1.2.3.9"
    outer.PurposeOfReferenceCodeSequence = [inner]
    outer["PurposeOfReferenceCodeSequence"].is_undefined_length = True
    dataset = _dataset(Modality="CT", SeriesNumber=3)
    dataset.ReferencedImageSequence = [outer, Dataset()]
    dataset["ReferencedImageSequence"].is_undefined_length = True
    data = _encode(dataset, transfer_syntax)
    # when its header is read, then the attributes after the sequences are those pydicom reads
    header = read_header(data, transfer_syntax)
    theirs = _pydicom_reads(data, transfer_syntax)
    assert header.uid(SERIES_INSTANCE_UID) == theirs.SeriesInstanceUID == "1.2.3.4"
    assert header.text(MODALITY) == "CT"
    assert header.integer(SERIES_NUMBER) == 3
    # and the same data set cut inside the nested item is refused
    cut = data.index(b"99X")
    with pytest.raises(MalformedDataSet):
        read_header(data[:cut], transfer_syntax)
