"""PACS peers for the delivery tests, each a real network peer: DCMTK storescp restricted by its
association configuration file, DCMTK storescp that refuses every association, DCMTK dcmqrscp
(which rejects a called AE title it does not know), pynetdicom SCPs that answer a chosen
status, abort or stall, and a socket that accepts connections but never answers."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydicom import Dataset
from pynetdicom import AE, evt

from hrct_triage.common.sop_classes import OUTPUT_CLASSES
from tests.helpers.dicom_peers import StoreSCP, dcmtk_env, require_tool
from tests.helpers.ports import free_port, wait_for_port

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
        wait_for_port(self.port)
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
        wait_for_port(self.port)
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
