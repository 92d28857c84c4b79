"""Writing phantom images as Part 10 files in each of the seven transfer syntaxes offered.

File Meta is written by pydicom's ``write_file_meta_info``; the elements a series shares are
encoded once, since pydicom spends milliseconds a file walking them and a series differs in five.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydicom import dcmread
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import correct_ambiguous_vr, write_data_element, write_file_meta_info
from pydicom.pixels import get_encoder
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    SecondaryCaptureImageStorage,
)

from hrct_triage.common.errors import PhantomError


@dataclass(frozen=True)
class Syntax:
    """How the CT images are written in one transfer syntax."""

    name: str  # the option's name
    uid: UID
    encoder: Literal["native", "deflate", "pydicom", "dcmtk"]
    lossy_method: str | None = None  # LossyImageCompressionMethod; None: lossless
    jls_error: int = 0  # NEAR of JPEG-LS near-lossless: largest error of a stored value

    @property
    def encapsulated(self) -> bool:
        return self.encoder in ("pydicom", "dcmtk")


SYNTAXES = {
    syntax.name: syntax
    for syntax in (
        Syntax("explicit", ExplicitVRLittleEndian, "native"),
        Syntax("deflated", DeflatedExplicitVRLittleEndian, "deflate"),
        Syntax("rle", RLELossless, "pydicom"),
        Syntax("jpeg-ls", JPEGLSLossless, "pydicom"),
        Syntax("jpeg2000", JPEG2000Lossless, "pydicom"),
        Syntax("jpeg-lossless", JPEGLosslessSV1, "dcmtk"),
        Syntax("jpeg-ls-near", JPEGLSNearLossless, "pydicom", "ISO_14495_1", jls_error=2),
    )
}
TRANSFER_SYNTAXES: dict[str, str] = {name: str(s.uid) for name, s in SYNTAXES.items()}
"""Transfer syntaxes the CT images can be written in, by option name, and their UIDs.

``explicit`` (Explicit VR Little Endian) is the default. All are lossless but ``jpeg-ls-near``
(JPEG-LS near-lossless, NEAR = 2: each stored value, i.e. each HU, within 2 of the original; marked
LossyImageCompression 01). ``deflated`` is written here with zlib; ``rle``, ``jpeg-ls``,
``jpeg2000`` and ``jpeg-ls-near`` are encoded by pydicom with its plugins (pylibjpeg-rle or
pydicom's own RLE, pyjpegls, pylibjpeg-openjpeg); ``jpeg-lossless`` (process 14, selection value 1)
has no pydicom encoder and is encoded by DCMTK's ``dcmcjpeg``, which must be on PATH. JPEG baseline
is not offered: it holds 8 bits a sample, and the CT Image IOD needs 16 bits allocated."""


def decimal_string(v: float) -> str:
    """A decimal string short enough for DS (16 characters)."""
    text = f"{round(v, 4):.4f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def _file_meta(ds: Dataset, transfer_syntax: UID = ExplicitVRLittleEndian) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = transfer_syntax
    return meta


def save_file(ds: Dataset, path: Path) -> None:
    """Write a Part 10 file: preamble, file meta, Explicit VR Little Endian."""
    ds.file_meta = _file_meta(ds)
    ds.save_as(path, enforce_file_format=True)


def _encode(ds: Dataset) -> dict[int, bytes]:
    """Each element of ``ds`` encoded alone (Explicit VR Little Endian), keyed by tag."""
    out: dict[int, bytes] = {}
    for elem in ds:
        fp = DicomBytesIO()
        fp.is_little_endian, fp.is_implicit_VR = True, False
        write_data_element(fp, elem)
        out[int(elem.tag)] = fp.getvalue()
    return out


@dataclass(frozen=True)
class _Format:
    """What an encoder needs to know about the stored values of one frame."""

    rows: int
    columns: int
    bits_stored: int
    pixel_representation: int

    @staticmethod
    def of(ds: Dataset) -> _Format:
        return _Format(
            int(ds.Rows), int(ds.Columns), int(ds.BitsStored), int(ds.PixelRepresentation)
        )


class SeriesWriter:
    """Writes the images of one series, encoding the elements they share only once.

    pydicom spends milliseconds a file walking ~90 elements, and a series differs in five. Pixel
    data is written as given (Explicit VR Little Endian, or deflated with the rest of the data
    set) or compressed frame by frame and encapsulated, as ``syntax`` says.
    """

    def __init__(self, shared: Dataset, syntax: Syntax | None = None) -> None:
        self._syntax = syntax or SYNTAXES["explicit"]
        if self._syntax.lossy_method is not None:
            shared.LossyImageCompression = "01"
            shared.LossyImageCompressionMethod = self._syntax.lossy_method
        correct_ambiguous_vr(shared, is_little_endian=True)
        self._shared = _encode(shared)
        self._sop_class = shared.SOPClassUID
        self._format = _Format.of(shared)

    def write(self, path: Path, own: Dataset, frames: Sequence[bytes]) -> None:
        own.add(self._pixel_data(own, frames))
        parts = self._shared | _encode(own)
        own.SOPClassUID = self._sop_class
        meta = DicomBytesIO()
        meta.is_little_endian, meta.is_implicit_VR = True, False
        write_file_meta_info(meta, _file_meta(own, self._syntax.uid), enforce_standard=True)
        body = b"".join(parts[tag] for tag in sorted(parts))
        if self._syntax.encoder == "deflate":
            body = _deflate(body)
        path.write_bytes(b"\0" * 128 + b"DICM" + meta.getvalue() + body)

    def _pixel_data(self, own: Dataset, frames: Sequence[bytes]) -> DataElement:
        if not self._syntax.encapsulated:
            return DataElement(0x7FE00010, "OW", b"".join(frames))
        encoded = [_encode_frame(self._syntax, frame, self._format) for frame in frames]
        if self._syntax.lossy_method is not None:
            ratio = sum(map(len, frames)) / sum(map(len, encoded))
            own.LossyImageCompressionRatio = decimal_string(ratio)
        return DataElement(
            0x7FE00010, "OB", encapsulate(encoded, has_bot=True), is_undefined_length=True
        )


def _encode_frame(syntax: Syntax, frame: bytes, fmt: _Format) -> bytes:
    """One frame's stored values compressed in an encapsulated transfer syntax."""
    if syntax.encoder == "dcmtk":
        return _dcmcjpeg(frame, fmt)
    extra: dict[str, Any] = {"jls_error": syntax.jls_error} if syntax.jls_error else {}
    encoded = get_encoder(syntax.uid).encode(
        frame,
        rows=fmt.rows,
        columns=fmt.columns,
        samples_per_pixel=1,
        bits_allocated=16,
        bits_stored=fmt.bits_stored,
        pixel_representation=fmt.pixel_representation,
        photometric_interpretation="MONOCHROME2",
        number_of_frames=1,
        **extra,
    )
    return bytes(encoded)


def _dcmcjpeg(frame: bytes, fmt: _Format) -> bytes:
    """One frame as JPEG lossless (process 14, selection value 1), encoded by DCMTK's dcmcjpeg.

    pydicom has no encoder for it. dcmcjpeg gets a bare image holding just the frame; its
    encapsulated frame is taken back, so the phantom's own header stays as it is (DCMTK would add
    a DerivationDescription and its own implementation UID).
    """
    tool = shutil.which("dcmcjpeg")
    if tool is None:
        raise PhantomError("transfer syntax jpeg-lossless needs DCMTK's dcmcjpeg on PATH")
    ds = Dataset()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = "2.25.1"
    ds.Modality = "OT"
    ds.Rows, ds.Columns = fmt.rows, fmt.columns
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = fmt.bits_stored
    ds.HighBit = fmt.bits_stored - 1
    ds.PixelRepresentation = fmt.pixel_representation
    ds.PixelData = frame
    with tempfile.TemporaryDirectory(prefix="phantom-jpeg-") as tmp:
        source, target = Path(tmp) / "in.dcm", Path(tmp) / "out.dcm"
        save_file(ds, source)
        done = subprocess.run(
            [tool, "+e1", "+un", str(source), str(target)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if done.returncode != 0:
            raise PhantomError(f"dcmcjpeg failed ({done.returncode}): {done.stderr.strip()}")
        encoded = dcmread(target)
        if str(encoded.file_meta.TransferSyntaxUID) != JPEGLosslessSV1:
            raise PhantomError("dcmcjpeg did not write JPEG lossless, selection value 1")
        return next(generate_frames(encoded.PixelData, number_of_frames=1))


def _deflate(body: bytes) -> bytes:
    """The data set as one raw deflate stream (PS3.5 A.5), padded to an even length."""
    packer = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    out = packer.compress(body) + packer.flush()
    return out + b"\0" if len(out) % 2 else out
