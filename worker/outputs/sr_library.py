"""TID 1600 Image Library of the SR: one group per shared geometry, one entry per image.

The library is most of the SR: a 300-slice study gives ~250 entries of five content items each.
Group containers and their shared descriptors come from highdicom. The entries (TID 1601: an
IMAGE item with its Image Position (Patient) as three NUM items) are assembled from pydicom
elements instead: highdicom's ``ImageContentItem`` and ``NumContentItem`` set every attribute
by keyword, validate it and index each child by its coded name, ~0.5 ms per entry and about
two thirds of the SR's build time, for the same elements. tests/test_sr_library.py holds the
two encodings of an entry byte for byte equal, so a highdicom that wrote entries differently
would be noticed.

The entries and the source images then reach the SR already encoded (``worker.outputs.sr_encoded``):
writing them through pydicom was the larger half of writing the SR. ``library_entry`` and
``image_item`` stay as the datasets those bytes must equal, and as the fallback for text that
only pydicom can encode.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import chain

import highdicom as hd
from highdicom.sr import CodedConcept
from pydicom import Dataset
from pydicom.dataelem import DataElement
from pydicom.sr.codedict import codes
from pydicom.tag import BaseTag, Tag
from pydicom.valuerep import DS

from hrct_triage.worker.outputs.sr_encoded import content_sequence, encoded_code, encoded_image_item

__all__ = [
    "SOURCE",
    "SOURCE_OF_MEASUREMENT",
    "add_content",
    "add_images",
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
# The same codes as items of a pre-encoded sequence, encoded once.
_SOURCE_ENCODED = encoded_code(SOURCE)
_PER_IMAGE_ENCODED = tuple(encoded_code(name) for name in _PER_IMAGE_CONCEPTS)
_MILLIMETER_ENCODED = encoded_code(_MILLIMETER)

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


def image_library(
    images: Sequence[Dataset], *, pre_encoded: bool = True
) -> hd.sr.ContainerContentItem:
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
        [_library_group(members, pre_encoded=pre_encoded) for members in groups.values()]
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


def add_images(
    item: Dataset,
    name: CodedConcept,
    images: Sequence[tuple[str, str]],
    *,
    pre_encoded: bool = True,
) -> None:
    """Append an ``image_item`` per (SOP class, SOP instance) of ``images`` to ``item``.

    Pre-encoded with the item's existing children where they are plain ASCII (the usual case),
    else as datasets.
    """
    existing = list(item.get("ContentSequence", []))
    if pre_encoded:
        encoded_name = encoded_code(name)
        items = (encoded_image_item("CONTAINS", encoded_name, *image) for image in images)
        sequence = content_sequence(chain(existing, items))
        if sequence is not None:
            item[_CONTENT_SEQUENCE] = sequence
            return
    add_content(item, [image_item(name, *image) for image in images])


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


def _library_group(members: Sequence[Dataset], *, pre_encoded: bool) -> hd.sr.ContainerContentItem:
    """One Image Library Group: shared descriptors (TID 1602) then one entry per image.

    The entries are plain items (hence ``add_content``) or pre-encoded ones.
    """
    shared = [
        item
        for item in hd.sr.ImageLibraryEntryDescriptors(members[0])
        if item.name not in _PER_IMAGE
    ]
    group = hd.sr.ContainerContentItem(
        name=codes.DCM.ImageLibraryGroup, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )
    entries = (_encoded_entry(ds) for ds in members)
    sequence = content_sequence(chain(shared, entries)) if pre_encoded else None
    if sequence is None:
        add_content(group, [*shared, *(library_entry(ds) for ds in members)])
    else:
        group[_CONTENT_SEQUENCE] = sequence
    return group


def _encoded_entry(ds: Dataset) -> bytes:
    """The bytes of ``library_entry(ds)`` as an item of a pre-encoded sequence."""
    positions: tuple[tuple[bytes, bytes, float], ...] = ()
    if "ImagePositionPatient" in ds:
        positions = tuple(
            (name, _MILLIMETER_ENCODED, float(value))
            for name, value in zip(_PER_IMAGE_ENCODED, ds.ImagePositionPatient, strict=True)
        )
    return encoded_image_item(
        "CONTAINS", _SOURCE_ENCODED, str(ds.SOPClassUID), str(ds.SOPInstanceUID), positions
    )
