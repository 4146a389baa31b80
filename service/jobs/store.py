"""The durable job store: jobs and their ordered events, on SQLite (default) or PostgreSQL.

The logic is written once here over a `Database` (service.jobs.store_db): raw sqlite3 on one file (WAL)
when no URL is set, PostgreSQL through SQLAlchemy when TUNESERVE_DATABASE_URL names one. Every write
goes through the process's one writer (service.jobs.store_writer: batched commits, each write in a
SAVEPOINT of its own) and is one unit that locks what it changes, so a state change and the STATE event
that records it land together or not at all, and each job's events are numbered 1, 2, 3... without
gaps, whichever process or replica writes them (WatchJob resumes by that number).

Idempotency: CreateJob with a key already used returns that job when the spec is the same, and raises
AlreadyExists (naming the existing job) when the spec differs: a key names one request, never two.

Who holds a running job (a replica's lease on a shared PostgreSQL, a launcher's worker): see
service.jobs.store_leases; who takes it over when that lease runs out: service.jobs.store_takeover.
JobStore has both modules' methods.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from service.errors import AlreadyExists, InvalidArgument, ResourceExhausted
from service.jobs import store_states
from service.jobs.event_bell import EventBell
from service.jobs.store_codec import (
    RESULT_FIELDS,
    decode_page_token,
    encode_page_token,
    event_from_row,
    job_from_row,
    jsonable,
    result_from_json,
)
from service.jobs.store_db import Conn, Database
from service.jobs.store_leases import Holders
from service.jobs.store_open import open_database
from service.jobs.store_owners import OwnerLimits, check_owner_limits
from service.jobs.store_rows import fetch_row, insert_event, placeholders, update_row
from service.jobs.store_states import ALLOWED_TRANSITIONS
from service.jobs.store_takeover import TakeOvers
from service.records import EventKind, Job, JobEvent, JobResult, JobState
from service.spec import JobSpec

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500
MAX_IDEMPOTENCY_KEY = 128
__all__ = ["ALLOWED_TRANSITIONS", "JobStore"]

T = TypeVar("T")


class JobStore(Holders, TakeOvers):
    """Jobs and events in the database `target` names: a SQLite file's path, a database URL
    (postgresql://..., sqlite:///...), or an open Database. One instance per process; thread-safe."""

    def __init__(self, target: Path | str | Database) -> None:
        self.db = open_database(target)
        # rung after each committed write that adds events, so WatchJob waits instead of polling
        self.bell = EventBell()
        self.path: Path | None = Path(target) if isinstance(target, Path) else None

    @property
    def display_url(self) -> str:
        """Where the jobs are (a password masked)."""
        return self.db.display_url

    # ------------------------------------------------------------------ jobs

    def create_job(
        self,
        spec: JobSpec,
        idempotency_key: str | None = None,
        *,
        max_queued: int | None = None,
        notes: Iterable[tuple[EventKind, str, dict[str, Any]]] = (),
        owner: OwnerLimits | None = None,
    ) -> Job:
        """Queue a job with its first STATE event and `notes` (more events); the same key and spec return
        the existing job, untouched. `owner`: the creating client, whose own limits hold too."""
        key = _check_key(idempotency_key)
        spec_json = json.dumps(spec.to_dict(), sort_keys=True)
        now = time.time()

        def create(db: Conn) -> Job:
            # creations one at a time everywhere, so a key or the queue limit holds across replicas
            db.exclusive("tuneserve.create_job")
            if key is not None:
                row = db.one("SELECT * FROM jobs WHERE idempotency_key = :key", {"key": key})
                if row is not None:
                    if row["spec"] != spec_json:
                        raise AlreadyExists(
                            f"idempotency_key {key!r} was already used for job {row['id']} with a different "
                            "spec; send the same spec to get that job back, or use a new key"
                        )
                    return job_from_row(row)
            if max_queued is not None:
                queued = db.one(
                    "SELECT COUNT(*) AS n FROM jobs WHERE state = :s", {"s": JobState.QUEUED.value}
                )
                if queued is not None and queued["n"] >= max_queued:
                    raise ResourceExhausted(
                        f"{max_queued} jobs are already queued (TUNESERVE_MAX_QUEUED_JOBS); wait for some to "
                        "start or cancel queued ones, then retry"
                    )
            if owner is not None:
                check_owner_limits(db, owner)
            job_id = new_job_id()
            db.run(
                "INSERT INTO jobs (id, name, state, spec, created_at, updated_at, idempotency_key, owner)"
                " VALUES (:id, :name, :state, :spec, :now, :now, :key, :owner)",
                {"id": job_id, "name": spec.name, "state": JobState.QUEUED.value, "spec": spec_json}
                | {"now": now, "key": key, "owner": owner.owner if owner is not None else None},
            )
            insert_event(db, job_id, EventKind.STATE, "job queued", {"state": JobState.QUEUED}, now)
            for kind, message, data in notes:
                insert_event(db, job_id, kind, message, data, now)
            return job_from_row(fetch_row(db, job_id))

        return self.db.run_write(create)

    def get_job(self, job_id: str) -> Job:
        with self.db.read() as db:
            return job_from_row(fetch_row(db, job_id))

    def job_for_key(self, idempotency_key: str) -> Job | None:
        """The job created with this idempotency key, if any."""
        with self.db.read() as db:
            row = db.one("SELECT * FROM jobs WHERE idempotency_key = :key", {"key": idempotency_key})
        return None if row is None else job_from_row(row)

    def list_jobs(
        self,
        states: Iterable[JobState] = (),
        page_size: int = 0,
        page_token: str = "",
        *,
        owner: str | None = None,
    ) -> tuple[list[Job], str]:
        """A page of jobs, newest first, and the token of the next page ("" at the end); with `owner`,
        only that client's."""
        if page_size < 0:
            raise InvalidArgument(f"page_size {page_size} is negative; use 1..{MAX_PAGE_SIZE}, or 0 for 50")
        size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        wanted = sorted({JobState(s).value for s in states})
        where = "num < :before"
        params: dict[str, Any] = {"before": decode_page_token(page_token) if page_token else 2**62}
        if wanted:
            names, values = placeholders("s", wanted)
            where += f" AND state IN ({names})"
            params |= values
        if owner is not None:
            where += " AND owner = :owner"
            params["owner"] = owner
        with self.db.read() as db:
            page = db.all(
                f"SELECT * FROM jobs WHERE {where} ORDER BY num DESC LIMIT :n", params | {"n": size + 1}
            )
        token = encode_page_token(page[size - 1]["num"]) if len(page) > size else ""
        return [job_from_row(r) for r in page[:size]], token

    def next_queued(self, exclude: Sequence[str] = ()) -> Job | None:
        """The oldest QUEUED job (FIFO by creation) not in `exclude`."""
        with self.db.read() as db:
            rows = db.all(
                "SELECT * FROM jobs WHERE state = :s ORDER BY num LIMIT :n",
                {"s": JobState.QUEUED.value, "n": len(exclude) + 1},
            )
        return next((job_from_row(r) for r in rows if r["id"] not in exclude), None)

    def jobs_in(self, states: Iterable[JobState]) -> list[Job]:
        """Every job in one of `states`, oldest first."""
        names, values = placeholders("s", sorted({JobState(s).value for s in states}))
        with self.db.read() as db:
            rows = db.all(f"SELECT * FROM jobs WHERE state IN ({names}) ORDER BY num", values)
        return [job_from_row(r) for r in rows]

    # ------------------------------------------------------------------ state machine

    def transition(
        self,
        job_id: str,
        to_state: JobState,
        reason: str = "",
        *,
        expect: Iterable[JobState] | None = None,
        refund_attempt: bool = False,
    ) -> Job:
        """Move a job to `to_state` and record a STATE event, atomically.

        `expect` narrows the states it may come from (FailedPrecondition otherwise). QUEUED->RUNNING counts
        an attempt; `refund_attempt` on a requeue gives it back (a drain or restart is not the job's fault).
        A FAILED job's `reason` becomes its error. Leaving RUNNING/PACKAGING ends the job's lease.
        """
        return self._write_events(
            job_id, lambda db: store_states.transition(db, job_id, to_state, reason, expect, refund_attempt)
        )

    def request_cancel(self, job_id: str) -> Job:
        """Mark a job for cancellation; a QUEUED job is CANCELLED at once, a running one by the scheduler."""
        return self._write_events(job_id, lambda db: store_states.request_cancel(db, job_id))

    def requeue_interrupted(
        self,
        reason: str = "the service restarted",
        *,
        replica: str | None = None,
        exclude: Collection[str] = (),
    ) -> list[Job]:
        """On start-up: RUNNING/PACKAGING jobs go back to QUEUED (or CANCELLED if that was asked), but
        those in `exclude` (adopted again). With `replica` (a shared database), only the jobs leased to
        it or never leased (started by a service without leases): other replicas' jobs are theirs, or
        take_over_expired's once they expire."""
        requeued = []
        for job in self.interrupted(replica):
            if job.id in exclude:
                continue
            if job.cancel_requested:
                self.transition(job.id, JobState.CANCELLED, f"cancelled by request ({reason})")
                continue
            self.transition(job.id, JobState.QUEUED, reason, refund_attempt=True)
            self.append_event(job.id, EventKind.INFO, f"{reason}; the job resumes from its last checkpoint")
            requeued.append(self.get_job(job.id))
        return requeued

    # ------------------------------------------------------------------ results and events

    def update_result(self, job_id: str, **fields: Any) -> JobResult:
        """Merge `fields` into the job's result (names of JobResult fields only)."""
        unknown = sorted(set(fields) - RESULT_FIELDS)
        if unknown:
            raise ValueError(f"unknown JobResult field(s) {unknown}; known: {sorted(RESULT_FIELDS)}")

        def merge(db: Conn) -> JobResult:
            row = fetch_row(db, job_id, lock=True)
            merged = {**json.loads(row["result"]), **jsonable(fields)}
            update_row(db, job_id, {"result": json.dumps(merged), "updated_at": time.time()})
            return result_from_json(merged)

        return self.db.run_write(merge)

    def append_event(
        self, job_id: str, kind: EventKind, message: str, data: dict[str, Any] | None = None
    ) -> JobEvent:
        """Add an event with the job's next sequence number."""

        def append(db: Conn) -> JobEvent:
            fetch_row(db, job_id, lock=True)
            return insert_event(db, job_id, EventKind(kind), message, data or {}, time.time())

        return self._write_events(job_id, append)

    def append_events(self, job_id: str, events: Iterable[tuple[EventKind, str, dict[str, Any]]]) -> int:
        """Add events in order, in one transaction; the sequence number of the last one."""
        now = time.time()
        events = list(events)  # iterated inside the writer's thread: not a generator of the caller's state

        def append(db: Conn) -> int:
            fetch_row(db, job_id, lock=True)
            seq = 0
            for kind, message, data in events:
                seq = insert_event(db, job_id, EventKind(kind), message, data or {}, now).seq
            return seq

        return self._write_events(job_id, append)

    def events_after(self, job_id: str, after_seq: int = 0, limit: int = 1000) -> list[JobEvent]:
        """The job's events with seq > after_seq, in order (NotFound for an unknown job)."""
        with self.db.read() as db:
            fetch_row(db, job_id)
            rows = db.all(
                "SELECT * FROM events WHERE job_id = :id AND seq > :after ORDER BY seq LIMIT :n",
                {"id": job_id, "after": after_seq, "n": limit},
            )
        return [event_from_row(r) for r in rows]

    def state_at(self, job_id: str, seq: int) -> JobState:
        """The job's state right after event `seq` (the last STATE event up to it)."""
        with self.db.read() as db:
            row = db.one(
                "SELECT data FROM events WHERE job_id = :id AND seq <= :seq AND kind = :kind"
                " ORDER BY seq DESC LIMIT 1",
                {"id": job_id, "seq": seq, "kind": EventKind.STATE.value},
            )
        return JobState(json.loads(row["data"])["state"]) if row else JobState.QUEUED

    def check_writable(self) -> None:
        """Raise unless a write really reaches the database now (health)."""
        self.db.run_write(
            lambda db: db.run(
                "INSERT INTO write_probe (id, at) VALUES (1, :at)"
                " ON CONFLICT (id) DO UPDATE SET at = excluded.at",
                {"at": time.time()},
            )
        )

    def close(self) -> None:
        """Close every connection this instance opened (any thread's)."""
        self.db.close()

    def _write_events(self, job_id: str, work: Callable[[Conn], T]) -> T:
        """A write that adds events to `job_id`: its watchers are told once it has committed (not on
        failure: nothing new to see)."""
        result = self.db.run_write(work)
        self.bell.ring(job_id)
        return result


def new_job_id() -> str:
    return f"job-{secrets.token_hex(6)}"


def _check_key(key: str | None) -> str | None:
    if not key:
        return None
    if len(key) > MAX_IDEMPOTENCY_KEY or not key.isprintable():
        raise InvalidArgument(
            f"idempotency_key {key[:40]!r}... is not allowed: use up to {MAX_IDEMPOTENCY_KEY} printable "
            "characters (a UUID works well)"
        )
    return key
