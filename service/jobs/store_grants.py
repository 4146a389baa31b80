"""Report grants in the job store (table report_grants): any replica takes any worker's report.

With several replicas on one PostgreSQL, a worker's calls reach whichever replica the reporting Service
picks, not necessarily the one that launched it. So the grant lives in the database: the SHA-256 of the
launch token (the token itself is only in the worker's environment), the replica watching the worker
(the one that launched it, or adopted it: service.jobs.store_takeover), when the worker last called,
whether it has, the next event number it owes, the stop reason, and the one a heartbeat reply told the
worker (what an adopter needs to know: the worker stops). Any replica authorizes a call
against it; the watching replica's scheduler reads silence and first call from it; its request_stop
reaches the worker through whichever replica answers the next heartbeat.

Times are wall clock (time.time()), as the leases' are: replicas' clocks are assumed in step (NTP) to
well within a lease. A call is accepted only while the job is leased to the grant's replica, or was
until its lease ran out and no other replica has taken the job over yet: once one re-queues it, the
worker is refused (UNAUTHENTICATED) and stops at its next safe point, before the job's relaunch gets
far; once one adopts it (a TrainJob), the grant moves with the lease and the worker trains on.

Writes stay few: a call writes its heartbeat at most every `touch_s` per job and replica (the first
call at once); an event batch is one write that numbers and stores the events under the grant's lock;
the first heartbeat reply with a stop reason writes that it told it (a drain is told only once that is
written).
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from service.errors import Unauthenticated, Unavailable
from service.jobs.grants import EventIn, fresh_events, new_token, other_job, unknown_token
from service.jobs.store import JobStore
from service.jobs.store_db import Conn, Row
from service.jobs.store_rows import fetch_row, insert_event, placeholders
from service.stop_reasons import DRAINING

_GRANT = (
    "SELECT g.job_id, g.replica, g.called, g.stop_reason, g.stop_heard, j.lease_owner, j.lease_expires"
    " FROM report_grants g JOIN jobs j ON j.id = g.job_id WHERE g.token_sha256 = :h"
)


MAX_SEEN = 1024  # workers' calls remembered before the stale ones are dropped
# a worker checked this lately is still answered while the database is away (its grant may have been
# revoked meanwhile: for so long at most it is not told)
RECALL_S = 600.0


@dataclass(frozen=True)
class _Seen:
    job_id: str
    stop_reason: str | None
    checked_at: float  # time.monotonic() of its last call checked against the database
    touched_at: float | None  # ... whose time this replica wrote; None: write it at the next call


@dataclass(frozen=True)
class _Checked:
    """A worker's call checked against its grant."""

    stop_reason: str | None
    told: bool  # a heartbeat reply told the worker this stop reason already (recorded: stop_heard)
    recalled: bool  # the database is away: answered from this replica's memory of the worker's calls


def _unrecorded(reason: str) -> str | None:
    """What a heartbeat reply tells of stop `reason` when the database cannot record that it told it.
    A drain waits for the record: an adopter lets a worker that has not heard its last replica's drain
    train on, and stops one that has (service.jobs.store_takeover), so it must know which; the worker
    hears the drain at a later heartbeat. A cancel is told all the same: it is in the job's row, so any
    replica that watches the worker stops it anyway."""
    return None if reason == DRAINING else reason


def token_hash(token: str) -> str:
    # looked up by equality in SQL: timing tells nothing useful about a hash of 256 random bits
    return hashlib.sha256(token.encode()).hexdigest()


class SharedGrants:
    """Grants in the job store, shared by the replicas on it; `replica` is this one's lease name."""

    def __init__(self, store: JobStore, replica: str, touch_s: float = 5.0) -> None:
        self.store = store
        self.replica = replica
        self.touch_s = touch_s
        self._issued: dict[str, str] = {}  # job id -> the token hash this replica issued for it
        self._seen: dict[str, _Seen] = {}  # token hash -> this replica's last call of that worker
        self._failed_at: float | None = None  # time.monotonic() of the last read or write that failed
        self._looked_at: float | None = None  # ... of the scheduler's last silence reading
        self._lock = threading.Lock()

    def forget_predecessor(self, keep: Collection[str] = ()) -> int:
        """Delete the grants an earlier process under this replica's name issued (it died or restarted),
        but those of the jobs in `keep`; how many. Their workers are refused from now on and stop at a
        safe point, as they were when grants lived in memory: this process knows none of their tokens,
        and its scheduler stops them. The kept ones are the TrainJobs it adopts again: they train on."""
        names, values = placeholders("k", list(keep))
        spared = f" AND job_id NOT IN ({names})" if keep else ""
        return self.store.db.run_write(
            lambda db: db.run(
                f"DELETE FROM report_grants WHERE replica = :r{spared}", {"r": self.replica} | values
            )
        )

    # ------------------------------------------------------------------ the launching replica's side

    def issue(self, job_id: str) -> str:
        token = new_token()
        digest = token_hash(token)
        values = {"j": job_id, "h": digest, "r": self.replica, "now": time.time()}
        self.store.db.run_write(
            lambda db: db.run(
                "INSERT INTO report_grants (job_id, token_sha256, replica, last_seen, called, next_event,"
                " stop_reason) VALUES (:j, :h, :r, :now, 0, 0, NULL) ON CONFLICT (job_id) DO UPDATE SET"
                " token_sha256 = excluded.token_sha256, replica = excluded.replica,"
                " last_seen = excluded.last_seen, called = 0, next_event = 0, stop_reason = NULL,"
                " stop_heard = NULL",
                values,
            )
        )
        with self._lock:
            self._issued[job_id] = digest
        return token

    def revoke(self, job_id: str) -> None:
        digest = self._digest(job_id)
        with self._lock:
            self._issued.pop(job_id, None)
            if digest is not None:
                self._seen.pop(digest, None)
        if digest is not None:  # only the grant issued here: another replica may have relaunched the job
            # ... or adopted its worker, which then has the same token but is that replica's to revoke
            self.store.db.run_write(
                lambda db: db.run(
                    "DELETE FROM report_grants WHERE token_sha256 = :h AND replica = :r",
                    {"h": digest, "r": self.replica},
                )
            )

    def request_stop(self, job_id: str, reason: str) -> None:
        digest = self._digest(job_id)
        if digest is not None:
            self.store.db.run_write(
                lambda db: db.run(
                    "UPDATE report_grants SET stop_reason = :why WHERE token_sha256 = :h"
                    " AND stop_reason IS NULL",
                    {"why": reason, "h": digest},
                )
            )

    def silent_for(self, job_id: str) -> float:
        row = self._own_row(job_id)
        if row is None:
            return 0.0
        silent = max(0.0, time.time() - float(row["last_seen"]))
        now = time.monotonic()
        with self._lock:
            # the scheduler asks every tick: a gap means this replica could not read (the database was
            # away, or it stalled), and heartbeats may not have been written meanwhile either
            if self._looked_at is not None and now - self._looked_at > self.touch_s:
                self._failed_at = now
            self._looked_at = now
            failed_at = self._failed_at
        # silence that the database could not have recorded counts from its return, not before
        return silent if failed_at is None else min(silent, now - failed_at)

    def has_called(self, job_id: str) -> bool:
        row = self._own_row(job_id)
        return row is not None and bool(row["called"])

    # ------------------------------------------------------------------ any replica: the worker's calls

    def check(self, token: str, job_id: str) -> str | None:
        return self._check(token, job_id).stop_reason

    def heartbeat(self, token: str, job_id: str) -> str | None:
        checked = self._check(token, job_id)
        reason = checked.stop_reason
        if reason is None or checked.told:
            return reason
        if checked.recalled:  # the database is away: that the worker is told cannot be recorded now
            return _unrecorded(reason)
        digest = token_hash(token)

        def tell(db: Conn) -> str | None:
            # Recorded before the reply, under the grant's row lock: an adoption (store_takeover) either
            # came first and cleared the drain (then the worker is not told), or sees that the worker
            # was told, and re-queues the job when it has stopped.
            db.run(
                "UPDATE report_grants SET stop_heard = stop_reason WHERE token_sha256 = :h"
                " AND stop_reason IS NOT NULL",
                {"h": digest},
            )
            row = db.one("SELECT stop_reason FROM report_grants WHERE token_sha256 = :h", {"h": digest})
            return None if row is None or row["stop_reason"] is None else str(row["stop_reason"])

        try:
            return self.store.db.run_write(tell)
        except Unavailable:
            self._db_failed()
            return _unrecorded(reason)

    def deliver(self, token: str, job_id: str, first: int, events: Sequence[EventIn]) -> int:
        self.check(token, job_id)
        digest, now = token_hash(token), time.time()

        def number_and_store(db: Conn) -> tuple[int, bool]:
            # the grant's row lock orders two replicas' batches of one worker (a retry racing its original)
            row = db.one(
                f"SELECT next_event FROM report_grants WHERE token_sha256 = :h{db.lock_rows}", {"h": digest}
            )
            if row is None:  # revoked since the check: the worker has been replaced or has exited
                raise unknown_token()
            expected = int(row["next_event"])
            fresh = fresh_events(job_id, first, expected, events)
            if fresh:
                fetch_row(db, job_id, lock=True)  # the job's event numbers, as store.append_events
                for kind, message, data in fresh:
                    insert_event(db, job_id, kind, message, data or {}, now)
                db.run(
                    "UPDATE report_grants SET next_event = :n WHERE token_sha256 = :h",
                    {"n": expected + len(fresh), "h": digest},
                )
            return expected + len(fresh), bool(fresh)

        next_event, stored = self.store.db.run_write(number_and_store)
        if stored:
            self.store.bell.ring(job_id)  # after the commit, as the store's own event writes
        return next_event

    # ------------------------------------------------------------------ helpers

    def _check(self, token: str, job_id: str) -> _Checked:
        digest = token_hash(token)
        try:
            with self.store.db.read() as db:
                row = db.one(_GRANT, {"h": digest})
        except Unavailable:
            self._db_failed()
            return _Checked(self._recalled(digest, job_id), told=False, recalled=True)
        self._authorize(row, job_id)
        assert row is not None  # _authorize refused it otherwise
        reason = None if row["stop_reason"] is None else str(row["stop_reason"])
        self._touch(digest, job_id, reason, first=not row["called"])
        told = row["stop_heard"] is not None and row["stop_heard"] == reason
        return _Checked(reason, told=told, recalled=False)

    def _authorize(self, row: Row | None, job_id: str) -> None:
        if row is None:
            raise unknown_token()
        if row["job_id"] != job_id:
            raise other_job(job_id)
        # An expired lease still held by the grant's replica is accepted: between its expiry and another
        # replica's next look (a third of a lease), the job's worker may be about to be adopted, and a
        # refusal would stop it. A re-queue clears the owner, and an adoption moves the grant.
        if row["lease_owner"] != row["replica"] or row["lease_expires"] is None:
            raise Unauthenticated(
                f"the replica that watched this worker ({row['replica']}) no longer holds job {job_id} "
                "(its lease ran out and the job was re-queued to run again); this worker must stop"
            )

    def _touch(self, digest: str, job_id: str, reason: str | None, *, first: bool) -> None:
        """Remember the call, and write its time (and that the worker has called) unless this replica did
        lately. A database that is away loses the write, not the call: the next call writes it."""
        now = time.monotonic()
        with self._lock:
            seen = self._seen.get(digest)
            due = first or seen is None or seen.touched_at is None or now - seen.touched_at >= self.touch_s
            if len(self._seen) >= MAX_SEEN:  # mostly other replicas' launches, revoked over there
                self._seen = {h: s for h, s in self._seen.items() if now - s.checked_at < self.touch_s}
            touched_at = now if due else (seen.touched_at if seen is not None else None)
            self._seen[digest] = _Seen(job_id, reason, now, touched_at)
        if not due:
            return
        try:
            self.store.db.run_write(
                lambda db: db.run(
                    "UPDATE report_grants SET last_seen = :now, called = 1 WHERE token_sha256 = :h",
                    {"now": time.time(), "h": digest},
                )
            )
        except Unavailable:
            self._db_failed()
            with self._lock:
                self._seen[digest] = _Seen(job_id, reason, now, None)

    def _recalled(self, digest: str, job_id: str) -> str | None:
        """The database is away: a worker checked here lately is answered as then (its heartbeat keeps it
        training, as with grants in memory); any other call gets Unavailable and retries."""
        with self._lock:
            seen = self._seen.get(digest)
            if seen is not None:
                self._seen[digest] = _Seen(seen.job_id, seen.stop_reason, seen.checked_at, None)
        if seen is None or time.monotonic() - seen.checked_at > RECALL_S:
            raise Unavailable(
                "the job store cannot be read right now, so this reporting token cannot be checked; retry"
            )
        if seen.job_id != job_id:
            raise other_job(job_id)
        return seen.stop_reason

    def _db_failed(self) -> None:
        with self._lock:
            self._failed_at = time.monotonic()

    def _digest(self, job_id: str) -> str | None:
        with self._lock:
            digest = self._issued.get(job_id)
        if digest is not None:
            return digest
        # not issued here: adopted from a dead replica (its grant moved here with the lease), or none
        try:
            with self.store.db.read() as db:
                row = db.one(
                    "SELECT token_sha256 FROM report_grants WHERE job_id = :j AND replica = :r",
                    {"j": job_id, "r": self.replica},
                )
        except Unavailable:
            self._db_failed()
            raise
        if row is None:
            return None
        with self._lock:
            return self._issued.setdefault(job_id, str(row["token_sha256"]))

    def _own_row(self, job_id: str) -> Row | None:
        digest = self._digest(job_id)
        if digest is None:
            return None
        try:
            with self.store.db.read() as db:
                return db.one(
                    "SELECT last_seen, called FROM report_grants WHERE token_sha256 = :h", {"h": digest}
                )
        except Unavailable:
            self._db_failed()
            raise
