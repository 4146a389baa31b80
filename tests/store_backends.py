"""The job store on each backend, as fixtures for the store's test modules: `store_location` (parametrized)
and `store` (a JobStore opened on it).

raw sqlite3 (the default), SQLite through SQLAlchemy (a `sqlite:///` URL), and a real PostgreSQL
(tests/pg.py) through SQLAlchemy and psycopg 3.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from service.jobs.store import JobStore
from service.spec import JobSpec

BACKENDS = ["sqlite", "sqlalchemy-sqlite", "postgresql"]


def make_spec(name: str = "job", **training: Any) -> JobSpec:
    return JobSpec.model_validate(
        {"name": name, "model": {"architecture": "resnet18"}, "data": {"path": "ds"}, "training": training}
    )


@pytest.fixture(params=BACKENDS)
def store_location(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path | str]:
    """Where a test's store lives: a SQLite path, or a URL (PostgreSQL: the module's database, emptied
    after each test)."""
    if request.param == "sqlite":
        yield tmp_path / "jobs.sqlite3"
    elif request.param == "sqlalchemy-sqlite":
        yield f"sqlite:///{tmp_path / 'jobs.sqlite3'}"
    else:
        url = request.getfixturevalue("postgres_database")
        yield url
        with (
            psycopg.connect(url, autocommit=True) as conn,
            contextlib.suppress(psycopg.errors.UndefinedTable),
        ):
            conn.execute("TRUNCATE events, jobs, write_probe RESTART IDENTITY")


@pytest.fixture
def store(store_location: Path | str) -> Iterator[JobStore]:
    db = JobStore(store_location)
    yield db
    db.close()
