"""Shared fixtures: real databases (SQLite file and a fresh PostgreSQL database per test),
free ports, phantom studies, and the DCMTK peers.

PostgreSQL and Redis are the machine's own (127.0.0.1:5432 trust auth, 127.0.0.1:6379); each
test gets its own PostgreSQL database and its own Redis database number, so nothing leaks
between tests.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from hrct_triage.common.settings import Settings
from hrct_triage.db.migrate import upgrade
from hrct_triage.db.models import Association
from hrct_triage.db.session import make_engine, make_sessionmaker, transaction
from hrct_triage.listener.scp import Listener

PG_ADMIN = os.environ.get("HRCT_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("HRCT_TEST_REDIS", "redis://127.0.0.1:6379")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def postgresql_url() -> Iterator[str]:
    name = f"hrct_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://")
    yield f"{base}/{name}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'worklist.sqlite'}"


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest) -> str:
    """The worklist on both backends the product supports, migrated with Alembic."""
    url: str = request.getfixturevalue(f"{request.param}_url")
    upgrade(url)
    return url


@pytest.fixture
def sessions(database_url: str) -> Iterator[sessionmaker[Session]]:
    """As the listener opens it (its SQLite writers take turns, ``hrct_triage.db.sqlite_turns``)."""
    engine = make_engine(database_url, take_turns=True)
    yield make_sessionmaker(engine)
    engine.dispose()


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One COVID-like and one healthy phantom study, 60 thin slices each, plus a non-CT study."""
    from hrct_triage.phantoms import write_non_ct_study, write_phantom_studies

    out = tmp_path_factory.mktemp("phantoms")
    write_phantom_studies(out / "studies", covid=1, healthy=1, slices=60, seed=7)
    write_non_ct_study(out / "non_ct", seed=7)
    return out


def shipped_model_version() -> str:
    """The version the shipped demo checkpoint (worker/method/weights) states in its metadata."""
    from safetensors import safe_open

    from hrct_triage.worker.method.checkpoints import DEMO_CHECKPOINT

    with safe_open(str(DEMO_CHECKPOINT), framework="np") as handle:
        return str((handle.metadata() or {})["version"])


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
        _wait_for_port(self.port)
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


def _wait_for_port(port: int, timeout: float = 15) -> None:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on port {port}")


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[StoreSCP]:
    scp = StoreSCP(tmp_path / "pacs").start()
    yield scp
    scp.stop()


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
        _wait_for_port(self.http_port, timeout=30)
        _wait_for_port(self.port, timeout=30)
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


# --- the listener under test -------------------------------------------------------------


def listener_settings(data_dir: Path, database_url: str, **overrides: Any) -> Settings:
    """Settings of a test listener: its own port, no .env, no dispatcher round of its own."""
    values: dict[str, Any] = {
        "data_dir": data_dir,
        "database_url": database_url,
        "port": free_port(),
        "quiet_seconds": 5,
        "min_free_disk_bytes": 0,
        "metrics_port": 0,  # tests that scrape metrics ask for a free port of their own
        **overrides,
    }
    return Settings(_env_file=None, **values)


@pytest.fixture
def sqlite_sessions(sqlite_url: str) -> Iterator[sessionmaker[Session]]:
    """A migrated SQLite worklist alone (tests whose subject does not differ by backend)."""
    upgrade(sqlite_url)
    engine = make_engine(sqlite_url, take_turns=True)
    yield make_sessionmaker(engine)
    engine.dispose()


@pytest.fixture
def listener(
    tmp_path: Path, database_url: str, sessions: sessionmaker[Session]
) -> Iterator[Listener]:
    scp = Listener(
        listener_settings(tmp_path / "var", database_url), sessions, run_dispatcher=False
    )
    scp.start()
    yield scp
    scp.stop()


@pytest.fixture
def sqlite_listener(
    tmp_path: Path, sqlite_url: str, sqlite_sessions: sessionmaker[Session]
) -> Iterator[Listener]:
    scp = Listener(
        listener_settings(tmp_path / "var", sqlite_url), sqlite_sessions, run_dispatcher=False
    )
    scp.start()
    yield scp
    scp.stop()


def thin_series(phantom_dir: Path) -> list[Path]:
    study = sorted((phantom_dir / "studies").iterdir())[0]
    return sorted(p for p in study.rglob("*.dcm"))


def wait_until_no_open_association(sessions: sessionmaker[Session]) -> None:
    """The listener records the release in its own thread, just after the client returns."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with transaction(sessions) as session:
            if not session.scalars(select(Association).where(Association.state == "open")).all():
                return
        time.sleep(0.05)
    raise AssertionError("association still open 10 s after release")
