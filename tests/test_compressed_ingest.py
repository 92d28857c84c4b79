"""A study compressed losslessly by DCMTK, sent by storescu and spooled as received, is analysed
to the same probability as its uncompressed twin. The worker's pipeline decodes the spooled
files; the listener never decodes pixels. (This file may import the worker; listener/ may not.)
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pydicom
import pytest
from pydicom import Dataset, FileMetaDataset, uid
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from hrct_triage.db.models import Instance
from hrct_triage.db.session import transaction
from hrct_triage.listener.scp import Listener
from tests.helpers.dicom_peers import require_tool, storescu

pytestmark = pytest.mark.dcmtk  # DCMTK compresses the studies and sends them

# (compressor: a DCMTK tool with its options, or "pydicom" for the encoders pydicom has (JPEG
# 2000 through pylibjpeg-openjpeg, which DCMTK's free toolkit lacks), storescu proposal,
# transfer syntax). storescu has no switch for process 14 (.57): a config profile proposes it.
LOSSLESS = [
    (("dcmcjpeg", "+e1"), "-xs", uid.JPEGLosslessSV1),
    (("dcmcjpeg", "+el"), "process14", uid.JPEGLossless),
    (("dcmcjpls",), "-xt", uid.JPEGLSLossless),
    (("dcmcrle",), "-xr", uid.RLELossless),
    (("pydicom",), "-xv", uid.JPEG2000Lossless),
]
# Lossy: 12-bit JPEG extended (DCMTK, quality 90) and JPEG 2000 at about 10:1, kept under the
# same SOP Instance UIDs (``+un``) so each set replaces the last in the one listener. Differences
# in the pixels move the probability a little; the bound says a decision would not flip near 0.8.
LOSSY = [
    (("dcmcjpeg", "+ee", "+q", "90", "+un"), "-xx", uid.JPEGExtended12Bit),
    (("pydicom",), "-xw", uid.JPEG2000),
]
LOSSY_TOLERANCE = 0.02

PROCESS_14_PROFILE = """\
[[TransferSyntaxes]]
[Process14]
TransferSyntax1 = 1.2.840.10008.1.2.4.57
[[PresentationContexts]]
[CT]
PresentationContext1 = 1.2.840.10008.5.1.4.1.1.2\\Process14
[[Profiles]]
[Process14]
PresentationContexts = CT
"""


def _proposal(name: str, folder: Path) -> tuple[str, ...]:
    """storescu arguments that propose ``name`` (a switch, or the process 14 profile)."""
    if name != "process14":
        return (name,)
    config = folder.parent / "process14.cfg"
    config.write_text(PROCESS_14_PROFILE)
    return ("-xf", str(config), "Process14")


def _compress(tool: tuple[str, ...], syntax: str, source: Path, target: Path) -> None:
    if tool[0] == "pydicom":
        ds = pydicom.dcmread(source)
        options = {"j2k_cr": [10]} if syntax == uid.JPEG2000 else {}
        # same SOP Instance UID: the compressed twin replaces the uncompressed instance
        ds.compress(syntax, generate_instance_uid=False, **options)  # type: ignore[arg-type]
        ds.save_as(target, enforce_file_format=True)
        return
    require_tool(tool[0])
    subprocess.run([*tool, str(source), str(target)], check=True, capture_output=True, timeout=60)
    # DCMTK marks lossy output DERIVED, which the series picker rightly passes over; the test is
    # about decoding the transfer syntax, so the twin keeps the scanner's Image Type.
    compressed = pydicom.dcmread(target)
    original = pydicom.dcmread(source, stop_before_pixels=True).get("ImageType")
    if original is not None and list(compressed.get("ImageType", [])) != list(original):
        compressed.ImageType = original
        compressed.save_as(target, enforce_file_format=True)


@pytest.fixture(scope="module")
def small_study(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """The thin lung series of one 24-slice phantom: small enough to analyse on a CPU quickly."""
    from hrct_triage.phantoms import write_phantom_studies

    out = tmp_path_factory.mktemp("small")
    (study,) = write_phantom_studies(out, covid=1, healthy=0, slices=24, seed=5)
    return sorted(
        path
        for path in study.folder.glob("*.dcm")
        if str(pydicom.dcmread(path, stop_before_pixels=True).SeriesInstanceUID)
        == study.lung_series_uid
    )


def test_lossless_transfer_syntaxes_analyse_like_the_uncompressed_study(
    small_study: list[Path],
    sqlite_listener: Listener,
    sqlite_sessions: sessionmaker[Session],
    tmp_path: Path,
) -> None:
    from hrct_triage.worker.method.model import load_model
    from hrct_triage.worker.method.pipeline import analyse_study

    listener, sessions = sqlite_listener, sqlite_sessions
    model = load_model(None, allow_untrained=True)
    study_uid = str(pydicom.dcmread(small_study[0], stop_before_pixels=True).StudyInstanceUID)

    def analyse(paths: list[Path]) -> float:
        analysis, _ = analyse_study(study_uid, paths, model, heatmaps=0)
        return float(analysis.probability)

    # given the probability of the uncompressed study
    reference = analyse(small_study)
    cases = [(*case, 1e-3) for case in LOSSLESS] + [(*case, LOSSY_TOLERANCE) for case in LOSSY]
    for tool, proposal, syntax, tolerance in cases:
        # when the study is compressed and sent by storescu proposing that syntax
        folder = tmp_path / syntax
        folder.mkdir()
        for path in small_study:
            _compress(tool, syntax, path, folder / path.name)
        result = storescu(listener.port, folder, extra=_proposal(proposal, folder))
        assert result.returncode == 0, result.stderr
        with transaction(sessions) as session:
            rows = session.scalars(select(Instance)).all()
        # then it is spooled as received and analysed to the same probability
        assert {row.transfer_syntax_uid for row in rows} == {syntax}
        assert len(rows) == len(small_study)
        probability = analyse([Path(row.path) for row in rows])
        assert probability == pytest.approx(reference, abs=tolerance), syntax


def test_jpeg_baseline_is_accepted_and_stored_as_received(
    sqlite_listener: Listener, sqlite_sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    # given an 8-bit secondary capture (what JPEG Baseline carries; CT's 12 bits do not fit it)
    # compressed by DCMTK as JPEG Baseline
    require_tool("dcmcjpeg")
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = uid.ExplicitVRLittleEndian
    ds.SOPClassUID = uid.SecondaryCaptureImageStorage
    ds.SOPInstanceUID = uid.generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = uid.generate_uid(), uid.generate_uid()
    ds.Modality, ds.ConversionType = "OT", "WSD"
    ds.Rows = ds.Columns = 64
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = bytes(range(256)) * 16
    source, folder = tmp_path / "sc.dcm", tmp_path / "baseline"
    folder.mkdir()
    ds.save_as(source, enforce_file_format=True)
    _compress(("dcmcjpeg", "+eb"), uid.JPEGBaseline8Bit, source, folder / "sc.dcm")
    # when storescu sends it proposing JPEG Baseline
    result = storescu(sqlite_listener.port, folder, extra=("-xy",))
    # then it is acknowledged and spooled byte for byte as sent
    assert result.returncode == 0, result.stderr
    with transaction(sqlite_sessions) as session:
        (row,) = session.scalars(select(Instance)).all()
    assert row.transfer_syntax_uid == uid.JPEGBaseline8Bit
    sent = pydicom.dcmread(folder / "sc.dcm")
    assert pydicom.dcmread(row.path).PixelData == sent.PixelData
