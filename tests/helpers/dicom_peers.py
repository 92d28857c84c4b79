"""The DICOM peers the tests talk to, as real programs: DCMTK's storescu and storescp,
dicom3tools' dciodvfy, Orthanc (``dcmtk`` and ``orthanc`` tiers)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.ports import free_port, wait_for_port


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed; .ci/run installs dcmtk and dicom3tools")
    return path


def dcmtk_env() -> dict[str, str]:
    # Without TCP_NODELAY each DCMTK instance stalls ~44 ms on Nagle + delayed ACK.
    return {**os.environ, "TCP_NODELAY": "1"}


def storescu(
    port: int,
    *paths: Path,
    called: str = "HRCT_TRIAGE",
    calling: str = "CT_SCANNER",
    extra: tuple[str, ...] = (),
) -> subprocess.CompletedProcess[str]:
    """Send files (or folders, recursively) with DCMTK's storescu, as a scanner would."""
    require_tool("storescu")
    args = [
        "storescu",
        "-aet",
        calling,
        "-aec",
        called,
        "+sd",
        "+r",
        "+sp",
        "*.dcm",
        *extra,
        "127.0.0.1",
        str(port),
        *[str(p) for p in paths],
    ]
    return subprocess.run(
        args, env=dcmtk_env(), capture_output=True, text=True, timeout=300, check=False
    )


def dciodvfy_errors(path: Path) -> list[str]:
    require_tool("dciodvfy")
    result = subprocess.run(
        ["dciodvfy", str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    return [line for line in (result.stdout + result.stderr).splitlines() if "Error" in line]


class StoreSCP:
    """DCMTK storescp as the PACS: files sorted by study (``storage_options``)."""

    storage_options: tuple[str, ...] = ("--sort-on-study-uid", "st")

    def __init__(self, folder: Path, ae_title: str = "PACS") -> None:
        require_tool("storescp")
        self.folder = folder
        self.ae_title = ae_title
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        folder.mkdir(parents=True, exist_ok=True)

    def start(self) -> StoreSCP:
        self.process = subprocess.Popen(
            [
                "storescp",
                "-aet",
                self.ae_title,
                "-od",
                str(self.folder),
                "+xa",
                *self.storage_options,
                str(self.port),
            ],
            env=dcmtk_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port)
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None

    @property
    def destination(self) -> str:
        return f"{self.ae_title}@127.0.0.1:{self.port}"

    def files(self) -> list[Path]:
        return sorted(p for p in self.folder.rglob("*") if p.is_file())


class Orthanc:
    """Orthanc (Debian package) as a real PACS: its own storage, free DICOM and HTTP ports on
    loopback, no authentication. ``extra_config`` adds modalities, Lua scripts and the like."""

    def __init__(
        self,
        folder: Path,
        *,
        ae_title: str = "ORTHANC",
        extra_config: dict[str, Any] | None = None,
        verbose: bool = False,
    ) -> None:
        require_tool("Orthanc")
        self.ae_title = ae_title
        self.verbose = verbose
        self.port, self.http_port = free_port(), free_port()
        folder.mkdir(parents=True, exist_ok=True)
        config: dict[str, Any] = {
            "Name": "hrct-test",
            "StorageDirectory": str(folder / "storage"),
            "IndexDirectory": str(folder / "storage"),
            "DicomAet": ae_title,
            "DicomPort": self.port,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomModalities": {"hrct": ["HRCT_TRIAGE", "127.0.0.1", 11112]},
            "Plugins": [],
            **(extra_config or {}),
        }
        self.config = folder / "orthanc.json"
        self.config.write_text(json.dumps(config))
        self.log = folder / "orthanc.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Orthanc:
        args = ["Orthanc", *(["--verbose"] if self.verbose else []), str(self.config)]
        self.process = subprocess.Popen(args, stdout=self.log.open("wb"), stderr=subprocess.STDOUT)
        wait_for_port(self.http_port, timeout=30)
        wait_for_port(self.port, timeout=30)
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=30)
            self.process = None

    @property
    def destination(self) -> str:
        return f"{self.ae_title}@127.0.0.1:{self.port}"

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=30) as r:
            return json.load(r)

    def upload(self, path: Path) -> dict[str, Any]:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.http_port}/instances",
            data=path.read_bytes(),
            headers={"Content-Type": "application/dicom"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=30) as r:
            answer: dict[str, Any] = json.load(r)
            return answer

    def sop_instance_uids(self) -> list[str]:
        return [i["MainDicomTags"]["SOPInstanceUID"] for i in self.get("/instances?expand")]
