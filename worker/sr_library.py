"""TID 1600 Image Library of the SR: one group per shared geometry, one entry per image.

The library is most of the SR: a 300-slice study gives ~250 entries of five content items each.
Group containers and their shared descriptors come from highdicom. The entries (TID 1601: an
IMAGE item with its Image Position (Patient) as three NUM items) are assembled from pydicom
elements instead: highdicom's ``ImageContentItem`` and ``NumContentItem`` set every attribute
by keyword, validate it and index each child by its coded name, ~0.5 ms per entry and about
two thirds of the SR's build time, for the same elements. tests/test_sr_library.py holds the
two encodings of an entry byte for byte equal, so a highdicom that wrote entries differently
would be noticed.
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
from highdicom.sr import CodedConcept
from pydicom import Dataset
from pydicom.dataelem import DataElement
from pydicom.sr.codedict import codes
from pydicom.tag import BaseTag, Tag
from pydicom.valuerep import DS

__all__ = [
    "SOURCE",
    "SOURCE_OF_MEASUREMENT",
    "add_content",
    "image_item",
    "image_library",
    "library_entry",
]

#: Concept name of a library entry, as highdicom's own image library names it.
SOURCE = CodedConcept("260753009", "SCT", "Source")
#: Concept name of a measurement group's source image (highdicom's
#: ``SourceImageForMeasurementGroup``).
SOURCE_OF_MEASUREMENT = CodedConcept("121112", "DCM", "Source of Measurement")

_PER_IMAGE = (
    codes.DCM.ImagePositionPatientX,
    codes.DCM.ImagePositionPatientY,
    codes.DCM.ImagePositionPatientZ,
)
# The same three names and unit for every library entry, converted once: converting them per
# item was a fifth of the library's build time. Items may share them, as nothing edits a code.
_PER_IMAGE_CONCEPTS = tuple(CodedConcept.from_code(name) for name in _PER_IMAGE)
_MILLIMETER = CodedConcept.from_code(codes.UCUM.Millimeter)

_CONTENT_SEQUENCE = Tag(0x0040, 0xA730)
_CONCEPT_NAME_CODE_SEQUENCE = Tag(0x0040, 0xA043)
_RELATIONSHIP_TYPE = Tag(0x0040, 0xA010)
_VALUE_TYPE = Tag(0x0040, 0xA040)
_REFERENCED_SOP_SEQUENCE = Tag(0x0008, 0x1199)
_REFERENCED_SOP_CLASS_UID = Tag(0x0008, 0x1150)
_REFERENCED_SOP_INSTANCE_UID = Tag(0x0008, 0x1155)
_MEASURED_VALUE_SEQUENCE = Tag(0x0040, 0xA300)
_MEASUREMENT_UNITS_CODE_SEQUENCE = Tag(0x0040, 0x08EA)
_NUMERIC_VALUE = Tag(0x0040, 0xA30A)
_FLOATING_POINT_VALUE = Tag(0x0040, 0xA161)


def image_library(images: Sequence[Dataset]) -> hd.sr.ContainerContentItem:
    """TID 1600: one Image Library Group per shared geometry, each image with its position.

    Descriptors every image of a group shares (modality, frame of reference, matrix, pixel
    spacing, slice thickness, orientation) are said once at group level, as TID 1600 allows;
    each image entry then carries only its Image Position (Patient). This keeps a 300-slice
    library small and quick to build.
    """
    groups: dict[tuple[str, ...], list[Dataset]] = {}
    for ds in images:
        groups.setdefault(_geometry_key(ds), []).append(ds)
    library = hd.sr.ContainerContentItem(
        name=codes.DCM.ImageLibrary, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )
    library.ContentSequence = hd.sr.ContentSequence(
        [_library_group(members) for members in groups.values()]
    )
    return library


def library_entry(ds: Dataset) -> Dataset:
    """TID 1601: the image reference, with its position when it has one.

    The elements of highdicom's ``ImageContentItem(name=SOURCE, ..., CONTAINS)`` with a
    ContentSequence of ``NumContentItem(position, float(value), mm, HAS ACQ CONTEXT)``.
    """
    entry = image_item(SOURCE, str(ds.SOPClassUID), str(ds.SOPInstanceUID))
    if "ImagePositionPatient" in ds:
        positions = [
            _position(name, float(value))
            for name, value in zip(_PER_IMAGE_CONCEPTS, ds.ImagePositionPatient, strict=True)
        ]
        entry.add(DataElement(_CONTENT_SEQUENCE, "SQ", positions))
    return entry


def image_item(name: CodedConcept, sop_class_uid: str, sop_instance_uid: str) -> Dataset:
    """An IMAGE content item that CONTAINS-references one single-frame image.

    The elements of highdicom's ``ImageContentItem`` without frame or segment references.
    """
    reference = _item(
        (_REFERENCED_SOP_CLASS_UID, "UI", sop_class_uid),
        (_REFERENCED_SOP_INSTANCE_UID, "UI", sop_instance_uid),
    )
    return _item(
        (_RELATIONSHIP_TYPE, "CS", "CONTAINS"),
        (_VALUE_TYPE, "CS", "IMAGE"),
        (_CONCEPT_NAME_CODE_SEQUENCE, "SQ", [name]),
        (_REFERENCED_SOP_SEQUENCE, "SQ", [reference]),
    )


def add_content(item: Dataset, children: Sequence[Dataset]) -> None:
    """Append ``children`` to the ContentSequence of ``item`` (created if absent).

    Through the element, not ``item.ContentSequence``: on a highdicom content item that would
    be a highdicom ContentSequence, which accepts only highdicom's own item classes.
    """
    existing = list(item.get("ContentSequence", []))
    item[_CONTENT_SEQUENCE] = DataElement(_CONTENT_SEQUENCE, "SQ", [*existing, *children])


def _position(name: CodedConcept, value: float) -> Dataset:
    """One coordinate as a TID 1601 NUM item in mm (highdicom's NumContentItem elements)."""
    measured = _item(
        (_NUMERIC_VALUE, "DS", DS(value, auto_format=True)),
        (_FLOATING_POINT_VALUE, "FD", value),
        (_MEASUREMENT_UNITS_CODE_SEQUENCE, "SQ", [_MILLIMETER]),
    )
    return _item(
        (_RELATIONSHIP_TYPE, "CS", "HAS ACQ CONTEXT"),
        (_VALUE_TYPE, "CS", "NUM"),
        (_CONCEPT_NAME_CODE_SEQUENCE, "SQ", [name]),
        (_MEASURED_VALUE_SEQUENCE, "SQ", [measured]),
    )


def _item(*elements: tuple[BaseTag, str, object]) -> Dataset:
    """A sequence item from (tag, VR, value) triples."""
    item = Dataset()
    for tag, vr, value in elements:
        item.add(DataElement(tag, vr, value))
    return item


def _geometry_key(ds: Dataset) -> tuple[str, ...]:
    """What must be equal for images to share group-level descriptors."""
    names = (
        "SOPClassUID",
        "FrameOfReferenceUID",
        "Rows",
        "Columns",
        "PixelSpacing",
        "SliceThickness",
        "ImageOrientationPatient",
        "SpacingBetweenSlices",
    )
    return tuple(str(ds.get(name, "")) for name in names)


def _library_group(members: Sequence[Dataset]) -> hd.sr.ContainerContentItem:
    """One Image Library Group: shared descriptors (TID 1602) then one entry per image.

    The entries are plain items, hence ``add_content``.
    """
    shared = [
        item
        for item in hd.sr.ImageLibraryEntryDescriptors(members[0])
        if item.name not in _PER_IMAGE
    ]
    group = hd.sr.ContainerContentItem(
        name=codes.DCM.ImageLibraryGroup, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )
    add_content(group, [*shared, *(library_entry(ds) for ds in members)])
    return group
