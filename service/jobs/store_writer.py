"""One writer per process: every write of the job store runs on one thread and one connection, in batches.

Why: SQLite lets one transaction write at a time. With each gRPC thread writing itself, 64 clients queued
on SQLite's busy handler, which sleeps in growing steps whoever holds the lock, and CreateJob's p99 rose
to seconds. Here a caller hands its write (a function of a Conn) to the writer and waits for its answer.
The writer takes everything queued (up to MAX_BATCH), runs each write in a SAVEPOINT of its own, so one
that raises is rolled back alone and its caller gets that very error, then commits them all at once
(group commit). A caller is answered only after the commit, so what it rings or reads afterwards is
durable. A failure of the storage itself (the disk, the lock, the connection) loses the whole batch:
every caller in it gets Unavailable (nothing was changed, retry), and the connection is replaced.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

from service.errors import Unavailable

log = logging.getLogger(__name__)

MAX_BATCH = 32  # writes per commit: enough to drain a burst of clients, short enough to hold the lock briefly

T = TypeVar("T")
C = TypeVar("C")  # what a write is given to run its SQL on (the store's Conn)
C_co = TypeVar("C_co", covariant=True)


class Session(Protocol[C_co]):
    """The writer's one connection, and the transaction commands it needs."""

    @property
    def conn(self) -> C_co: ...

    def begin(self) -> None: ...

    def savepoint(self) -> None: ...

    def rollback_to_savepoint(self) -> None:
        """Undo what was done since savepoint() and end the savepoint."""
        ...

    def release_savepoint(self) -> None: ...

    def commit(self) -> None: ...

    def close(self) -> None:
        """Roll back what is open and close the connection (best effort: it may be broken)."""
        ...


@dataclass(frozen=True)
class Backend(Generic[C]):
    """What a Database tells its writer."""

    open_session: Callable[[], Session[C]]
    # the storage, not the SQL (disk, lock, connection): the Unavailable to give every caller, else None
    storage_failure: Callable[[BaseException], Unavailable | None]
    # lost to another process's locks (a PostgreSQL deadlock between two replicas' batches): run it again
    # alone, where it takes its locks in its own order as it did before batching
    conflict: Callable[[BaseException], bool] = lambda exc: False


@dataclass
class _Write(Generic[C]):
    work: Callable[[C], Any]
    future: Future[Any] = field(default_factory=Future)


class Writer(Generic[C]):
    """Runs writes on its own thread, in batches; `run` blocks until the write committed or failed."""

    def __init__(self, backend: Backend[C], name: str = "store-writer") -> None:
        self._backend = backend
        self._name = name
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue[_Write[C] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()
        self._session: Session[C] | None = None

    def run(self, work: Callable[[C], T]) -> T:
        """`work(conn)` inside a write transaction, committed before this returns; its error, unchanged,
        if it raised (its changes rolled back, no one else's)."""
        if threading.current_thread() is self._thread and self._session is not None:
            return work(self._session.conn)  # a write made from inside a write: already in the transaction
        write: _Write[C] = _Write(work)
        self._queue_up(write)
        return write.future.result()  # type: ignore[no-any-return]

    def backlog(self) -> int:
        """Writes queued and not yet taken by the writer (tests wait on it to fill one batch)."""
        return self._queue.qsize()

    def close(self) -> None:
        """Finish what is queued, then stop the thread and close its connection (a later run restarts it)."""
        with self._lock:
            thread, self._thread = self._thread, None
            if thread is None or self._pid != os.getpid():
                return
            self._queue.put(None)
            # a write arriving now starts a new thread on a queue of its own, which cannot take the stop
            # meant for this one
            self._queue = queue.SimpleQueue()
        thread.join()

    def _queue_up(self, write: _Write[C]) -> None:
        with self._lock:
            if self._pid != os.getpid():
                # a forked child: the parent's thread did not come along, and its connection is not ours
                self._queue, self._thread, self._session = queue.SimpleQueue(), None, None
                self._pid = os.getpid()
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, args=(self._queue,), name=self._name)
                self._thread.daemon = True  # a process may exit without closing its store
                self._thread.start()
            self._queue.put(write)

    def _serve(self, inbox: queue.SimpleQueue[_Write[C] | None]) -> None:
        stopping = False
        while not stopping:
            first = inbox.get()
            if first is None:
                break
            batch = [first]
            while len(batch) < MAX_BATCH:
                try:
                    more = inbox.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stopping = True
                    break
                batch.append(more)
            for again in self._commit(batch):
                self._commit([again])
        self._drop_session()

    def _commit(self, batch: list[_Write[C]]) -> list[_Write[C]]:
        """Run `batch` in one transaction and answer each caller; the writes to run again alone."""
        done: list[tuple[_Write[C], bool, Any]] = []
        again: list[_Write[C]] = []
        try:
            session = self._session or self._backend.open_session()
            self._session = session
            session.begin()
            for write in batch:
                session.savepoint()
                try:
                    value = write.work(session.conn)
                except Exception as exc:
                    if len(batch) > 1 and self._backend.conflict(exc):
                        session.rollback_to_savepoint()
                        log.info("a write lost to another transaction's locks (%s); it runs again alone", exc)
                        again.append(write)
                        continue
                    if self._backend.storage_failure(exc) is not None:
                        raise  # the transaction itself is lost, not just this write
                    session.rollback_to_savepoint()
                    done.append((write, False, exc))
                    continue
                session.release_savepoint()
                done.append((write, True, value))
            session.commit()
        except Exception as exc:
            self._drop_session()
            if self._backend.storage_failure(exc) is None:
                log.exception("the job store's writer failed a batch of %d writes", len(batch))
            for write in batch:
                # an exception of its own for each caller: each thread raising it adds to its traceback
                write.future.set_exception(self._backend.storage_failure(exc) or exc)
            return []
        for write, ok, value in done:
            if ok:
                write.future.set_result(value)
            else:
                write.future.set_exception(value)
        return again

    def _drop_session(self) -> None:
        # a connection whose transaction failed may be unusable (SQLite opened it read-only, PostgreSQL
        # dropped it): the next batch opens a new one
        session, self._session = self._session, None
        if session is not None:
            try:
                session.close()
            except Exception:  # already broken: nothing more to release
                log.debug("closing the writer's connection failed", exc_info=True)
