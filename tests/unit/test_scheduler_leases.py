"""The scheduler on a shared PostgreSQL (tests/pg.py) with leases: stand-in workers (fake_worker.py) as
local processes reporting through the real reporting API, as in test_scheduler.py. The "other replica"
here is this test acting on the same database through the store's own lease calls (claim_next,
requeue_expired), as a second service would."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
from procs import running
from test_scheduler import Harness, make_spec

from service.records import EventKind, JobState

pytestmark = pytest.mark.timeout(120)
MakeHarness = Callable[..., Harness]


def take_over(h: Harness, job_id: str, workers: set[int]) -> bool:
    """What another replica does once this one has been cut off for longer than a lease: the job's lease
    has expired, it is re-queued (by whichever replica looks first, this one's scheduler included) and
    "other" claims it. False when this replica's scheduler claimed it back first (then: try again)."""
    pid = h.store.worker_pid(job_id)
    if pid is not None:
        workers.add(pid)
    with h.store.db.write() as db:
        db.run("UPDATE jobs SET lease_expires = 0 WHERE id = :id AND lease_owner = 'me'", {"id": job_id})
    h.store.requeue_expired()
    claimed = h.store.claim_next("other", 60.0)
    return claimed is not None and claimed.id == job_id


@pytest.fixture
def make_harness(tmp_path: Path, postgres_database: str) -> Iterator[MakeHarness]:
    made: list[Harness] = []

    def make(**settings: object) -> Harness:
        values = {"database_url": postgres_database, "replica_id": "me", "lease_s": 3.0, "report_lost_s": 2.0}
        h = Harness(tmp_path, **(values | settings))
        made.append(h)
        return h

    yield make
    for h in made:
        h.scheduler.stop(drain=False)
        h.close()
    # the module shares one database: a job a test leaves RUNNING would be re-queued (its lease expires)
    # and claimed before the next test's own jobs
    with psycopg.connect(postgres_database, autocommit=True) as conn:
        conn.execute("TRUNCATE events, jobs, write_probe RESTART IDENTITY")


def test_at_start_only_this_replicas_own_and_never_leased_jobs_are_requeued(
    make_harness: MakeHarness,
) -> None:
    h = make_harness()
    others = h.store.create_job(make_spec("others")).id
    mine = h.store.create_job(make_spec("ok-mine")).id
    unleased = h.store.create_job(make_spec("ok-unleased")).id
    assert h.store.claim_next("other", 60.0).id == others  # alive elsewhere: renewed, not expired
    assert h.store.claim_next("me", 60.0).id == mine  # this replica's, from before its restart
    h.store.transition(unleased, JobState.RUNNING)  # started by a service without leases
    events_of_others = h.store.events_after(others)

    h.scheduler.start()
    for job_id in (mine, unleased):
        h.wait_state(job_id, JobState.SUCCEEDED)
        assert any("the service restarted" in m for m in h.messages(job_id, EventKind.INFO))
        assert h.store.get_job(job_id).attempts == 1  # the interrupted attempt was refunded
    assert h.store.get_job(others).state == JobState.RUNNING
    assert h.store.lease_owner(others) == "other"
    assert h.store.events_after(others) == events_of_others  # untouched: no requeue, no event
    assert others not in h.scheduler.running()


def test_jobs_are_claimed_with_a_lease_that_is_renewed_while_they_run(make_harness: MakeHarness) -> None:
    h = make_harness()
    h.scheduler.start()
    job_id = h.create("slow")
    h.wait_started(job_id)
    assert h.store.lease_owner(job_id) == "me"
    time.sleep(6.0)  # twice the lease: renewed meanwhile, so nothing expires
    assert h.store.requeue_expired() == []
    assert h.store.get_job(job_id).state == JobState.RUNNING
    states = [e.message for e in h.store.events_after(job_id) if e.kind == EventKind.STATE]
    assert states[1:] == ["QUEUED -> RUNNING: claimed by me"]  # after "job queued": claimed once


def test_a_job_another_replica_took_over_has_its_worker_killed_here(make_harness: MakeHarness) -> None:
    h = make_harness()
    h.scheduler.start()
    job_id = h.create("slow")
    h.wait_started(job_id)
    workers: set[int] = set()
    h.wait(lambda: take_over(h, job_id, workers))
    before = h.store.events_after(job_id)

    h.wait(lambda: job_id not in h.scheduler.running())
    h.wait(lambda: not any(running(pid) for pid in workers))
    assert workers
    job = h.store.get_job(job_id)
    assert (job.state, h.store.lease_owner(job_id)) == (JobState.RUNNING, "other")
    assert h.store.events_after(job_id) == before  # no retry, no state change written by this replica


def test_a_job_whose_gpus_are_busy_is_not_claimed_until_they_are_free(make_harness: MakeHarness) -> None:
    h = make_harness(gpu_count=4, max_concurrent_jobs=4)
    h.scheduler.start()
    three = h.create("slow-three", gpus=3)
    h.wait_started(three)
    pair, single = h.create("slow-pair", gpus=2), h.create("slow-single", gpus=1)
    time.sleep(1.0)  # many ticks: one GPU is free, yet neither is claimed (oldest first, no claim churn)
    for job_id in (pair, single):
        assert (h.store.get_job(job_id).state, h.store.lease_owner(job_id)) == (JobState.QUEUED, None)
        assert h.messages(job_id, EventKind.STATE) == ["job queued"]
    h.store.request_cancel(three)
    h.wait_started(pair)
    h.wait_started(single)
    assert h.visible_devices(pair) == ["0,1"] and h.visible_devices(single) == ["2"]
    assert h.store.lease_owner(pair) == "me" == h.store.lease_owner(single)
