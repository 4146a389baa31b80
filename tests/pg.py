"""A real, throw-away PostgreSQL for tests: Debian's `postgresql` binaries, a cluster in a temporary
folder on a free loopback port, run as the `postgres` user (initdb refuses root), password required.

`postgres_server` (one per test session) and `postgres_database` (a fresh database per test module)
are fixtures; a test module imports them. A test that stops and starts its server has one of its own
(`postgres_of_its_own`), and reads through `once_back` after the restart. Without PostgreSQL installed
the tests that use them skip, except under CI=true, where they fail: CI must never pass by silently
skipping them.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest

from service.errors import Unavailable
from tests.ports import free_ports

T = TypeVar("T")

INSTALL_HINT = "install it with `apt-get install -y postgresql` (Debian), as .ci/run does"


def postgres_bin() -> Path | None:
    """The newest of Debian's /usr/lib/postgresql/<version>/bin that has initdb, if any."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    return Path(found[-1]).parent if found else None


def require_postgres() -> Path:
    """The binaries' folder, or a skip (a failure under CI=true) naming how to install them."""
    bin_dir = postgres_bin()
    if bin_dir is None:
        message = f"PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb); {INSTALL_HINT}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return bin_dir


@dataclass
class PostgresServer:
    bin_dir: Path
    root: Path
    port: int
    password: str

    @property
    def data(self) -> Path:
        return self.root / "data"

    def url(self, database: str = "postgres", password: str | None = None) -> str:
        secret = self.password if password is None else password
        return f"postgresql://postgres:{secret}@127.0.0.1:{self.port}/{database}"

    def start(self) -> None:
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories='' "
            # a test cluster: losing it in a power cut is fine, waiting for the disk is not
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        )
        self._pg("pg_ctl", "-D", str(self.data), "-l", str(self.root / "log"), "-w", "-o", options, "start")

    def stop(self) -> None:
        self._pg("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def sql(self, statement: str) -> None:
        """Run one statement as the superuser, outside a transaction (CREATE/DROP DATABASE)."""
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(statement)  # type: ignore[arg-type]  # our own fixed statements

    def create_database(self, name: str) -> str:
        self.sql(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def drop_database(self, name: str) -> None:
        self.sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def _pg(self, tool: str, *args: str) -> None:
        done = subprocess.run(
            [*as_postgres(), str(self.bin_dir / tool), *args], capture_output=True, text=True, timeout=120
        )
        if done.returncode != 0:
            log = (self.root / "log").read_text() if (self.root / "log").exists() else ""
            raise RuntimeError(f"{tool} {' '.join(args)} failed:\n{done.stdout}{done.stderr}{log[-2000:]}")


def as_postgres() -> list[str]:
    """The prefix that runs a command as `postgres` when we are root (initdb refuses root)."""
    return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []


def start_postgres() -> PostgresServer:
    """initdb + pg_ctl start in a new temporary folder; the caller stops it and removes the folder."""
    bin_dir = require_postgres()
    root = Path(tempfile.mkdtemp(prefix="tuneserve-pg-"))
    server = PostgresServer(bin_dir, root, free_ports(1)[0], secrets.token_hex(8))
    password_file = root / "password"
    password_file.write_text(server.password)
    if os.geteuid() == 0:
        owner = pwd.getpwnam("postgres")
        for path in (root, password_file):
            os.chown(path, owner.pw_uid, owner.pw_gid)
    root.chmod(0o700)
    server._pg(
        "initdb",
        *("-D", str(server.data), "-U", "postgres", "-E", "UTF8", "--no-sync"),
        *("--auth=scram-sha-256", f"--pwfile={password_file}"),
    )
    server.start()
    return server


@contextlib.contextmanager
def postgres_of_its_own() -> Iterator[PostgresServer]:
    """A started cluster, stopped and removed at the end: the session's, or one a test stops and starts."""
    server = start_postgres()
    try:
        yield server
    finally:
        with contextlib.suppress(RuntimeError):
            server.stop()
        shutil.rmtree(server.root, ignore_errors=True)


def once_back(read: Callable[[], T], timeout_s: float = 30.0) -> T:
    """`read()` once a restarted server answers: the first use of each pooled connection the restart cut
    fails (UNAVAILABLE) while the pool replaces them."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return read()
        except Unavailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    with postgres_of_its_own() as server:
        yield server


@pytest.fixture(scope="module")
def postgres_database(postgres_server: PostgresServer, request: pytest.FixtureRequest) -> Iterator[str]:
    """The URL of a new, empty database for this test module, dropped after it."""
    name = f"test_{request.module.__name__.rsplit('.', 1)[-1]}_{secrets.token_hex(3)}".lower()
    url = postgres_server.create_database(name)
    try:
        yield url
    finally:
        postgres_server.drop_database(name)
