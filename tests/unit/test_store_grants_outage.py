"""Grants in the store while PostgreSQL is down (a server of this test's own, tests/pg.py, stopped and
started again): a worker checked lately keeps its heartbeat answered, anyone else is told to retry, and
the outage does not count as the worker's silence afterwards."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from reliability import record

from service.errors import Unavailable
from service.jobs.intake import Intake
from service.jobs.store import JobStore
from service.jobs.store_grants import SharedGrants
from tests.pg import PostgresServer, once_back, postgres_of_its_own
from tests.store_backends import make_spec

pytestmark = [pytest.mark.timeout(120), pytest.mark.reliability]


@pytest.fixture
def server() -> Iterator[PostgresServer]:
    with postgres_of_its_own() as made:
        yield made


def test_a_worker_checked_lately_keeps_its_heartbeat_while_the_database_is_down(
    server: PostgresServer,
) -> None:
    url = server.create_database("jobs")
    stores = [JobStore(url), JobStore(url)]
    try:
        launcher = Intake(stores[0], SharedGrants(stores[0], "a", touch_s=1.0))
        other = Intake(stores[1], SharedGrants(stores[1], "b", touch_s=1.0))
        job_id = stores[0].create_job(make_spec("outage")).id
        assert stores[0].claim_next("a", 600.0) is not None
        token = launcher.issue(job_id)
        assert other.heartbeat(token, job_id) is None  # checked against the database, remembered
        stranger = launcher.issue(stores[0].create_job(make_spec("never-called")).id)
        with stores[0].db.write() as db:  # the last heartbeat long ago: only the outage would explain it
            db.run("UPDATE report_grants SET last_seen = last_seen - 1000")
        assert launcher.silent_for(job_id) >= 1000.0  # the scheduler's tick, before the outage

        server.stop()
        assert other.heartbeat(token, job_id) is None  # from memory: it trains on
        with pytest.raises(Unavailable, match="cannot be checked; retry"):
            other.heartbeat(stranger, "whichever")  # never checked here: no answer to give
        with pytest.raises(Unavailable):
            launcher.silent_for(job_id)  # the scheduler's tick fails, and tries again
        server.start()

        # the database could not take heartbeats meanwhile (nor the scheduler read them: no tick got this
        # far): silence counts from its return
        assert once_back(lambda: launcher.silent_for(job_id)) < 60.0
        assert other.heartbeat(token, job_id) is None
        once_back(lambda: other.heartbeat(token, job_id))  # written again (lost in the outage)
        assert launcher.silent_for(job_id) < 5.0
        record(
            "fault",
            "PostgreSQL stopped and started again while workers report to two replicas (grants in the store)",
            1,
            "a worker checked lately kept its heartbeat answered from memory; a worker never checked got "
            "UNAVAILABLE 'cannot be checked; retry'; the scheduler's silence check failed and retried; after "
            "the restart the outage did not count as the worker's silence",
        )
    finally:
        for store in stores:
            store.close()


def stopped_for_each_reason(
    store: JobStore, launcher: Intake, answering: SharedGrants
) -> tuple[dict[str, str], dict[str, str]]:
    """A job claimed by replica "a" and asked to stop, for each stop reason: its id and its worker's token,
    by reason. `answering` (the replica the worker's calls reach) has checked each since, as an event
    batch does: it read the stop and told nobody."""
    jobs: dict[str, str] = {}
    tokens: dict[str, str] = {}
    for name, reason in (("drained", "draining"), ("cancelled", "cancelled")):
        job_id = jobs[reason] = store.create_job(make_spec(name)).id
        assert store.claim_next("a", 600.0) is not None
        tokens[reason] = launcher.issue(job_id)
        launcher.request_stop(job_id, reason)
        assert answering.check(tokens[reason], job_id) == reason
    return jobs, tokens


def test_with_the_database_down_a_drain_is_not_told_until_it_is_recorded_and_a_cancel_is(
    server: PostgresServer,
) -> None:
    """An adopter lets a worker that has not heard its last replica's drain train on, and stops one that
    has (store_takeover): a drain told but not recorded would stop a worker the adopter thinks trains on.
    A cancel is in the job's row: whoever watches the worker stops it, recorded or not."""
    url = server.create_database("jobs")
    stores = [JobStore(url), JobStore(url)]
    try:
        launcher = Intake(stores[0], SharedGrants(stores[0], "a", touch_s=1.0))
        answering = SharedGrants(stores[1], "b", touch_s=1.0)  # the replica the worker's calls reach
        other = Intake(stores[1], answering)
        jobs, tokens = stopped_for_each_reason(stores[0], launcher, answering)

        server.stop()
        assert other.heartbeat(tokens["draining"], jobs["draining"]) is None  # not told: no record
        assert other.heartbeat(tokens["cancelled"], jobs["cancelled"]) == "cancelled"
        server.start()

        # told once a heartbeat can record it (the first writes after the restart may still fail)
        deadline = time.monotonic() + 60
        while once_back(lambda: other.heartbeat(tokens["draining"], jobs["draining"])) != "draining":
            assert time.monotonic() < deadline, "the drain was never told once the database was back"
            time.sleep(0.1)
        with stores[0].db.read() as db:
            heard = db.one("SELECT stop_heard FROM report_grants WHERE job_id = :j", {"j": jobs["draining"]})
        assert heard is not None and heard["stop_heard"] == "draining"  # told once recorded
    finally:
        for store in stores:
            store.close()


def test_a_drain_whose_record_fails_is_not_told_and_a_cancel_is(
    server: PostgresServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The grant is read, and the write that records the telling fails (the database went away between)."""
    url = server.create_database("jobs")
    store = JobStore(url)
    try:
        grants = SharedGrants(store, "a", touch_s=1000.0)
        intake = Intake(store, grants)
        jobs, tokens = stopped_for_each_reason(store, intake, grants)  # touched: no write due at a heartbeat

        def fails(_work: object) -> object:
            raise Unavailable("the job store is away (a stand-in for the failed write: this test)")

        monkeypatch.setattr(store.db, "run_write", fails)
        assert intake.heartbeat(tokens["draining"], jobs["draining"]) is None
        assert intake.heartbeat(tokens["cancelled"], jobs["cancelled"]) == "cancelled"
        monkeypatch.undo()
        with store.db.read() as db:
            rows = db.all("SELECT stop_heard FROM report_grants")
        assert [row["stop_heard"] for row in rows] == [None, None]  # nothing recorded as told
        assert intake.heartbeat(tokens["draining"], jobs["draining"]) == "draining"  # now it can be
    finally:
        store.close()
