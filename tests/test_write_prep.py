"""settle_encoding changes how pydicom writes an object, never what it writes."""

from __future__ import annotations

import copy
from io import BytesIO

import pydicom
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from hrct_triage.worker.outputs.write_prep import settle_encoding


def _document() -> Dataset:
    """Nested items, an ambiguous-VR element that needs its parent, and raw source elements."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.34"
    ds.SOPInstanceUID = generate_uid()
    ds.PatientName = "Müller^Jörg"
    inner = Dataset()
    inner.CodeMeaning = "Größe"
    item = Dataset()
    item.ConceptNameCodeSequence = [inner]
    item.PixelRepresentation = 1
    item.add_new(0x00280106, "US or SS", -5)  # Smallest Image Pixel Value: SS given the item
    ds.ContentSequence = [item, copy.deepcopy(item)]
    # an item read from a Latin-1 file: its raw text must be re-encoded as UTF-8
    source = Dataset()
    source.SpecificCharacterSet = "ISO_IR 100"
    source.PatientName = "Søren"
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_dataset(buffer, source)
    raw = pydicom.dcmread(BytesIO(buffer.getvalue()), force=True)
    raw.set_original_encoding(False, True, "latin_1")
    del raw.SpecificCharacterSet
    ds.ReferencedImageSequence = [raw]
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def _saved(ds: Dataset) -> bytes:
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_same_bytes_and_vr_corrected() -> None:
    plain, settled = _document(), _document()
    settled.SOPInstanceUID = plain.SOPInstanceUID
    settled.file_meta.MediaStorageSOPInstanceUID = plain.SOPInstanceUID
    settle_encoding(settled, implicit_vr=False, little_endian=True)
    assert settled.ContentSequence[0]["SmallestImagePixelValue"].VR == "SS"
    assert settled.ContentSequence[0].original_encoding == (False, True)
    raw_item = settled.ReferencedImageSequence[0]
    assert raw_item.original_character_set == "latin_1"  # left for the writer to convert
    written = _saved(settled)
    assert written == _saved(plain)
    reread = pydicom.dcmread(BytesIO(written))
    assert reread.ReferencedImageSequence[0].PatientName == "Søren"
    assert reread.ContentSequence[1].ConceptNameCodeSequence[0].CodeMeaning == "Größe"
