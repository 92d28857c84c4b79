"""PACS peers for the delivery tests, each a real network peer: DCMTK storescp restricted by its
association configuration file, DCMTK storescp that refuses every association, DCMTK dcmqrscp
(which rejects a called AE title it does not know), pynetdicom SCPs that answer a chosen
status, abort or stall, and a socket that accepts connections but never answers.

Also a study analysed by hand (fake CT headers, no model) whose outputs are owed to them, and
the worker context that delivers it, as ``worker.tasks`` builds one.
"""

from __future__ import annotations

import hashlib
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pydicom
from pydicom import Dataset
from pynetdicom import AE, evt
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from hrct_triage.common.settings import Settings
from hrct_triage.common.sop_classes import OUTPUT_CLASSES
from hrct_triage.db import worklist
from hrct_triage.db.migrate import upgrade
from hrct_triage.db.models import Delivery, Output, Study
from hrct_triage.db.session import make_engine, make_sessionmaker, transaction
from hrct_triage.worker.jobs import WorkerContext
from hrct_triage.worker.outputs import Analysed, write_outputs
from tests.conftest import StoreSCP, _wait_for_port, dcmtk_env, free_port, require_tool
from tests.test_outputs import WHEN, ct_series, make_analysis

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)

# storescp's association configuration (the format of DCMTK's sample storescp.cfg): profiles
# of a PACS that stores every output class but Comprehensive 3D SR, one that stores only
# Enhanced SR of the SR classes, and one that stores no SR class at all.
STORESCP_CONFIG = """\
[[TransferSyntaxes]]
[Uncompressed]
TransferSyntax1 = LocalEndianExplicit
TransferSyntax2 = LittleEndianImplicit

[[PresentationContexts]]
[NoComprehensive3D]
PresentationContext1 = VerificationSOPClass\\Uncompressed
PresentationContext2 = SecondaryCaptureImageStorage\\Uncompressed
PresentationContext3 = ComprehensiveSRStorage\\Uncompressed
PresentationContext4 = EnhancedSRStorage\\Uncompressed
[EnhancedOnly]
PresentationContext1 = VerificationSOPClass\\Uncompressed
PresentationContext2 = SecondaryCaptureImageStorage\\Uncompressed
PresentationContext3 = EnhancedSRStorage\\Uncompressed
[NoSR]
PresentationContext1 = VerificationSOPClass\\Uncompressed
PresentationContext2 = SecondaryCaptureImageStorage\\Uncompressed

[[Profiles]]
[NoComprehensive3D]
PresentationContexts = NoComprehensive3D
[EnhancedOnly]
PresentationContexts = EnhancedOnly
[NoSR]
PresentationContexts = NoSR
"""


class ConfiguredStoreSCP(StoreSCP):
    """storescp accepting what ``profile`` of ``STORESCP_CONFIG`` lists (``-xf``), and nothing
    else; ``extra`` adds options (``--refuse``)."""

    def __init__(
        self,
        folder: Path,
        profile: str | None,
        *,
        ae_title: str = "PACS",
        extra: tuple[str, ...] = (),
    ) -> None:
        super().__init__(folder, ae_title)
        self.profile = profile
        self.extra = extra

    def start(self) -> ConfiguredStoreSCP:
        config = self.folder.parent / f"storescp-{self.port}.cfg"
        config.write_text(STORESCP_CONFIG)
        negotiation = ["-xf", str(config), self.profile] if self.profile else ["+xa"]
        self.process = subprocess.Popen(
            [
                "storescp", "-aet", self.ae_title, "-od", str(self.folder), *negotiation,
                *self.storage_options, *self.extra, str(self.port),
            ],
            env=dcmtk_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        _wait_for_port(self.port)
        return self


class QueryRetrieveSCP:
    """DCMTK dcmqrscp knowing one AE title, ``PACS``: it rejects an association called for any
    other with A-ASSOCIATE-RJ (rejected permanent, service user, called AE title not
    recognised), as a PACS does for a mistyped destination."""

    def __init__(self, folder: Path) -> None:
        require_tool("dcmqrscp")
        self.port = free_port()
        (folder / "db").mkdir(parents=True, exist_ok=True)
        self.config = folder / "dcmqrscp.cfg"
        self.config.write_text(
            f"NetworkTCPPort = {self.port}\nMaxPDUSize = 16384\nMaxAssociations = 4\n"
            "HostTable BEGIN\nHostTable END\nVendorTable BEGIN\nVendorTable END\n"
            f"AETable BEGIN\nPACS {folder / 'db'} RW (10, 64mb) ANY\nAETable END\n"
        )
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> QueryRetrieveSCP:
        self.process = subprocess.Popen(
            ["dcmqrscp", "-c", str(self.config)],
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


class PynetdicomPeer:
    """A pynetdicom Storage SCP of every output class. ``answer`` gives each C-STORE's status
    from its data set (it may also sleep or abort, as a misbehaving PACS does)."""

    def __init__(
        self,
        answer: Callable[[Any], int],
        *,
        ae_title: str = "PEER",
        classes: tuple[str, ...] = OUTPUT_CLASSES,
        max_associations: int = 10,
    ) -> None:
        self.ae_title = ae_title
        self.received: list[Dataset] = []
        self.associations = 0  # requested so far (counted before it is answered)
        self._answer = answer
        ae = AE(ae_title=ae_title)
        ae.maximum_associations = max_associations
        for sop_class in classes:
            ae.add_supported_context(sop_class)
        ae.add_supported_context("1.2.840.10008.1.1")  # Verification
        server = ae.start_server(
            ("127.0.0.1", 0),
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, self._store), (evt.EVT_REQUESTED, self._counted)],
        )
        assert server is not None
        self.ae = ae
        self.server = server
        self.port = int(server.server_address[1])

    def _counted(self, event: Any) -> None:
        self.associations += 1

    def _store(self, event: Any) -> int:
        status = self._answer(event)
        if status == 0:
            self.received.append(event.dataset)
        return status

    @property
    def destination(self) -> str:
        return f"{self.ae_title}@127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.shutdown()


class SilentPeer:
    """A port whose connections the kernel accepts (backlog) but nobody ever answers: the
    association request waits for its timeout."""

    def __init__(self) -> None:
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.socket.listen(8)
        self.port = int(self.socket.getsockname()[1])

    @property
    def destination(self) -> str:
        return f"SILENT@127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.socket.close()


def hold_association(peer: PynetdicomPeer) -> Callable[[], None]:
    """Open one association to ``peer`` and keep it open; returns the function releasing it."""
    ae = AE(ae_title="HOLDER")
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", peer.port, ae_title=peer.ae_title)
    assert assoc.is_established
    deadline = time.monotonic() + 5
    while len(peer.server.active_associations) < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    return assoc.release


# ---------------------------------------------------------------- worklist and worker


def sessions_for(url: str) -> sessionmaker[Session]:
    upgrade(url)
    return make_sessionmaker(make_engine(url))


def settings_for(tmp_path: Path, url: str, **overrides: Any) -> Settings:
    """Short backoff and few attempts, so a test drives every round itself."""
    values: dict[str, Any] = {
        "data_dir": tmp_path / "var",
        "database_url": url,
        "allow_untrained": True,
        "delivery_attempts": 3,
        "delivery_backoff_seconds": 0.5,
        "delivery_timeout_seconds": 5,
        "heatmaps": 2,
        "min_slices": 16,
        **overrides,
    }
    return Settings(_env_file=None, **values)


def _no_model() -> Any:
    raise AssertionError("delivery must not need the model")


def worker_context(settings: Settings, model: Callable[[], Any] = _no_model) -> WorkerContext:
    """A worker as ``worker.tasks`` builds one: its own engine, settings and model loader."""
    sessions = make_sessionmaker(make_engine(settings.resolved_database_url))
    return WorkerContext(settings=settings, sessions=sessions, model=model, name="test-worker")


def analysed_study(
    sessions: sessionmaker[Session], out_dir: Path, destinations: list[str]
) -> tuple[int, list[worklist.OutputRecord]]:
    """A study analysed by hand (fake CT, no model) whose SR and SCs are owed to
    ``destinations``; returns its id and its output records."""
    headers = ct_series(20, 32, pixels=False)
    records = write_outputs(
        Analysed(make_analysis(headers), headers),
        generation=1,
        content_datetime=WHEN,
        predecessor=None,
        out_dir=out_dir,
    )
    uid = str(headers[0].StudyInstanceUID)
    with transaction(sessions) as session:
        facts = worklist.InstanceFacts(
            study_uid=uid,
            series_uid=str(headers[0].SeriesInstanceUID),
            sop_instance_uid=str(headers[0].SOPInstanceUID),
            sop_class_uid=str(headers[0].SOPClassUID),
            transfer_syntax_uid="1.2.840.10008.1.2.1",
            path="/spool/not-read.dcm",
            size_bytes=1,
            sha256=hashlib.sha256(b"").hexdigest(),
        )
        worklist.record_instance(session, facts, association_id=None, now=T0)
    with transaction(sessions) as session:
        (study_id,) = worklist.complete_ready_studies(session, quiet_seconds=0, now=T0)
    with transaction(sessions) as session:
        claim = worklist.claim(session, study_id, worker="w", lease_seconds=60, now=T0)
        assert claim is not None
        assert worklist.finish_analysis(
            session,
            claim,
            analysis=worklist.AnalysisRecord(0.93, True, 0.8, "v", uid, [], {}),
            outputs=records,
            destinations=destinations,
            now=T0,
            delivery_grace_seconds=60,
        )
    return study_id, records


def study_row(sessions: sessionmaker[Session], study_id: int) -> Study:
    with transaction(sessions) as session:
        study = session.get(Study, study_id)
        assert study is not None
        session.expunge(study)
        return study


def delivery_rows(sessions: sessionmaker[Session], study_id: int) -> dict[str, list[Delivery]]:
    """The study's deliveries by output kind ("sr", "sc")."""
    rows: dict[str, list[Delivery]] = {"sr": [], "sc": []}
    with transaction(sessions) as session:
        for delivery, kind in session.execute(
            select(Delivery, Output.kind).join(Output).where(Output.study_id == study_id)
        ).all():
            rows[kind].append(delivery)
        session.expunge_all()
    return rows


def sop_classes_of(paths: list[Path]) -> list[str]:
    return sorted(str(pydicom.dcmread(p, stop_before_pixels=True).SOPClassUID) for p in paths)


class Served:
    """A uvicorn server in a thread (the web worklist), stopped by ``stop``."""

    def __init__(self, app: Any) -> None:
        import uvicorn

        self.port = free_port()
        self.server = uvicorn.Server(
            uvicorn.Config(
                app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off"
            )
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        _wait_for_port(self.port)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
