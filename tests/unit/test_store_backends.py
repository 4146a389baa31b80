"""Opening the job store: migrations (a file from before them is adopted), which URL picks which database,
and what a wrong URL, a wrong password or a database that is down say (one line, password masked).
PostgreSQL is real (tests/pg.py); the service is started as `tuneserve serve` in a real process."""

from __future__ import annotations

import json
import os
import secrets
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from service.errors import FailedPrecondition, InvalidArgument, Unavailable
from service.jobs.store import JobStore
from service.jobs.store_db import SCHEMA_HEAD
from service.jobs.store_open import store_target
from service.records import EventKind, JobState
from service.settings import Settings
from tests.pg import PostgresServer, once_back, postgres_of_its_own
from tests.ports import free_ports
from tests.store_backends import make_spec

OLD_SCHEMA = Path(__file__).parents[1] / "data" / "jobs_schema_before_migrations.sql"


def make_old_store_file(path: Path) -> None:
    """A jobs.sqlite3 as the code before migrations left it: its schema, user_version 1, one running job
    with two events and a worker pid."""
    db = sqlite3.connect(path)
    db.executescript(OLD_SCHEMA.read_text())
    db.execute("PRAGMA user_version = 1")
    spec = json.dumps(make_spec("old").to_dict(), sort_keys=True)
    db.execute(
        "INSERT INTO jobs (id, name, state, spec, created_at, updated_at, started_at, attempts, worker_pid)"
        " VALUES ('job-old', 'old', 'RUNNING', ?, 1.0, 2.0, 2.0, 1, 4242)",
        (spec,),
    )
    for seq, state in ((1, "QUEUED"), (2, "RUNNING")):
        db.execute(
            "INSERT INTO events (job_id, seq, time, kind, message, data)"
            " VALUES ('job-old', ?, 1.0, 'STATE', ?, ?)",
            (seq, state, json.dumps({"state": state})),
        )
    db.commit()
    db.close()


def columns(path: Path, table: str) -> set[str]:
    with sqlite3.connect(path) as db:
        return {row[1] for row in db.execute(f"PRAGMA table_info({table})")}


def test_a_store_file_from_before_migrations_is_adopted_and_upgraded(tmp_path: Path) -> None:
    make_old_store_file(tmp_path / "jobs.sqlite3")
    store = JobStore(tmp_path / "jobs.sqlite3")
    job = store.get_job("job-old")
    assert (job.state, job.attempts, store.worker_pid(job.id)) == (JobState.RUNNING, 1, 4242)
    assert [e.seq for e in store.events_after(job.id)] == [1, 2]
    store.append_event(job.id, EventKind.INFO, "after the upgrade")
    assert store.events_after(job.id, 2)[0].seq == 3
    [requeued] = store.requeue_interrupted()
    assert requeued.id == "job-old" and store.claim_next("r1", 30) is not None  # the new lease columns
    store.close()
    with sqlite3.connect(tmp_path / "jobs.sqlite3") as db:
        assert db.execute("SELECT version_num FROM alembic_version").fetchall() == [(SCHEMA_HEAD,)]


def test_an_adopted_file_and_a_new_file_have_the_same_tables_and_columns(tmp_path: Path) -> None:
    (tmp_path / "old").mkdir()
    make_old_store_file(tmp_path / "old" / "jobs.sqlite3")
    JobStore(tmp_path / "old" / "jobs.sqlite3").close()
    JobStore(tmp_path / "new" / "jobs.sqlite3").close()
    for table in ("jobs", "events", "write_probe", "alembic_version"):
        assert columns(tmp_path / "old" / "jobs.sqlite3", table) == columns(
            tmp_path / "new" / "jobs.sqlite3", table
        )


def test_opening_a_store_at_the_newest_revision_changes_nothing(store_location: Path | str) -> None:
    first = JobStore(store_location)
    job = first.create_job(make_spec())
    second = JobStore(store_location)  # migrates again: nothing to do
    assert second.get_job(job.id) == job
    first.close()
    second.close()


@contextmanager
def migrated_by_a_newer_tuneserve(
    backend: str, tmp_path: Path, server: PostgresServer, oldest_code: str
) -> Iterator[Path | str]:
    """A store whose schema revision this code has no script for (9999), whose migrations declare that
    code from `oldest_code` on runs on it (as a newer release's store_migrate writes)."""
    name = f"newer_{secrets.token_hex(4)}"
    location: Path | str = tmp_path / "jobs.sqlite3" if backend == "sqlite" else server.create_database(name)
    try:
        store = JobStore(location)
        with store.db.write() as db:
            db.run("UPDATE alembic_version SET version_num = '9999'")
            db.run("UPDATE schema_compat SET oldest_code = :o", {"o": oldest_code})
        store.close()
        yield location
    finally:
        if backend != "sqlite":
            server.drop_database(name)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_store_a_newer_tuneserve_migrated_is_refused_saying_what_to_do(
    backend: str, tmp_path: Path, postgres_server: PostgresServer
) -> None:
    """A rollback to an older release, or an old replica restarted during a rolling update, where the
    newer migrations say this code cannot run on them."""
    with (
        migrated_by_a_newer_tuneserve(backend, tmp_path, postgres_server, "9000") as location,
        pytest.raises(FailedPrecondition) as caught,
    ):
        JobStore(location)
    message = caught.value.message
    assert "schema revision 9999" in message and f"its newest is {SCHEMA_HEAD}" in message
    assert "needs tuneserve code of schema revision 9000 or newer" in message
    assert "Run that version or a newer one" in message and "restore the store from a backup" in message
    assert postgres_server.password not in message and "\n" not in message


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_store_whose_newer_migrations_this_code_runs_on_is_used_as_it_is(
    backend: str, tmp_path: Path, postgres_server: PostgresServer, caplog: pytest.LogCaptureFixture
) -> None:
    with migrated_by_a_newer_tuneserve(backend, tmp_path, postgres_server, SCHEMA_HEAD) as location:
        store = JobStore(location)
        try:
            job = store.create_job(make_spec("after-a-rollback"))
            assert store.get_job(job.id).state == JobState.QUEUED
            with store.db.read() as db:  # not migrated "back": the newer release's revision stays
                assert db.one("SELECT version_num FROM alembic_version")["version_num"] == "9999"
        finally:
            store.close()
    assert any("running without migrating" in r.getMessage() for r in caplog.records)


def test_the_oldest_code_recorded_is_what_the_migrations_declare(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.sqlite3")
    with store.db.read() as db:
        assert db.one("SELECT oldest_code FROM schema_compat")["oldest_code"] == "0004"
        assert len(db.all("SELECT oldest_code FROM schema_compat")) == 1  # one row, after every start
    store.close()
    JobStore(tmp_path / "jobs.sqlite3").close()


def test_no_url_means_the_sqlite_file_in_the_state_folder(tmp_path: Path) -> None:
    assert store_target(Settings(state_dir=tmp_path)) == tmp_path / "jobs.sqlite3"  # type: ignore[call-arg]
    url = "postgresql://u:p@db:5432/jobs"
    assert store_target(Settings(state_dir=tmp_path, database_url=url)) == url  # type: ignore[call-arg]


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("mysql://admin:hunter2@db/jobs", "mysql://admin:***@db/jobs"),
        ("sqlite://", "sqlite://"),
        ("not a url", "not a url"),
    ],
)
def test_a_url_of_an_unsupported_kind_is_invalid_and_names_what_works(url: str, shown: str) -> None:
    with pytest.raises(InvalidArgument, match="postgresql://USER:PASSWORD@HOST:5432/DATABASE") as caught:
        JobStore(url)
    assert shown in caught.value.message and "hunter2" not in caught.value.message


def test_a_wrong_password_is_one_line_with_the_password_masked(
    postgres_server: PostgresServer, postgres_database: str
) -> None:
    url = postgres_database.replace(postgres_server.password, "wrong-secret")
    with pytest.raises(Unavailable) as caught:
        JobStore(url)
    message = caught.value.message
    assert "\n" not in message and "wrong-secret" not in message
    assert f"postgres:***@127.0.0.1:{postgres_server.port}" in message
    assert "password authentication failed" in message and "fix the user or password" in message


def test_a_missing_database_says_to_create_it(postgres_server: PostgresServer) -> None:
    with pytest.raises(Unavailable, match=r"does not exist.*create that database") as caught:
        JobStore(postgres_server.url("no_such_db"))
    assert postgres_server.password not in caught.value.message


def test_a_database_that_is_not_running_says_to_start_it() -> None:
    url = f"postgresql://postgres:secret@127.0.0.1:{free_ports(1)[0]}/jobs"
    with pytest.raises(Unavailable, match=r"unavailable .*start the database") as caught:
        JobStore(url)
    assert "secret" not in caught.value.message


@pytest.mark.slow
def test_the_service_exits_non_zero_at_start_when_the_database_is_down(tmp_path: Path) -> None:
    url = f"postgresql://postgres:s3cret@127.0.0.1:{free_ports(1)[0]}/jobs"
    env = {
        **os.environ,
        "TUNESERVE_DATABASE_URL": url,
        "TUNESERVE_STATE_DIR": str(tmp_path / "state"),
        "TUNESERVE_PORT": "0",
        "TUNESERVE_TORCHSERVE_ENABLED": "false",
        "PYTHONPATH": str(Path(__file__).parents[2]),
    }
    done = subprocess.run(
        [sys.executable, "-m", "service.cli.main", "serve"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 6, done.stderr  # UNAVAILABLE's exit code
    [line] = [ln for ln in done.stderr.splitlines() if ln.startswith("error:")]
    assert line.startswith("error: UNAVAILABLE: the job store's database postgresql://postgres:***@127.0.0.1")
    assert "start the database" in line and "s3cret" not in done.stderr


@pytest.mark.slow
def test_postgres_down_while_running_is_unavailable_and_nothing_is_lost_when_it_returns() -> None:
    with postgres_of_its_own() as server:
        store = JobStore(server.create_database("jobs"))
        job = store.create_job(make_spec())
        server.stop()
        with pytest.raises(Unavailable, match=r"postgres:\*\*\*@.*unavailable"):
            store.append_event(job.id, EventKind.INFO, "while down")
        with pytest.raises(Unavailable):
            store.get_job(job.id)
        server.start()
        # a failed try wrote nothing ("retry"): the event is there once
        once_back(lambda: store.append_event(job.id, EventKind.INFO, "back"))
        assert [e.message for e in store.events_after(job.id)] == ["job queued", "back"]
        store.close()
