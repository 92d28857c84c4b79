"""The SR written with pre-encoded content sequences is the SR written from plain datasets.

``worker.outputs.sr_encoded`` hands the image library and the source images to pydicom already
encoded; these tests build the same SR both ways (``build_sr(pre_encoded=...)``) and compare the
files byte for byte, and check that the fast way was taken where it should be, so a test cannot pass
by both ways being the slow one.
"""

from __future__ import annotations

from dataclasses import replace
from typing import cast

import pydicom
import pytest
from pydicom import Dataset
from pydicom.uid import ImplicitVRLittleEndian

from hrct_triage.worker.method.results import StudyAnalysis
from hrct_triage.worker.outputs.objects import encode
from hrct_triage.worker.outputs.sc import build_heatmap_scs
from hrct_triage.worker.outputs.sr import build_sr
from hrct_triage.worker.outputs.sr_encoded import content_sequence, is_pre_encoded
from tests.helpers.fake_study import WHEN, by_uid, ct_series, make_analysis, make_model


def _srs(headers: list[Dataset], analysis: StudyAnalysis) -> tuple[Dataset, Dataset]:
    """(pre-encoded, plain) SRs of the same analysis."""
    scs = build_heatmap_scs(analysis, by_uid(headers), content_datetime=WHEN)
    return (
        build_sr(analysis, headers, scs, content_datetime=WHEN),
        build_sr(analysis, headers, scs, content_datetime=WHEN, pre_encoded=False),
    )


def _pre_encoded_count(ds: Dataset) -> int:
    """Pre-encoded elements anywhere in ``ds``, without decoding them."""
    count, stack = 0, [ds]
    while stack:
        item = stack.pop()
        for element in item.elements():
            if is_pre_encoded(element):
                count += 1
            elif not element.is_raw and element.VR == "SQ":
                stack.extend(cast(list[Dataset], element.value))
    return count


@pytest.fixture(scope="module")
def series() -> list[Dataset]:
    headers = ct_series(slices=40, pixels=False)
    # positions whose DS text pydicom must shorten or keep in exponent form
    for header, z in zip(headers, ["-0.3000000000004", "1e-7", "123456789.1234"], strict=False):
        header.ImagePositionPatient = ["-193.2858", "-193.2858", z]
    return headers


def test_pre_encoded_sr_is_written_byte_for_byte_as_the_plain_one(series: list[Dataset]) -> None:
    # given an analysis of a 40-slice series with two heat maps
    fast, plain = _srs(series, make_analysis(series))
    # then the fast SR holds pre-encoded library groups (CT, SC) and source images, the plain none
    assert _pre_encoded_count(fast) == 3
    assert _pre_encoded_count(plain) == 0
    # and both write the same bytes
    assert encode(fast) == encode(plain)


def test_a_pre_encoded_sr_reads_back_as_the_plain_one(series: list[Dataset]) -> None:
    fast, plain = _srs(series, make_analysis(series, positive=False))
    # when read back from the files, the content trees are equal item for item
    assert pydicom.dcmread(pydicom.filebase.DicomBytesIO(encode(fast))) == pydicom.dcmread(
        pydicom.filebase.DicomBytesIO(encode(plain))
    )
    # and in memory, decoding the pre-encoded elements gives the plain datasets
    assert fast.ContentSequence == plain.ContentSequence


def test_text_beyond_ascii_falls_back_to_plain_datasets(series: list[Dataset]) -> None:
    # given a model whose training note (in the algorithm parameters) is not ASCII
    model = replace(make_model(), trained_on="Phantome aus Zürich")
    fast, plain = _srs(series, make_analysis(series, model=model))
    # then the measurement group stays plain (the two library groups are still pre-encoded)
    assert _pre_encoded_count(fast) == 2
    assert encode(fast) == encode(plain)


def test_another_transfer_syntax_is_written_by_pydicom_from_the_decoded_items(
    series: list[Dataset],
) -> None:
    # given both SRs switched to implicit VR after they were built
    fast, plain = _srs(series, make_analysis(series))
    for sr in (fast, plain):
        sr.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    # then the pre-encoded (explicit VR) bytes are not written as they are
    assert encode(fast) == encode(plain)


def test_content_sequence_refuses_what_only_pydicom_can_encode() -> None:
    item = Dataset()
    item.CodeMeaning = "Größe"
    assert content_sequence([item]) is None
    with_charset = Dataset()
    with_charset.SpecificCharacterSet = "ISO_IR 100"
    assert content_sequence([with_charset]) is None
    assert content_sequence([b"\xfe\xff\x00\xe0\x00\x00\x00\x00"]) is not None
