"""A listener under test: its settings, the series it is sent, and what it leaves behind
(associations, nameless spool files, metrics)."""

from __future__ import annotations

import os
import time
import urllib.request
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from hrct_triage.common.settings import Settings
from hrct_triage.db.models import Association
from hrct_triage.db.session import transaction
from tests.helpers.ports import free_port


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


def nameless_files_open(spool_dir: Path) -> list[str]:
    """This process's open ``O_TMPFILE`` files in ``spool_dir``: ``/proc`` shows each as
    ``<folder>/#<inode> (deleted)``."""
    found = []
    for fd in Path("/proc/self/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:  # closed since the listing
            continue
        if target.startswith(f"{spool_dir}/#") and target.endswith(" (deleted)"):
            found.append(target)
    return found


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the metrics endpoint on ``port``, keyed by name and sorted labels."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
