"""Fixtures of the fault suite: small phantoms, services of its own, the figures summary."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from hrct_triage.db.models import StudyStatus
from tests.faults.harness import (
    FAULT_SEED,
    FIGURES,
    OwnRedis,
    Pacs,
    PhantomStudy,
    figures_table,
    index_study,
    write_figures,
)

FIGURES_FILE: list[Path] = []


@pytest.fixture(scope="session")
def fault_studies(tmp_path_factory: pytest.TempPathFactory) -> list[PhantomStudy]:
    """Four small CT phantoms (12 thin slices: cheap to send and to analyse on two cores) and
    a study with no CT, whose rightful end is not_applicable."""
    from hrct_triage.phantoms import write_non_ct_study, write_phantom_studies

    out = tmp_path_factory.mktemp("fault-phantoms")
    written = write_phantom_studies(out / "studies", covid=2, healthy=2, slices=12, seed=11)
    studies = [index_study(s.folder, StudyStatus.DONE) for s in written]
    non_ct = write_non_ct_study(out / "non_ct", seed=11)
    studies.append(index_study(non_ct, StudyStatus.NOT_APPLICABLE))
    FIGURES_FILE[:] = [tmp_path_factory.getbasetemp() / "fault-figures.md"]
    return studies


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[OwnRedis]:
    server = OwnRedis(tmp_path / "redis").start()
    yield server
    server.stop()


@pytest.fixture
def fault_pacs(tmp_path: Path) -> Iterator[Pacs]:
    pacs = Pacs(tmp_path / "pacs").start()
    yield pacs
    pacs.stop()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not FIGURES:
        return
    terminalreporter.section(f"fault injection figures (seed {FAULT_SEED})")
    terminalreporter.write_line(figures_table())
    if FIGURES_FILE:
        write_figures(FIGURES_FILE[0])
        terminalreporter.write_line(f"written to {FIGURES_FILE[0]}")
