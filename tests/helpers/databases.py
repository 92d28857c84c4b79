"""The machine's PostgreSQL and Redis (``services`` tier): where they are, and a fresh
PostgreSQL database for one test.

``HRCT_TEST_PG`` and ``HRCT_TEST_REDIS`` point the tests elsewhere.
"""

from __future__ import annotations

import os
import uuid

import psycopg

PG_ADMIN = os.environ.get("HRCT_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("HRCT_TEST_REDIS", "redis://127.0.0.1:6379")


def create_database() -> str:
    """A new, empty PostgreSQL database; its SQLAlchemy URL."""
    name = f"hrct_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://")
    return f"{base}/{name}"


def drop_database(url: str) -> None:
    name = url.rsplit("/", 1)[1]
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
