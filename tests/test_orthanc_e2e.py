"""A real PACS end to end: Orthanc (the Debian package) is the hospital PACS. A phantom study
uploaded to it is forwarded by an Orthanc Lua script (``OnStableStudy``) to ``hrct-triage up``;
the gateway analyses it and stores its SR and heat maps back into Orthanc, into the same study.

The Lua script forwards only CT series and only once per study, so our own SR and secondary
captures (which make the study "stable" again when they arrive) never travel back to us.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from sqlalchemy import select

from hrct_triage.db.models import Study, StudyStatus
from hrct_triage.db.session import make_engine, make_sessionmaker, transaction
from tests.helpers.dicom_peers import Orthanc
from tests.helpers.ports import free_port, wait_for_port

GATEWAY_AE = "HRCT_TRIAGE"
PACS_AE = "HOSPITAL_PACS"
TERMINAL = (StudyStatus.DONE, StudyStatus.FAILED, StudyStatus.NOT_APPLICABLE)

# Forward the CT series of a study that became stable, once: the study is marked with the user
# metadata "HrctForwarded" before sending, so a later stable event (our results arriving) is
# ignored, and SR/OT series (ours, or a scanner's dose report) are never sent.
FORWARD_LUA = """
function OnStableStudy(studyId, tags, metadata)
  local marker = '/studies/' .. studyId .. '/metadata/HrctForwarded'
  local present = ParseJson(RestApiGet('/studies/' .. studyId .. '/metadata'))
  for _, name in ipairs(present) do
    if name == 'HrctForwarded' then
      return
    end
  end
  local ct = {}
  for _, series in ipairs(ParseJson(RestApiGet('/studies/' .. studyId .. '/series'))) do
    if series['MainDicomTags']['Modality'] == 'CT' then
      table.insert(ct, series['ID'])
    end
  end
  if #ct == 0 then
    return
  end
  RestApiPut(marker, 'yes')
  print('hrct: forwarding ' .. #ct .. ' CT series of study ' .. studyId)
  RestApiPost('/modalities/hrct/store', DumpJson({Resources = ct, Synchronous = true}, true))
end
"""


def hospital_pacs(folder: Path, gateway_port: int) -> Orthanc:
    """Orthanc as the hospital PACS: the gateway as modality ``hrct`` and the forwarding Lua
    script that sends each stable study's CT series to it once."""
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "forward.lua"
    script.write_text(FORWARD_LUA)
    return Orthanc(
        folder,
        ae_title=PACS_AE,
        verbose=True,
        extra_config={
            "Name": "hrct-hospital-pacs",
            "DicomModalities": {"hrct": [GATEWAY_AE, "127.0.0.1", gateway_port]},
            "UserMetadata": {"HrctForwarded": 1024},
            "LuaScripts": [str(script)],
            "StableAge": 2,
        },
    )


@pytest.fixture
def gateway_port() -> int:
    return free_port()


@pytest.fixture
def orthanc(tmp_path: Path, gateway_port: int) -> Iterator[Orthanc]:
    pacs = hospital_pacs(tmp_path / "orthanc", gateway_port).start()
    yield pacs
    pacs.stop()


class Gateway:
    """``hrct-triage up`` as a subprocess on the embedded defaults (SQLite, embedded broker)."""

    def __init__(self, tmp_path: Path, port: int, destination: str) -> None:
        self.port = port
        self.log = tmp_path / "gateway.log"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("HRCT_")}
        self.env.update(
            {
                "HRCT_DATA_DIR": str(tmp_path / "var"),
                "HRCT_AE_TITLE": GATEWAY_AE,
                "HRCT_PORT": str(port),
                "HRCT_QUIET_SECONDS": "2",
                "HRCT_METRICS_PORT": "0",
                "HRCT_POLL_SECONDS": "0.5",
                "HRCT_DESTINATIONS": destination,
                "HRCT_ALLOW_UNTRAINED": "1",
                "HRCT_MAX_ATTEMPTS": "1",
                "HRCT_HEATMAPS": "2",
            }
        )
        self.database_url = f"sqlite:///{tmp_path / 'var' / 'worklist.sqlite'}"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "hrct_triage", "up", "--workers", "1"],
            env=self.env,
            stdout=self.log.open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        wait_for_port(port, timeout=60)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, 9)
            self.process.wait()


@pytest.fixture
def gateway(tmp_path: Path, gateway_port: int, orthanc: Orthanc) -> Iterator[Gateway]:
    gw = Gateway(tmp_path, gateway_port, orthanc.destination)
    yield gw
    gw.stop()


def _logs(orthanc: Orthanc, gateway: Gateway) -> str:
    return (
        f"\n--- Orthanc log (tail) ---\n{orthanc.log.read_text(errors='replace')[-4000:]}"
        f"\n--- gateway log (tail) ---\n{gateway.log.read_text(errors='replace')[-4000:]}"
    )


def _wait_for_study(
    gateway: Gateway, orthanc: Orthanc, study_uid: str, timeout: float = 120
) -> Study:
    """Poll the gateway's SQLite worklist until the study reaches a terminal state."""
    engine = make_engine(gateway.database_url)
    sessions = make_sessionmaker(engine)
    deadline = time.monotonic() + timeout
    study: Study | None = None
    try:
        while time.monotonic() < deadline:
            assert gateway.process.poll() is None, "gateway exited" + _logs(orthanc, gateway)
            if Path(gateway.database_url.removeprefix("sqlite:///")).exists():
                with transaction(sessions) as session:
                    study = session.scalar(select(Study).where(Study.study_uid == study_uid))
                    if study is not None:
                        session.expunge(study)
                if study is not None and study.status in TERMINAL:
                    return study
            time.sleep(0.5)
    finally:
        engine.dispose()
    raise AssertionError(
        f"study {study_uid} not finished in {timeout} s: {study and study.status}"
        + _logs(orthanc, gateway)
    )


def _wait_for_modalities(
    orthanc: Orthanc, gateway: Gateway, study_id: str, wanted: set[str], timeout: float = 60
) -> dict[str, list[dict[str, Any]]]:
    """The study's series in Orthanc, by modality, once every ``wanted`` modality is there."""
    deadline = time.monotonic() + timeout
    by_modality: dict[str, list[dict[str, Any]]] = {}
    while time.monotonic() < deadline:
        by_modality = {}
        for series in orthanc.get(f"/studies/{study_id}/series"):
            modality = series["MainDicomTags"].get("Modality", "")
            by_modality.setdefault(modality, []).append(series)
        if wanted <= set(by_modality):
            return by_modality
        time.sleep(0.5)
    raise AssertionError(
        f"Orthanc study holds {sorted(by_modality)}, not {sorted(wanted)}" + _logs(orthanc, gateway)
    )


def _wait_until_stable(
    orthanc: Orthanc, gateway: Gateway, study_id: str, timeout: float = 30
) -> None:
    """Wait for Orthanc's stable event after our outputs arrived (the one that must not
    forward again)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if orthanc.get(f"/studies/{study_id}")["IsStable"]:
            return
        time.sleep(0.5)
    raise AssertionError("Orthanc study never became stable" + _logs(orthanc, gateway))


def test_study_uploaded_to_orthanc_comes_back_with_our_sr_and_heat_maps(
    tmp_path: Path, orthanc: Orthanc, gateway: Gateway
) -> None:
    # given a COVID-like phantom study (localizer, 40 thin slices, soft-tissue series)
    from hrct_triage.phantoms import write_phantom_studies

    write_phantom_studies(tmp_path / "phantom", covid=1, healthy=0, slices=40, seed=11)
    files = sorted((tmp_path / "phantom").rglob("*.dcm"))
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    ct_instances = len(files)

    # when the scanner's images are stored in the hospital PACS (Orthanc's REST API)
    parents = {orthanc.upload(path)["ParentStudy"] for path in files}
    assert len(parents) == 1, parents
    (orthanc_study,) = parents

    # then Orthanc forwards the CT series to the gateway once the study is stable, and the
    # worklist says done
    study = _wait_for_study(gateway, orthanc, study_uid)
    assert study.status == StudyStatus.DONE, f"{study.status}: {study.reason}" + _logs(
        orthanc, gateway
    )
    assert study.delivered_at is not None

    # and the same Orthanc study now also holds our SR and at least one secondary capture
    series = _wait_for_modalities(orthanc, gateway, orthanc_study, {"CT", "SR", "OT"})
    assert len(series["SR"]) == 1
    sc_instances = sum(len(s["Instances"]) for s in series["OT"])
    assert sc_instances >= 1
    sr_instance = series["SR"][0]["Instances"][0]
    sr_tags = orthanc.get(f"/instances/{sr_instance}/simplified-tags")
    assert sr_tags["StudyInstanceUID"] == study_uid
    assert sr_tags["SOPClassUID"] == "1.2.840.10008.5.1.4.1.1.88.34"

    # and nothing was forwarded twice: the CT is in Orthanc once, and our outputs never went
    # back to the gateway (its worklist holds this one study, analysed once)
    ct_in_orthanc = sum(len(s["Instances"]) for s in series["CT"])
    assert ct_in_orthanc == ct_instances
    listing = subprocess.run(
        [sys.executable, "-m", "hrct_triage", "worklist", "--json"],
        env=gateway.env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert listing.returncode == 0, listing.stderr
    rows = json.loads(listing.stdout)
    assert [row["study_uid"] for row in rows] == [study_uid]
    assert rows[0]["status"] == "done"
    assert {o["kind"] for o in rows[0]["outputs"]} == {"sr", "sc"}
    assert all(o["state"] == "sent" for o in rows[0]["outputs"])
    _wait_until_stable(orthanc, gateway, orthanc_study)
    assert orthanc.log.read_text(errors="replace").count("hrct: forwarding") == 1
