"""A PACS stand-in for the demo: a Storage SCP that files what it receives by study.

Tests use DCMTK's storescp and Orthanc instead; this exists so the demo needs nothing installed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from hrct_triage.common.storage import InvalidUID, validate_uid, write_durably


class PacsStandIn:
    def __init__(self, folder: Path, *, ae_title: str = "DEMO_PACS", port: int = 0) -> None:
        self.folder = folder
        self.ae_title = ae_title
        self.port = port
        self._server: Any = None

    def _store(self, event: Any) -> int:
        try:
            ds = event.dataset
            study = validate_uid(ds.StudyInstanceUID, "StudyInstanceUID")
            sop = validate_uid(ds.SOPInstanceUID, "SOPInstanceUID")
        except (InvalidUID, AttributeError):
            return 0xC001  # Error: cannot understand (invalid UIDs)
        write_durably(self.folder / study / f"{sop}.dcm", event.encoded_dataset())
        return 0x0000  # Success: stored

    def start(self) -> int:
        ae = AE(ae_title=self.ae_title)
        ae.add_supported_context(Verification)
        for context in AllStoragePresentationContexts:
            if context.abstract_syntax is not None:
                ae.add_supported_context(context.abstract_syntax)
        self._server = ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)]
        )
        self.port = int(self._server.server_address[1])
        return self.port

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()

    def received(self) -> dict[str, list[Path]]:
        """Files received, by study UID."""
        if not self.folder.exists():
            return {}
        return {
            d.name: sorted(d.glob("*.dcm")) for d in sorted(self.folder.iterdir()) if d.is_dir()
        }
