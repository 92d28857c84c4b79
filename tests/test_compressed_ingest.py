"""A study compressed losslessly by DCMTK, sent by storescu and spooled as received, is analysed
to the same probability as its uncompressed twin. The worker's pipeline decodes the spooled
files; the listener never decodes pixels. (This file may import the worker; listener/ may not.)
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pydicom
import pytest
from pydicom import uid
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from db.models import Instance
from db.session import transaction
from listener.scp import Listener
from tests.conftest import require_tool, storescu

# (DCMTK compressor and its options, storescu proposal, transfer syntax)
LOSSLESS = [
    (("dcmcjpeg", "+e1"), "-xs", uid.JPEGLosslessSV1),
    (("dcmcjpls",), "-xt", uid.JPEGLSLossless),
    (("dcmcrle",), "-xr", uid.RLELossless),
]


@pytest.fixture(scope="module")
def small_study(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """The thin lung series of one 24-slice phantom: small enough to analyse on a CPU quickly."""
    from worker.phantom import write_phantom_studies

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
    from worker.model import load_model
    from worker.pipeline import analyse_study

    listener, sessions = sqlite_listener, sqlite_sessions
    model = load_model(None, allow_untrained=True)
    study_uid = str(pydicom.dcmread(small_study[0], stop_before_pixels=True).StudyInstanceUID)

    def analyse(paths: list[Path]) -> float:
        analysis, _ = analyse_study(study_uid, paths, model, heatmaps=0)
        return float(analysis.probability)

    # given the probability of the uncompressed study
    reference = analyse(small_study)
    for (tool, *options), proposal, syntax in LOSSLESS:
        # when the study is compressed by DCMTK and sent by storescu proposing that syntax
        require_tool(tool)
        folder = tmp_path / syntax
        folder.mkdir()
        for path in small_study:
            subprocess.run(
                [tool, *options, str(path), str(folder / path.name)],
                check=True,
                capture_output=True,
                timeout=60,
            )
        result = storescu(listener.port, folder, extra=(proposal,))
        assert result.returncode == 0, result.stderr
        with transaction(sessions) as session:
            rows = session.scalars(select(Instance)).all()
        # then it is spooled as received and analysed to the same probability
        assert {row.transfer_syntax_uid for row in rows} == {syntax}
        assert len(rows) == len(small_study)
        assert analyse([Path(row.path) for row in rows]) == pytest.approx(reference, abs=1e-3)
