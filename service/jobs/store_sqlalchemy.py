"""The job store's database through SQLAlchemy Core: PostgreSQL (psycopg 3), or SQLite by URL.

`TUNESERVE_DATABASE_URL=postgresql://user:password@host:5432/db` puts the store on PostgreSQL, where
several service replicas share it: a write locks the rows it changes (`FOR UPDATE`), a claim skips rows
another replica holds (`FOR UPDATE SKIP LOCKED`), and creations serialize on an advisory lock so an
idempotency key or the queue limit holds across replicas. `sqlite:///path` runs the same SQL on SQLite
through SQLAlchemy (BEGIN IMMEDIATE), which is how its cost against raw sqlite3 is measured.

Writes go through the process's one writer (service.jobs.store_writer) on a connection of its own, in
batched transactions with a SAVEPOINT per write; reads take a connection from the pool.
"""

from __future__ import annotations

import functools
import logging
import sqlite3
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc

from service.errors import InvalidArgument, Unavailable
from service.jobs.store_db import Conn, Row, configure_sqlite, is_storage_error
from service.jobs.store_migrate import upgrade
from service.jobs.store_writer import Backend, Writer

log = logging.getLogger(__name__)

URL_HELP = (
    "set TUNESERVE_DATABASE_URL to postgresql://USER:PASSWORD@HOST:5432/DATABASE, or leave it unset for "
    "the SQLite file in the state folder"
)
POOL_SIZE = 8  # connections kept open per process; as many more may open under a burst
CONNECT_TIMEOUT_S = 10

# PostgreSQL's deadlock_detected and serialization_failure: lost to another replica's locks, not broken
CONFLICT_SQLSTATES = frozenset({"40P01", "40001"})
T = TypeVar("T")

_text = functools.lru_cache(maxsize=256)(sa.text)  # the compiled form of each statement is cached by it


class SqlAlchemyConn:
    def __init__(self, conn: sa.Connection, postgres: bool) -> None:
        self.conn = conn
        self.postgres = postgres
        self.lock_rows = " FOR UPDATE" if postgres else ""
        self.skip_locked = " FOR UPDATE SKIP LOCKED" if postgres else ""

    def all(self, sql: str, params: Mapping[str, Any] | None = None) -> Sequence[Row]:
        rows: Sequence[Any] = self.conn.execute(_text(sql), dict(params or {})).mappings().all()
        return rows  # RowMapping is a Mapping[str, Any]; mypy cannot see it through SQLAlchemy's stubs

    def one(self, sql: str, params: Mapping[str, Any] | None = None) -> Row | None:
        row: Any = self.conn.execute(_text(sql), dict(params or {})).mappings().first()
        return row  # type: ignore[no-any-return]

    def run(self, sql: str, params: Mapping[str, Any] | None = None) -> int:
        return self.conn.execute(_text(sql), dict(params or {})).rowcount

    def exclusive(self, name: str) -> None:
        if self.postgres:
            self.conn.execute(_text("SELECT pg_advisory_xact_lock(hashtext(:name))"), {"name": name})


class SqlAlchemySession:
    """The writer's connection: one transaction per batch, a SAVEPOINT (nested transaction) per write."""

    def __init__(self, engine: sa.Engine, postgres: bool) -> None:
        self._sa = engine.connect()
        self.conn = SqlAlchemyConn(self._sa, postgres)
        self._tx: sa.RootTransaction | None = None
        self._nested: sa.NestedTransaction | None = None

    def begin(self) -> None:
        self._tx = self._sa.begin()

    def savepoint(self) -> None:
        self._nested = self._sa.begin_nested()

    def rollback_to_savepoint(self) -> None:
        assert self._nested is not None
        self._nested.rollback()

    def release_savepoint(self) -> None:
        assert self._nested is not None
        self._nested.commit()

    def commit(self) -> None:
        assert self._tx is not None
        self._tx.commit()

    def close(self) -> None:
        self._sa.close()  # rolls back what is open; a broken connection is discarded by the pool


class SqlAlchemyDatabase:
    """A pool of connections to one database URL. Thread-safe; one instance per process."""

    def __init__(self, url: str) -> None:
        self.engine = create_engine(url)
        # reads need no transaction: each statement sees the latest commits, with no BEGIN or ROLLBACK
        # round trip. A pool of its own, so its connections stay in autocommit instead of switching
        self._reader = create_engine(url, autocommit=True)
        self.dialect = self.engine.dialect.name
        self.display_url = mask(url)  # as the user wrote it, not with the driver SQLAlchemy was given
        self._postgres = self.dialect == "postgresql"
        backend: Backend[Conn] = Backend(
            lambda: SqlAlchemySession(self.engine, self._postgres), self._storage_failure, _is_conflict
        )
        self._writer: Writer[Conn] = Writer(backend)

    def migrate(self) -> None:
        """Bring the schema to the newest revision; a database that cannot be reached is Unavailable."""
        with self._translated():
            upgrade(self.engine)

    @contextmanager
    def read(self) -> Iterator[Conn]:
        with self._translated(), self._reader.connect() as conn:
            yield SqlAlchemyConn(conn, self._postgres)

    def run_write(self, work: Callable[[Conn], T]) -> T:
        return self._writer.run(work)

    @contextmanager
    def write(self) -> Iterator[Conn]:
        with self._translated(), self.engine.begin() as conn:
            yield SqlAlchemyConn(conn, self._postgres)

    def close(self) -> None:
        self._writer.close()
        self.engine.dispose()
        self._reader.dispose()

    @contextmanager
    def _translated(self) -> Iterator[None]:
        try:
            yield
        except sa_exc.DBAPIError as exc:
            if _is_unavailable(exc):
                # the server or the disk, not our SQL; the transaction was rolled back, so retrying is safe
                raise Unavailable(unreachable_message(self.display_url, exc)) from exc
            raise

    def _storage_failure(self, exc: BaseException) -> Unavailable | None:
        if isinstance(exc, sa_exc.DBAPIError) and _is_unavailable(exc):
            return Unavailable(unreachable_message(self.display_url, exc))
        return None


def create_engine(url: str, *, autocommit: bool = False) -> sa.Engine:
    """An engine for `url` (postgresql:// or sqlite:///); a URL of another kind is InvalidArgument.
    `autocommit`: every statement commits by itself (for reads)."""
    try:
        parsed = sa.make_url(url)
    except sa_exc.ArgumentError:
        raise InvalidArgument(
            f"TUNESERVE_DATABASE_URL {mask(url)!r} is not a database URL; {URL_HELP}"
        ) from None
    backend = parsed.get_backend_name()
    if backend == "postgresql":
        return sa.create_engine(
            parsed.set(drivername="postgresql+psycopg"),  # psycopg 3, whatever driver the URL named
            pool_size=POOL_SIZE,
            max_overflow=POOL_SIZE,
            # no pre-ping (a round trip per call): after a server restart the first call fails
            # (UNAVAILABLE, retryable) and SQLAlchemy then replaces every pooled connection
            connect_args={"connect_timeout": CONNECT_TIMEOUT_S},
            **({"isolation_level": "AUTOCOMMIT"} if autocommit else {}),
        )
    if backend == "sqlite" and parsed.database and parsed.database != ":memory:":
        return sqlite_engine(Path(parsed.database), immediate=not autocommit)
    raise InvalidArgument(
        f"TUNESERVE_DATABASE_URL {parsed.render_as_string(hide_password=True)!r} is not supported: "
        f"only PostgreSQL and SQLite files are; {URL_HELP}"
    )


def sqlite_engine(path: Path, *, immediate: bool = True, **options: Any) -> sa.Engine:
    """An engine on the store's SQLite file with the raw connections' pragmas, whose transactions are
    BEGIN IMMEDIATE (SQLAlchemy's own BEGIN is deferred: two writers could deadlock upgrading), or
    none at all when not `immediate` (reads: each statement on its own, as the raw store's)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    engine = sa.create_engine(f"sqlite:///{path}", **options)

    @sa.event.listens_for(engine, "connect")
    def on_connect(dbapi_connection: sqlite3.Connection, _record: object) -> None:
        dbapi_connection.isolation_level = None  # autocommit: the "begin" hook below opens transactions
        configure_sqlite(dbapi_connection)

    if immediate:

        @sa.event.listens_for(engine, "begin")
        def on_begin(conn: sa.Connection) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def upgrade_sqlite(path: Path) -> None:
    """Migrate the SQLite file at `path` (made if missing) to the newest revision."""
    engine = sqlite_engine(path, poolclass=sa.NullPool)
    try:
        upgrade(engine)
    finally:
        engine.dispose()


def mask(url: str) -> str:
    """`url` with its password replaced by ***, even when SQLAlchemy cannot parse it."""
    try:
        return sa.make_url(url).render_as_string(hide_password=True)
    except sa_exc.ArgumentError:
        scheme, sep, rest = url.partition("://")
        credentials, at, host = rest.rpartition("@")
        if not at or ":" not in credentials:
            return url
        return f"{scheme}{sep}{credentials.split(':', 1)[0]}:***@{host}"


def unreachable_message(display_url: str, exc: sa_exc.DBAPIError) -> str:
    """One line: which database, what went wrong, what to do about it."""
    reason = str(exc.orig).strip().splitlines()[0] if exc.orig is not None else str(exc)
    lowered = reason.lower()
    if "password authentication failed" in lowered or "no password supplied" in lowered:
        fix = "fix the user or password in TUNESERVE_DATABASE_URL"
    elif "does not exist" in lowered and "database" in lowered:
        fix = "create that database (createdb) or fix its name in TUNESERVE_DATABASE_URL"
    elif "connection refused" in lowered or "timeout" in lowered or "could not translate" in lowered:
        fix = "start the database, or fix the host and port in TUNESERVE_DATABASE_URL"
    else:
        fix = "check that the database is up and TUNESERVE_DATABASE_URL is right, then retry"
    return f"the job store's database {display_url} is unavailable ({reason}); {fix}"


def _is_unavailable(exc: sa_exc.DBAPIError) -> bool:
    if exc.connection_invalidated or isinstance(exc, sa_exc.OperationalError | sa_exc.InterfaceError):
        orig = exc.orig
        # SQLite: only the disk or the lock; a bad statement stays a bug (INTERNAL)
        return not isinstance(orig, sqlite3.OperationalError) or is_storage_error(orig)
    return False


def _is_conflict(exc: BaseException) -> bool:
    return isinstance(exc, sa_exc.DBAPIError) and getattr(exc.orig, "sqlstate", None) in CONFLICT_SQLSTATES
