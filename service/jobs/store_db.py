"""The job store's seam to its database: a `Database` gives transactions; SQLite (raw sqlite3) is one.

The store's logic (service.jobs.store) is written once, in SQL both SQLite and PostgreSQL run, with
`:name` parameters (sqlite3's own style, and SQLAlchemy's `text()`). What differs between the two is
here and in service.jobs.store_sqlalchemy: how a write transaction excludes other writers, how a row is
locked, which errors mean "the storage, retry later".

`SqliteDatabase` is raw sqlite3 on one file in WAL: the store's writes go through the process's one
writer (service.jobs.store_writer: its own thread and connection, batched `BEGIN IMMEDIATE` commits),
and reads use a connection per thread, which WAL lets read while the writer writes.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, suppress
from pathlib import Path
from typing import Any, Protocol, TypeVar

from service.errors import Unavailable
from service.jobs.store_writer import Backend, Writer

BUSY_TIMEOUT_MS = 30_000
SCHEMA_HEAD = "0006"  # the newest migration in service/jobs/migrations/versions

Row = Mapping[str, Any]
T = TypeVar("T")


class Conn(Protocol):
    """One connection inside one transaction (a write) or none (a read)."""

    # appended to a SELECT of rows the transaction will change: "" where the transaction already
    # excludes every other writer (SQLite), " FOR UPDATE" where only locked rows are safe (PostgreSQL)
    lock_rows: str
    # appended to a claim's SELECT: skip rows another replica holds instead of waiting for them
    skip_locked: str

    def all(self, sql: str, params: Mapping[str, Any] | None = None) -> Sequence[Row]: ...

    def one(self, sql: str, params: Mapping[str, Any] | None = None) -> Row | None: ...

    def run(self, sql: str, params: Mapping[str, Any] | None = None) -> int:
        """Execute a statement; the number of rows it changed."""
        ...

    def exclusive(self, name: str) -> None:
        """Hold the lock `name` until this transaction ends (no-op where writes are already serial)."""
        ...


class Database(Protocol):
    """Where the store's rows live. Thread-safe; one instance per process."""

    dialect: str  # "sqlite" or "postgresql"
    display_url: str  # the URL or path with any password masked: safe for logs and errors

    def read(self) -> AbstractContextManager[Conn]: ...

    def run_write(self, work: Callable[[Conn], T]) -> T:
        """`work(conn)` in a write transaction on the process's one writer (batched with other threads'
        writes, each rolled back alone when it raises), committed before this returns. A storage
        failure (disk, lock, connection) becomes Unavailable: nothing was changed, the caller may retry."""
        ...

    def write(self) -> AbstractContextManager[Conn]:
        """A transaction of its own on the calling thread, outside the writer (tools and tests): committed
        when the block ends, rolled back when it raises; a storage failure becomes Unavailable."""
        ...

    def close(self) -> None: ...


class SqliteConn:
    lock_rows = ""
    skip_locked = ""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    # a read needs no transaction (each statement sees the latest commit): the connection itself is the
    # context, with nothing to do on the way in or out (no generator per call on the hottest path)
    def __enter__(self) -> SqliteConn:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def all(self, sql: str, params: Mapping[str, Any] | None = None) -> Sequence[Row]:
        return self.db.execute(sql, params or {}).fetchall()

    def one(self, sql: str, params: Mapping[str, Any] | None = None) -> Row | None:
        row: Row | None = self.db.execute(sql, params or {}).fetchone()
        return row

    def run(self, sql: str, params: Mapping[str, Any] | None = None) -> int:
        return self.db.execute(sql, params or {}).rowcount

    def exclusive(self, name: str) -> None:
        pass  # BEGIN IMMEDIATE already excludes every other writer of the file


class SqliteSession:
    """The writer's connection to the file: IMMEDIATE takes the write lock up front, so a writer never
    deadlocks with another process's upgrading a read lock."""

    def __init__(self, path: Path) -> None:
        self.db = connect_sqlite(path)
        self.conn = SqliteConn(self.db)

    def begin(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def savepoint(self) -> None:
        self.db.execute("SAVEPOINT write")

    def rollback_to_savepoint(self) -> None:
        self.db.execute("ROLLBACK TO write")
        self.db.execute("RELEASE write")

    def release_savepoint(self) -> None:
        self.db.execute("RELEASE write")

    def commit(self) -> None:
        self.db.execute("COMMIT")

    def close(self) -> None:
        # a failed COMMIT (read-only or full disk, busy) may leave the transaction open; and SQLite opens
        # a file it may not write read-only, for good: the next batch gets a new connection
        try:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
        finally:
            self.db.close()


class SqliteDatabase:
    """Raw sqlite3 on one file (WAL), safe across threads and processes."""

    dialect = "sqlite"

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.display_url = str(self.path)
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._writer: Writer[Conn] = Writer(Backend(lambda: SqliteSession(self.path), storage_failure))

    def read(self) -> AbstractContextManager[Conn]:
        reader: SqliteConn | None = getattr(self._local, "reader", None)
        if reader is None or reader.db is not self._connection():
            reader = self._local.reader = SqliteConn(self._connection())
        return reader

    def run_write(self, work: Callable[[Conn], T]) -> T:
        return self._writer.run(work)

    @contextmanager
    def write(self) -> Iterator[Conn]:
        # IMMEDIATE takes the write lock up front, so two writers never deadlock upgrading a read lock
        db = self._connection()
        try:
            db.execute("BEGIN IMMEDIATE")
            yield SqliteConn(db)
            db.execute("COMMIT")
        except BaseException as exc:
            # a failed COMMIT (read-only or full disk, busy) may leave the transaction open; closing it
            # here is what lets this connection write again once the disk is writable
            if db.in_transaction:
                with suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
            failure = storage_failure(exc)
            if failure is not None:
                self._forget(db)
                raise failure from exc
            raise

    def close(self) -> None:
        """Close every connection this instance opened (any thread's), the writer's too."""
        self._writer.close()
        with self._lock:
            for conn in self._connections:
                conn.close()
            self._connections.clear()
        self._local = threading.local()

    def _connection(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is not None and self._local.pid == os.getpid():
            return conn
        conn = connect_sqlite(self.path)
        self._local.conn, self._local.pid = conn, os.getpid()
        with self._lock:
            self._connections.append(conn)
        return conn

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


def connect_sqlite(path: Path) -> sqlite3.Connection:
    """A connection to the store's file with its pragmas, rows as mappings."""
    # autocommit mode: transactions are opened explicitly (BEGIN IMMEDIATE) by the writer and write()
    conn = sqlite3.connect(
        path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None, check_same_thread=False
    )
    conn.row_factory = sqlite3.Row
    configure_sqlite(conn)
    return conn


def configure_sqlite(conn: Any) -> None:
    """The pragmas every connection to the store's file runs (raw sqlite3 and SQLAlchemy's alike)."""
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    conn.execute("PRAGMA synchronous = NORMAL")  # durable across process crashes; WAL keeps it consistent
    conn.execute("PRAGMA foreign_keys = ON")


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


def is_storage_error(exc: sqlite3.OperationalError) -> bool:
    return (getattr(exc, "sqlite_errorcode", 0) & 0xFF) in _STORAGE_ERRORS


def storage_failure(exc: BaseException) -> Unavailable | None:
    """The Unavailable a caller gets when the disk or the lock, not our SQL, failed its write; else None."""
    if isinstance(exc, sqlite3.OperationalError) and is_storage_error(exc):
        # a read-only or failing volume, or a lock held too long. The transaction was rolled back, so a
        # client may retry (UNAVAILABLE), not give up (INTERNAL)
        return Unavailable(
            f"the job store cannot be written right now ({exc}); nothing was changed, retry later"
        )
    return None


def sqlite_revision(path: Path) -> str | None:
    """The migration revision of the store's file, or None (missing, or made before migrations)."""
    if not path.exists():
        return None
    conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_MS / 1000)
    try:
        row = conn.execute("SELECT version_num FROM alembic_version").fetchone()
    except sqlite3.OperationalError:  # no such table
        return None
    finally:
        conn.close()
    return None if row is None else str(row[0])
