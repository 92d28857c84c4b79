"""Shared fixtures: real databases (SQLite file and a fresh PostgreSQL database per test),
phantom studies, the DCMTK PACS, listeners, a tiny training run; and the hooks that put each test
in its tier (``tests/helpers/tiers.py``).

PostgreSQL and Redis are the machine's own (127.0.0.1:5432 trust auth, 127.0.0.1:6379); each
test gets its own PostgreSQL database, so nothing leaks between tests. Helpers that are not
fixtures live in ``tests/helpers/``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from sqlalchemy.orm import Session, sessionmaker

from hrct_triage.common.settings import get_settings
from hrct_triage.db.migrate import upgrade
from hrct_triage.db.session import make_engine, make_sessionmaker
from hrct_triage.listener.scp import Listener
from tests.helpers.databases import create_database, drop_database
from tests.helpers.dicom_peers import StoreSCP
from tests.helpers.listeners import listener_settings
from tests.helpers.tiers import MARKER_OF_FIXTURE, TierAudit

if TYPE_CHECKING:
    from tests.helpers.training import TrainedRun

# ---------------------------------------------------------------- tiers

_audit = TierAudit()


@pytest.fixture(autouse=True)
def _settings_read_afresh() -> Iterator[None]:
    """Each test reads the settings of the environment it sets: settings cached under an earlier
    test's environment would outlive that test's monkeypatch."""
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that asks for a fixture of a tier is in that tier (before ``-m`` selects)."""
    for item in items:
        for fixture in getattr(item, "fixturenames", ()):
            marker = MARKER_OF_FIXTURE.get(fixture)
            if marker is not None and item.get_closest_marker(marker) is None:
                item.add_marker(marker)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    _audit.start(item)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item) -> Iterator[None]:
    try:
        yield
    finally:
        problems = _audit.finish()
    if problems:
        pytest.fail(f"{item.nodeid}: " + "; ".join(problems), pytrace=False)


# ---------------------------------------------------------------- databases


@pytest.fixture
def postgresql_url(request: pytest.FixtureRequest) -> Iterator[str]:
    if request.node.get_closest_marker("services") is None:
        # reached through request.getfixturevalue, which the collection hook cannot see
        pytest.fail(f"{request.node.nodeid} uses PostgreSQL but is not marked services")
    url = create_database()
    yield url
    drop_database(url)


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'worklist.sqlite'}"


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.services)])
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


@pytest.fixture
def sqlite_sessions(sqlite_url: str) -> Iterator[sessionmaker[Session]]:
    """A migrated SQLite worklist alone (tests whose subject does not differ by backend)."""
    upgrade(sqlite_url)
    engine = make_engine(sqlite_url, take_turns=True)
    yield make_sessionmaker(engine)
    engine.dispose()


# ---------------------------------------------------------------- studies and peers


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One COVID-like and one healthy phantom study, 60 thin slices each, plus a non-CT study."""
    from hrct_triage.phantoms import write_non_ct_study, write_phantom_studies

    out = tmp_path_factory.mktemp("phantoms")
    write_phantom_studies(out / "studies", covid=1, healthy=1, slices=60, seed=7)
    write_non_ct_study(out / "non_ct", seed=7)
    return out


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[StoreSCP]:
    scp = StoreSCP(tmp_path / "pacs").start()
    yield scp
    scp.stop()


# ---------------------------------------------------------------- the listener under test


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


# ---------------------------------------------------------------- training


@pytest.fixture(scope="session")
def tiny_phantoms(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two COVID-19-like and two healthy phantom studies with labels.csv and lesion masks."""
    from tests.helpers.training import write_tiny_phantoms

    return write_tiny_phantoms(tmp_path_factory.mktemp("training") / "phantoms")


@pytest.fixture(scope="session")
def trained_run(tiny_phantoms: Path, tmp_path_factory: pytest.TempPathFactory) -> TrainedRun:
    """One epoch of training on the tiny phantoms, made once per session."""
    from tests.helpers.training import train_tiny

    return train_tiny(tiny_phantoms, tmp_path_factory.mktemp("training") / "run")
