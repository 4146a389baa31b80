"""The durable job store: jobs and their ordered events in one SQLite file (WAL), safe across processes.

The gRPC server, the scheduler and every worker process open the same file. Each thread of each process
gets its own connection; every write is one `BEGIN IMMEDIATE` transaction, so a state change and the
STATE event that records it land together or not at all, and event numbers are assigned without gaps.

Idempotency: CreateJob with a key already used returns that job when the spec is the same, and raises
AlreadyExists (naming the existing job) when the spec differs: a key names one request, never two.
"""

from __future__ import annotations

import json
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from service.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from service.jobs.store_codec import (
    RESULT_FIELDS,
    decode_page_token,
    encode_page_token,
    event_from_row,
    job_from_row,
    jsonable,
    result_from_json,
)
from service.records import EventKind, Job, JobEvent, JobResult, JobState
from service.spec import JobSpec

SCHEMA_VERSION = 1
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500
MAX_IDEMPOTENCY_KEY = 128
BUSY_TIMEOUT_MS = 30_000

ALLOWED_TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.QUEUED: frozenset({JobState.RUNNING, JobState.FAILED, JobState.CANCELLED}),
    JobState.RUNNING: frozenset({JobState.PACKAGING, JobState.QUEUED, JobState.FAILED, JobState.CANCELLED}),
    JobState.PACKAGING: frozenset({JobState.SUCCEEDED, JobState.QUEUED, JobState.FAILED, JobState.CANCELLED}),
    JobState.SUCCEEDED: frozenset(),
    JobState.FAILED: frozenset(),
    JobState.CANCELLED: frozenset(),
}
ACTIVE_STATES = (JobState.RUNNING, JobState.PACKAGING)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    num INTEGER PRIMARY KEY AUTOINCREMENT,   -- creation order: newest first, FIFO scheduling, page tokens
    id TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL,
    state TEXT NOT NULL,
    spec TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    error TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    idempotency_key TEXT UNIQUE,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    result TEXT NOT NULL DEFAULT '{}',
    worker_pid INTEGER
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state, num);
CREATE TABLE IF NOT EXISTS events (
    job_id TEXT NOT NULL REFERENCES jobs (id),
    seq INTEGER NOT NULL,
    time REAL NOT NULL,
    kind TEXT NOT NULL,
    message TEXT NOT NULL,
    data TEXT NOT NULL DEFAULT '{}',
    PRIMARY KEY (job_id, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS write_probe (   -- one row, rewritten by check_writable (health)
    id INTEGER PRIMARY KEY CHECK (id = 1),
    at REAL NOT NULL
);
"""


class JobStore:
    """Jobs and events in SQLite at `path`. One instance per process; thread-safe."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        db = self._connection()
        db.executescript(_SCHEMA)  # idempotent; runs its own statements (no surrounding transaction)
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    # ------------------------------------------------------------------ jobs

    def create_job(
        self,
        spec: JobSpec,
        idempotency_key: str | None = None,
        *,
        max_queued: int | None = None,
        notes: Iterable[tuple[EventKind, str, dict[str, Any]]] = (),
    ) -> Job:
        """Queue a job with its first STATE event and `notes` (more events); the same key and spec return
        the existing job, untouched."""
        key = _check_key(idempotency_key)
        spec_json = json.dumps(spec.to_dict(), sort_keys=True)
        now = time.time()
        with self._write() as db:
            if key is not None:
                row = db.execute("SELECT * FROM jobs WHERE idempotency_key = ?", (key,)).fetchone()
                if row is not None:
                    if row["spec"] != spec_json:
                        raise AlreadyExists(
                            f"idempotency_key {key!r} was already used for job {row['id']} with a different "
                            "spec; send the same spec to get that job back, or use a new key"
                        )
                    return job_from_row(row)
            if max_queued is not None:
                queued = db.execute("SELECT COUNT(*) FROM jobs WHERE state = ?", (JobState.QUEUED,))
                if queued.fetchone()[0] >= max_queued:
                    raise ResourceExhausted(
                        f"{max_queued} jobs are already queued (TUNESERVE_MAX_QUEUED_JOBS); wait for some to "
                        "start or cancel queued ones, then retry"
                    )
            job_id = new_job_id()
            db.execute(
                "INSERT INTO jobs (id, name, state, spec, created_at, updated_at, idempotency_key)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (job_id, spec.name, JobState.QUEUED, spec_json, now, now, key),
            )
            _insert_event(db, job_id, EventKind.STATE, "job queued", {"state": JobState.QUEUED}, now)
            for kind, message, data in notes:
                _insert_event(db, job_id, kind, message, data, now)
            return job_from_row(_fetch_row(db, job_id))

    def get_job(self, job_id: str) -> Job:
        return job_from_row(_fetch_row(self._read(), job_id))

    def job_for_key(self, idempotency_key: str) -> Job | None:
        """The job created with this idempotency key, if any."""
        row = (
            self._read()
            .execute("SELECT * FROM jobs WHERE idempotency_key = ?", (idempotency_key,))
            .fetchone()
        )
        return None if row is None else job_from_row(row)

    def list_jobs(
        self, states: Iterable[JobState] = (), page_size: int = 0, page_token: str = ""
    ) -> tuple[list[Job], str]:
        """A page of jobs, newest first, and the token of the next page ("" at the end)."""
        if page_size < 0:
            raise InvalidArgument(f"page_size {page_size} is negative; use 1..{MAX_PAGE_SIZE}, or 0 for 50")
        size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        wanted = sorted({JobState(s) for s in states})
        where = ["num < ?"]
        args: list[Any] = [decode_page_token(page_token) if page_token else 2**62]
        if wanted:
            where.append(f"state IN ({', '.join('?' * len(wanted))})")
            args += wanted
        rows = self._read().execute(
            f"SELECT * FROM jobs WHERE {' AND '.join(where)} ORDER BY num DESC LIMIT ?", (*args, size + 1)
        )
        page = rows.fetchall()
        token = encode_page_token(page[size - 1]["num"]) if len(page) > size else ""
        return [job_from_row(r) for r in page[:size]], token

    def next_queued(self, exclude: Sequence[str] = ()) -> Job | None:
        """The oldest QUEUED job (FIFO by creation) not in `exclude`."""
        rows = self._read().execute(
            "SELECT * FROM jobs WHERE state = ? ORDER BY num LIMIT ?", (JobState.QUEUED, len(exclude) + 1)
        )
        return next((job_from_row(r) for r in rows if r["id"] not in exclude), None)

    def jobs_in(self, states: Iterable[JobState]) -> list[Job]:
        """Every job in one of `states`, oldest first."""
        wanted = sorted({JobState(s) for s in states})
        rows = self._read().execute(
            f"SELECT * FROM jobs WHERE state IN ({', '.join('?' * len(wanted))}) ORDER BY num", wanted
        )
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
        A FAILED job's `reason` becomes its error.
        """
        now = time.time()
        with self._write() as db:
            row = _fetch_row(db, job_id)
            current = JobState(row["state"])
            came_from_expected = expect is None or current in frozenset(expect)
            if to_state not in ALLOWED_TRANSITIONS[current] or not came_from_expected:
                raise FailedPrecondition(_transition_refusal(job_id, current, to_state))
            sets = {"state": to_state, "updated_at": now}
            if to_state == JobState.RUNNING:
                sets["attempts"] = row["attempts"] + 1
                sets["started_at"] = row["started_at"] or now
            if to_state == JobState.QUEUED:
                sets["worker_pid"] = None
                if refund_attempt:
                    sets["attempts"] = max(0, row["attempts"] - 1)
            if to_state.is_final:
                sets["finished_at"] = now
                sets["worker_pid"] = None
            if to_state == JobState.FAILED:
                sets["error"] = reason or "failed"
            _update(db, job_id, sets)
            data = {"state": to_state, "previous": current, "reason": reason}
            message = f"{current} -> {to_state}" + (f": {reason}" if reason else "")
            _insert_event(db, job_id, EventKind.STATE, message, data, now)
            return job_from_row(_fetch_row(db, job_id))

    def request_cancel(self, job_id: str) -> Job:
        """Mark a job for cancellation; a QUEUED job is CANCELLED at once, a running one by the scheduler."""
        now = time.time()
        with self._write() as db:
            row = _fetch_row(db, job_id)
            state = JobState(row["state"])
            if state.is_final:
                raise FailedPrecondition(
                    f"job {job_id} is already {state} and cannot be cancelled; only QUEUED, RUNNING or "
                    "PACKAGING jobs can be"
                )
            _update(db, job_id, {"cancel_requested": 1, "updated_at": now})
            if state == JobState.QUEUED:
                _update(db, job_id, {"state": JobState.CANCELLED, "finished_at": now})
                data = {"state": JobState.CANCELLED, "previous": state, "reason": "cancelled by request"}
                _insert_event(
                    db, job_id, EventKind.STATE, "QUEUED -> CANCELLED: cancelled by request", data, now
                )
            elif not row["cancel_requested"]:
                _insert_event(db, job_id, EventKind.INFO, "cancel requested; stopping the worker", {}, now)
            return job_from_row(_fetch_row(db, job_id))

    def requeue_interrupted(self, reason: str = "the service restarted") -> list[Job]:
        """On start-up: RUNNING/PACKAGING jobs go back to QUEUED (or CANCELLED if that was asked)."""
        requeued = []
        for job in self.jobs_in(ACTIVE_STATES):
            if job.cancel_requested:
                self.transition(job.id, JobState.CANCELLED, f"cancelled by request ({reason})")
                continue
            self.transition(job.id, JobState.QUEUED, reason, refund_attempt=True)
            self.append_event(job.id, EventKind.INFO, f"{reason}; the job resumes from its last checkpoint")
            requeued.append(self.get_job(job.id))
        return requeued

    def set_worker_ref(self, job_id: str, ref: str | None) -> None:
        """What names the job's worker to its launcher (a local launcher's process group id)."""
        with self._write() as db:
            _fetch_row(db, job_id)
            # the column is still called worker_pid (no migration): SQLite keeps a pid as an integer and
            # any other launcher's name as text
            _update(db, job_id, {"worker_pid": ref})

    def worker_ref(self, job_id: str) -> str | None:
        row = _fetch_row(self._read(), job_id)
        return None if row["worker_pid"] is None else str(row["worker_pid"])

    def worker_pid(self, job_id: str) -> int | None:
        """The worker's process id when a local launcher started it (tests and benchmarks look it up)."""
        ref = self.worker_ref(job_id)
        return int(ref) if ref is not None and ref.isdigit() else None

    # ------------------------------------------------------------------ results and events

    def update_result(self, job_id: str, **fields: Any) -> JobResult:
        """Merge `fields` into the job's result (names of JobResult fields only)."""
        unknown = sorted(set(fields) - RESULT_FIELDS)
        if unknown:
            raise ValueError(f"unknown JobResult field(s) {unknown}; known: {sorted(RESULT_FIELDS)}")
        with self._write() as db:
            row = _fetch_row(db, job_id)
            merged = {**json.loads(row["result"]), **jsonable(fields)}
            _update(db, job_id, {"result": json.dumps(merged), "updated_at": time.time()})
            return result_from_json(merged)

    def append_event(
        self, job_id: str, kind: EventKind, message: str, data: dict[str, Any] | None = None
    ) -> JobEvent:
        """Add an event with the job's next sequence number."""
        with self._write() as db:
            _fetch_row(db, job_id)
            return _insert_event(db, job_id, EventKind(kind), message, data or {}, time.time())

    def append_events(self, job_id: str, events: Iterable[tuple[EventKind, str, dict[str, Any]]]) -> int:
        """Add events in order, in one transaction; the sequence number of the last one."""
        now = time.time()
        with self._write() as db:
            _fetch_row(db, job_id)
            seq = 0
            for kind, message, data in events:
                seq = _insert_event(db, job_id, EventKind(kind), message, data or {}, now).seq
            return seq

    def events_after(self, job_id: str, after_seq: int = 0, limit: int = 1000) -> list[JobEvent]:
        """The job's events with seq > after_seq, in order (NotFound for an unknown job)."""
        db = self._read()
        _fetch_row(db, job_id)
        rows = db.execute(
            "SELECT * FROM events WHERE job_id = ? AND seq > ? ORDER BY seq LIMIT ?",
            (job_id, after_seq, limit),
        )
        return [event_from_row(r) for r in rows]

    def state_at(self, job_id: str, seq: int) -> JobState:
        """The job's state right after event `seq` (the last STATE event up to it)."""
        row = (
            self._read()
            .execute(
                "SELECT data FROM events WHERE job_id = ? AND seq <= ? AND kind = ?"
                " ORDER BY seq DESC LIMIT 1",
                (job_id, seq, EventKind.STATE),
            )
            .fetchone()
        )
        return JobState(json.loads(row["data"])["state"]) if row else JobState.QUEUED

    def check_writable(self) -> None:
        """Raise (sqlite3.Error) unless a write really reaches the database files now (health)."""
        with self._write() as db:
            db.execute(
                "INSERT INTO write_probe (id, at) VALUES (1, ?)"
                " ON CONFLICT (id) DO UPDATE SET at = excluded.at",
                (time.time(),),
            )

    # ------------------------------------------------------------------ connections

    def close(self) -> None:
        """Close every connection this instance opened (any thread's)."""
        with self._lock:
            for conn in self._connections:
                conn.close()
            self._connections.clear()
        self._local = threading.local()

    def _connection(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is not None and self._local.pid == os.getpid():
            return conn
        # autocommit mode: transactions are opened explicitly (BEGIN IMMEDIATE) by _write
        conn = sqlite3.connect(
            self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None, check_same_thread=False
        )
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        conn.execute("PRAGMA synchronous = NORMAL")  # durable across process crashes; WAL keeps it consistent
        conn.execute("PRAGMA foreign_keys = ON")
        self._local.conn, self._local.pid = conn, os.getpid()
        with self._lock:
            self._connections.append(conn)
        return conn

    def _read(self) -> sqlite3.Connection:
        return self._connection()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        # IMMEDIATE takes the write lock up front, so two writers never deadlock upgrading a read lock
        db = self._connection()
        try:
            db.execute("BEGIN IMMEDIATE")
            yield db
            db.execute("COMMIT")
        except BaseException as exc:
            # a failed COMMIT (read-only or full disk, busy) may leave the transaction open; closing it
            # here is what lets this connection write again once the disk is writable
            if db.in_transaction:
                with suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
            if isinstance(exc, sqlite3.OperationalError) and _is_storage_error(exc):
                self._forget(db)
                # the disk, not the caller: a read-only or failing volume, or a lock held too long. The
                # transaction was rolled back, so a client may retry (UNAVAILABLE), not give up (INTERNAL)
                raise Unavailable(
                    f"the job store cannot be written right now ({exc}); nothing was changed, retry later"
                ) from exc
            raise

    def _forget(self, conn: sqlite3.Connection) -> None:
        # SQLite opens a file it may not write read-only, and that connection stays read-only after the
        # disk is writable again: a connection whose write failed is replaced at this thread's next call
        with self._lock:
            if conn in self._connections:
                self._connections.remove(conn)
        with suppress(sqlite3.Error):
            conn.close()
        if getattr(self._local, "conn", None) is conn:
            del self._local.conn


# The disk or the lock, not our SQL: read-only, I/O error, full, cannot open, busy or locked. Anything else
# (a bad statement) is a bug and stays INTERNAL, rather than a retry the client would repeat for ever.
_STORAGE_ERRORS = frozenset(
    getattr(sqlite3, name)
    for name in (
        "SQLITE_READONLY",
        "SQLITE_IOERR",
        "SQLITE_FULL",
        "SQLITE_CANTOPEN",
        "SQLITE_BUSY",
        "SQLITE_LOCKED",
    )
)


def _is_storage_error(exc: sqlite3.OperationalError) -> bool:
    return (getattr(exc, "sqlite_errorcode", 0) & 0xFF) in _STORAGE_ERRORS


def new_job_id() -> str:
    return f"job-{secrets.token_hex(6)}"


# ---------------------------------------------------------------------- rows <-> records


def _fetch_row(db: sqlite3.Connection, job_id: str) -> sqlite3.Row:
    row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
    if row is None:
        raise NotFound(f"job {job_id!r} does not exist; ListJobs shows the jobs there are")
    return row  # type: ignore[no-any-return]


def _update(db: sqlite3.Connection, job_id: str, sets: dict[str, Any]) -> None:
    columns = ", ".join(f"{name} = ?" for name in sets)
    db.execute(f"UPDATE jobs SET {columns} WHERE id = ?", (*sets.values(), job_id))


def _insert_event(
    db: sqlite3.Connection, job_id: str, kind: EventKind, message: str, data: dict[str, Any], now: float
) -> JobEvent:
    seq = db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM events WHERE job_id = ?", (job_id,)).fetchone()[0]
    payload = jsonable(data)
    db.execute(
        "INSERT INTO events (job_id, seq, time, kind, message, data) VALUES (?, ?, ?, ?, ?, ?)",
        (job_id, seq, now, kind, message, json.dumps(payload)),
    )
    return JobEvent(job_id, int(seq), now, kind, message, payload)


# ---------------------------------------------------------------------- keys, messages


def _check_key(key: str | None) -> str | None:
    if not key:
        return None
    if len(key) > MAX_IDEMPOTENCY_KEY or not key.isprintable():
        raise InvalidArgument(
            f"idempotency_key {key[:40]!r}... is not allowed: use up to {MAX_IDEMPOTENCY_KEY} printable "
            "characters (a UUID works well)"
        )
    return key


def _transition_refusal(job_id: str, current: JobState, to_state: JobState) -> str:
    if current.is_final:
        return f"job {job_id} is already {current} (a final state) and cannot become {to_state}"
    allowed = ", ".join(sorted(ALLOWED_TRANSITIONS[current])) or "none"
    return f"job {job_id} is {current} and cannot become {to_state}; from {current} it can become {allowed}"
