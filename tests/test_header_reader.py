"""worker.method.header_reader gives pydicom's datasets, and series selection decides as with
pydicom.

Phantom studies of several transfer syntaxes (and Enhanced CT, localizers, several series) are
read both ways; every raw element (tag, VR, length, value bytes, file offset, encoding) must be
equal, so a misread value fails here. Selection over the headers pydicom reads must choose the
same series, or refuse with the same reasons, as ``select_series`` over the paths.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from pydicom import Dataset
from pydicom.dataset import FileDataset
from pydicom.uid import ImplicitVRLittleEndian

from hrct_triage.phantoms import write_phantom_studies
from hrct_triage.worker.method.header_reader import read_file_header
from hrct_triage.worker.method.results import NotApplicable
from hrct_triage.worker.method.series import (
    DEFERRED_VALUE_BYTES,
    SelectedSeries,
    read_headers,
    select_from_headers,
    select_series,
)

_FILE_ATTRIBUTES = (
    "preamble",
    "filename",
    "timestamp",
    "fileobj_type",
    "original_encoding",
    "original_character_set",
    "is_implicit_VR",
    "is_little_endian",
)


def _assert_same(expected: FileDataset, actual: Dataset, path: Path) -> None:
    """Element for element, raw or decoded, with the file-level attributes."""
    assert isinstance(actual, FileDataset)
    for want, got in ((expected, actual), (expected.file_meta, actual.file_meta)):
        assert list(want._dict) == list(got._dict), path
        for tag, element in want._dict.items():
            assert type(got._dict[tag]) is type(element), (path, tag)
            assert got._dict[tag] == element, (path, tag)
        assert got.original_encoding == want.original_encoding, path
        assert got.original_character_set == want.original_character_set, path
    for name in _FILE_ATTRIBUTES:
        assert getattr(actual, name) == getattr(expected, name), (path, name)


def _pydicom(path: Path) -> FileDataset:
    return pydicom.dcmread(path, defer_size=DEFERRED_VALUE_BYTES)


def _compare_files(paths: list[Path]) -> int:
    """Compare both readers on ``paths``; the number the fast reader read itself."""
    fast = 0
    for path in paths:
        header = read_file_header(path, defer_size=DEFERRED_VALUE_BYTES)
        if header is not None:
            _assert_same(_pydicom(path), header, path)
            fast += 1
    return fast


def _implicit_copies(paths: list[Path], folder: Path) -> list[Path]:
    """The files re-written in Implicit VR Little Endian."""
    folder.mkdir()
    copies = []
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
        copy = folder / path.name
        ds.save_as(copy, implicit_vr=True, little_endian=True, enforce_file_format=True)
        copies.append(copy)
    return copies


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    """Each variant's files: localizer, thin series (or Enhanced CT) and thick series."""
    root = tmp_path_factory.mktemp("phantoms")
    variants: dict[str, list[Path]] = {}
    # name: (kernel, thickness, transfer syntax, enhanced)
    options = {
        "explicit": ("LUNG", 1.0, "explicit", False),
        "bone-2mm": ("BONE", 2.0, "explicit", False),
        "enhanced": ("LUNG", 1.0, "explicit", True),
        "deflated": ("LUNG", 1.0, "deflated", False),
        "rle": ("LUNG", 1.0, "rle", False),
        "jpeg-ls": ("LUNG", 1.0, "jpeg-ls", False),
    }
    for name, (kernel, thickness, syntax, enhanced) in options.items():
        (study,) = write_phantom_studies(
            root / name,
            covid=1,
            healthy=0,
            slices=22,
            seed=4,
            kernel=kernel,
            thickness=thickness,
            transfer_syntax=syntax,
            enhanced=enhanced,
        )
        variants[name] = sorted(study.folder.glob("*.dcm"))
    variants["implicit"] = _implicit_copies(variants["explicit"], root / "implicit")
    # the thin series of two variants side by side: two candidates of the same study
    variants["two thin series"] = variants["explicit"] + [
        path for path in variants["bone-2mm"] if path.name.startswith("CT_02")
    ]
    return variants


@pytest.mark.parametrize("variant", ["explicit", "bone-2mm", "implicit"])
def test_plain_files_are_read_as_pydicom_reads_them(
    studies: dict[str, list[Path]], variant: str
) -> None:
    # given uncompressed single-frame files, then every one is read without pydicom, the same
    paths = studies[variant]
    assert _compare_files(paths) == len(paths)


@pytest.mark.parametrize("variant", ["enhanced", "deflated", "rle", "jpeg-ls"])
def test_files_read_or_left_to_pydicom_are_equal(
    studies: dict[str, list[Path]], variant: str
) -> None:
    # given compressed, deflated and multi-frame files, what is read fast equals pydicom's
    # (encapsulated pixel data and undefined-length sequences are left to pydicom)
    paths = studies[variant]
    fast = _compare_files(paths)
    assert [_pydicom(path) for path in paths] == [header for _, header in read_headers(paths)]
    if variant == "deflated":
        assert fast == 0


def _outcome(choose: Callable[[], SelectedSeries]) -> tuple[str, ...] | str:
    """A selection's decision, or the NotApplicable reason, as comparable values."""
    try:
        chosen = choose()
    except NotApplicable as refusal:
        return refusal.reason
    return (
        chosen.series_uid,
        *map(str, chosen.paths),
        str(chosen.slice_count),
        str(chosen.slice_thickness),
        chosen.kernel,
        str(chosen.multiframe),
    )


@pytest.mark.parametrize("min_slices", [20, 23, 1])
@pytest.mark.parametrize(
    "variant", ["explicit", "implicit", "enhanced", "rle", "deflated", "two thin series"]
)
def test_selection_decides_as_over_pydicom_headers(
    studies: dict[str, list[Path]], variant: str, min_slices: int
) -> None:
    # given a study and the headers pydicom reads from it
    paths = studies[variant]
    reference = [(path, _pydicom(path)) for path in paths]
    # when selecting from those and from the paths (min_slices 23 refuses every series)
    expected = _outcome(lambda: select_from_headers(reference, min_slices=min_slices))
    actual = _outcome(lambda: select_series(paths, min_slices=min_slices))
    # then the same series is chosen, or refused for the same reasons
    assert actual == expected
    assert isinstance(expected, str) == (min_slices == 23)


def test_odd_files_are_left_to_pydicom(tmp_path: Path, studies: dict[str, list[Path]]) -> None:
    source = studies["explicit"][1]
    data = source.read_bytes()
    # a file that ends inside its pixel data, one without preamble, one that is not DICOM
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(data[: len(data) // 2])
    no_preamble = tmp_path / "no-preamble.dcm"
    no_preamble.write_bytes(data[132:])
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not DICOM at all")
    for path in (truncated, no_preamble, junk):
        assert read_file_header(path, defer_size=DEFERRED_VALUE_BYTES) is None
    # an undefined-length sequence (pydicom parses those while reading)
    ds = pydicom.dcmread(source)
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = "1", "99X", "x"
    ds.ProcedureCodeSequence = [item]
    ds["ProcedureCodeSequence"].is_undefined_length = True
    undefined = tmp_path / "undefined.dcm"
    ds.save_as(undefined, enforce_file_format=True)
    assert read_file_header(undefined, defer_size=DEFERRED_VALUE_BYTES) is None


def test_text_in_another_character_set_is_decoded_by_pydicom_later(
    tmp_path: Path, studies: dict[str, list[Path]]
) -> None:
    # given a slice whose series description is UTF-8 text
    ds = pydicom.dcmread(studies["explicit"][1])
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SeriesDescription = "Thorax nativ, Lungenfenster 1 mm (Größe)"
    path = tmp_path / "utf8.dcm"
    ds.save_as(path, enforce_file_format=True)
    # when read fast, then the raw elements equal pydicom's and the text decodes the same
    assert _compare_files([path]) == 1
    header = read_file_header(path, defer_size=DEFERRED_VALUE_BYTES)
    assert header is not None
    assert header.SeriesDescription == _pydicom(path).SeriesDescription
    assert header.SeriesDescription.endswith("(Größe)")
