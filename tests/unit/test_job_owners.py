"""Owners in the job store and the jobs API's domain (real SQLite): a store from before owners gains the
column with its jobs ownerless (then an admin's only), a client sees and lists only its own jobs, and its
limits are counted per owner."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.config import Config

from service.access.clients import ANONYMOUS, Client, Role
from service.errors import NotFound, ResourceExhausted
from service.jobs.manager import JobManager
from service.jobs.store import JobStore
from service.jobs.store_migrate import MIGRATIONS
from service.jobs.store_owners import OwnerLimits
from service.records import JobState
from service.settings import Settings
from tests.store_backends import make_spec

ALICE = Client("alice", frozenset({Role.SUBMIT}), max_queued=1)
BOB = Client("bob", frozenset({Role.SUBMIT}))
ROOT = Client("root", frozenset({Role.ADMIN}))


def store_at_0002(path: Path) -> None:
    """A store file as the code before owners left it (migrated up to 0002), with one queued job."""
    engine = sa.create_engine(f"sqlite:///{path}")
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        command.upgrade(config, "0002")
        conn.execute(
            sa.text(
                "INSERT INTO jobs (id, name, state, spec, created_at, updated_at)"
                " VALUES ('job-before', 'before', 'QUEUED', :spec, 1.0, 1.0)"
            ),
            {"spec": make_spec("before").model_dump_json()},
        )
    engine.dispose()


def manager(store: JobStore, tmp_path: Path) -> JobManager:
    def admit(spec: Any, settings: Any) -> None:  # admission is not what these tests are about
        return None

    return JobManager(Settings(state_dir=tmp_path / "state"), store, admit=admit)


def test_a_store_from_before_owners_gains_the_column_and_its_jobs_are_an_admins(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite3"
    store_at_0002(path)
    store = JobStore(path)
    jobs = manager(store, tmp_path)
    assert store.get_job("job-before").owner is None
    assert jobs.get("job-before", ROOT).id == "job-before"
    assert jobs.get("job-before", ANONYMOUS).id == "job-before"
    with pytest.raises(NotFound):
        jobs.get("job-before", ALICE)
    store.close()
    with sqlite3.connect(path) as db:
        assert "owner" in {row[1] for row in db.execute("PRAGMA table_info(jobs)")}


def test_a_client_sees_lists_and_cancels_its_own_jobs_only(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.sqlite3")
    jobs = manager(store, tmp_path)
    mine = jobs.create(make_spec("a"), ALICE)
    theirs = jobs.create(make_spec("b"), BOB)
    assert mine.owner == "alice" and theirs.owner == "bob"
    assert [j.id for j in jobs.list([], 0, "", ALICE)[0]] == [mine.id]
    assert {j.id for j in jobs.list([], 0, "", ROOT)[0]} == {mine.id, theirs.id}
    with pytest.raises(NotFound) as caught:
        jobs.cancel(theirs.id, ALICE)
    assert caught.value.message == f"job {theirs.id!r} does not exist; ListJobs shows the jobs there are"
    assert store.get_job(theirs.id).state == JobState.QUEUED
    assert jobs.cancel(theirs.id, ROOT).state == JobState.CANCELLED
    store.close()


def test_limits_count_the_owners_jobs_only(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.sqlite3")
    store.create_job(make_spec("b1"), owner=OwnerLimits("bob"))
    store.create_job(make_spec("a1"), owner=OwnerLimits("alice", max_queued=1))
    with pytest.raises(ResourceExhausted, match="client alice has 1 queued jobs; its limit is 1"):
        store.create_job(make_spec("a2"), owner=OwnerLimits("alice", max_queued=1))
    store.create_job(make_spec("b2"), owner=OwnerLimits("bob", max_queued=2))  # bob's own count is 1
    store.close()
