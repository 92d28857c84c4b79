"""The SR's hand-assembled content items encode exactly as highdicom's own classes would.

``worker.outputs.sr_library`` builds image library entries and measurement-group source images from
pydicom elements for speed; if highdicom ever encoded these items differently, these tests say
so before an SR changes.
"""

from __future__ import annotations

import highdicom as hd
import pytest
from pydicom import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from hrct_triage.worker.outputs.sr_library import (
    SOURCE,
    SOURCE_OF_MEASUREMENT,
    add_content,
    image_item,
    library_entry,
)

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
SC_IMAGE = "1.2.840.10008.5.1.4.1.1.7"
_POSITIONS = (
    codes.DCM.ImagePositionPatientX,
    codes.DCM.ImagePositionPatientY,
    codes.DCM.ImagePositionPatientZ,
)


def _encoded(item: Dataset) -> bytes:
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_dataset(buffer, item)
    return buffer.getvalue()


def _highdicom_entry(ds: Dataset) -> hd.sr.ImageContentItem:
    """What worker.outputs.sr built with highdicom before the entries were assembled by hand."""
    entry = hd.sr.ImageContentItem(
        name=SOURCE,
        referenced_sop_class_uid=ds.SOPClassUID,
        referenced_sop_instance_uid=ds.SOPInstanceUID,
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )
    if "ImagePositionPatient" in ds:
        entry.ContentSequence = hd.sr.ContentSequence(
            [
                hd.sr.NumContentItem(
                    name=name,
                    value=float(value),
                    unit=codes.UCUM.Millimeter,
                    relationship_type=hd.sr.RelationshipTypeValues.HAS_ACQ_CONTEXT,
                )
                for name, value in zip(_POSITIONS, ds.ImagePositionPatient, strict=True)
            ]
        )
    return entry


@pytest.mark.parametrize(
    "position",
    [
        ["-193.2858", "-193.2858", "-85.1333"],
        ["0", "1e-7", "123456789.1234"],
        ["-0.3000000000004", "12.5", "-1234.56789012"],
    ],
)
def test_ct_entry_matches_highdicom(position: list[str]) -> None:
    ds = Dataset()
    ds.SOPClassUID = CT_IMAGE
    ds.SOPInstanceUID = generate_uid()
    ds.ImagePositionPatient = position
    assert _encoded(library_entry(ds)) == _encoded(_highdicom_entry(ds))


def test_entry_without_position_matches_highdicom() -> None:
    ds = Dataset()
    ds.SOPClassUID = SC_IMAGE
    ds.SOPInstanceUID = generate_uid()
    entry = library_entry(ds)
    assert "ContentSequence" not in entry
    assert _encoded(entry) == _encoded(_highdicom_entry(ds))


def test_source_image_matches_highdicom() -> None:
    uid = generate_uid()
    expected = hd.sr.SourceImageForMeasurementGroup(
        referenced_sop_class_uid=CT_IMAGE, referenced_sop_instance_uid=uid
    )
    assert _encoded(image_item(SOURCE_OF_MEASUREMENT, CT_IMAGE, uid)) == _encoded(expected)


def test_add_content_appends_to_a_highdicom_item() -> None:
    group = hd.sr.ContainerContentItem(
        name=codes.DCM.ImageLibraryGroup,
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )
    first, second = (image_item(SOURCE, CT_IMAGE, generate_uid()) for _ in range(2))
    add_content(group, [first])
    add_content(group, [second])
    assert [
        item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for item in group.ContentSequence
    ] == [
        first.ReferencedSOPSequence[0].ReferencedSOPInstanceUID,
        second.ReferencedSOPSequence[0].ReferencedSOPInstanceUID,
    ]
