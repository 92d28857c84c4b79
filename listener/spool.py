"""The spool: every stored instance as received, at a path made only from validated UIDs."""

from __future__ import annotations

from pathlib import Path

from db.storage import TEMP_SUFFIX, validate_uid


def instance_path(spool_dir: Path, study_uid: str, series_uid: str, sop_uid: str) -> Path:
    """``spool/<study>/<series>/<sop>.dcm``; raises InvalidUID before any path is made."""
    for value, name in (
        (study_uid, "StudyInstanceUID"),
        (series_uid, "SeriesInstanceUID"),
        (sop_uid, "SOPInstanceUID"),
    ):
        validate_uid(value, name)
    return spool_dir / study_uid / series_uid / f"{sop_uid}.dcm"


def remove_partial_files(spool_dir: Path) -> int:
    """Delete temporary files a killed listener left behind; return how many."""
    removed = 0
    if not spool_dir.exists():
        return 0
    for leftover in spool_dir.rglob(f".*{TEMP_SUFFIX}"):
        leftover.unlink(missing_ok=True)
        removed += 1
    return removed
