"""Sends a folder of DICOM files over one association, as a CT scanner auto-forwarding does."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from pydicom import dcmread
from pynetdicom import AE


def send_folder(
    folder: Path,
    *,
    host: str,
    port: int,
    called_ae: str,
    calling_ae: str = "DEMO_CT",
    progress: Callable[[int], None] | None = None,
) -> list[int]:
    """C-STORE every ``*.dcm`` under ``folder``; returns the status of each."""
    paths = sorted(folder.rglob("*.dcm"))
    datasets = [dcmread(path) for path in paths]
    ae = AE(ae_title=calling_ae)
    contexts = sorted(
        {(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for ds in datasets}
    )
    for sop_class, syntax in contexts:
        ae.add_requested_context(sop_class, syntax)
    assoc = ae.associate(host, port, ae_title=called_ae)
    if not assoc.is_established:
        raise ConnectionError(f"{called_ae}@{host}:{port} refused the association")
    statuses: list[int] = []
    try:
        for dataset in datasets:
            status = assoc.send_c_store(dataset)
            statuses.append(int(status.Status) if status and "Status" in status else -1)
            if progress:
                progress(1)
    finally:
        assoc.release()
    return statuses
