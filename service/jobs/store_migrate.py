"""Bring a job store's schema to the newest revision (Alembic, scripts in service/jobs/migrations).

Every process that opens the store runs this at start. It is safe when several start at once: the whole
upgrade is one transaction that first takes the database's writer lock (SQLite: BEGIN IMMEDIATE;
PostgreSQL: an advisory lock), so the second one finds the schema already new and does nothing.
A SQLite file made before migrations existed (tables but no alembic_version) is stamped at 0001, the
schema it has, then upgraded like any other. A store a newer tuneserve migrated (a rollback, or an old
replica restarted mid-update) is used as it is when its migrations declare this code compatible (table
schema_compat: the oldest code that runs on it), else refused with what to do.
"""

from __future__ import annotations

import logging
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from service.errors import FailedPrecondition
from service.jobs.store_db import SCHEMA_HEAD

log = logging.getLogger(__name__)

BEFORE_MIGRATIONS = "0001"  # the schema service/jobs/store.py created itself, up to 2026-12-02
MIGRATIONS = Path(__file__).with_name("migrations")


def upgrade(engine: sa.Engine) -> None:
    """Migrate the database behind `engine` to HEAD, adopting a pre-migration SQLite file."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            # replicas starting together: one migrates, the others wait here and then find nothing to do
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(hashtext('tuneserve.migrate'))"))
        config.attributes["connection"] = conn
        tables = set(sa.inspect(conn).get_table_names())
        if "jobs" in tables and "alembic_version" not in tables:
            log.info("adopting the job store's existing schema as revision %s", BEFORE_MIGRATIONS)
            command.stamp(config, BEFORE_MIGRATIONS)
        scripts = ScriptDirectory.from_config(config)
        if _a_newer_schema_this_code_runs_on(conn, scripts, engine.url.render_as_string(hide_password=True)):
            return
        command.upgrade(config, SCHEMA_HEAD)
        _record_oldest_code(conn, scripts)


def oldest_code(scripts: ScriptDirectory) -> str:
    """The oldest code (by its SCHEMA_HEAD) that runs on the schema the migrations up to head make.
    A migration says so in `OLDEST_CODE` when code from before it still runs on what it leaves (it only
    adds what older code does not read: a nullable column, a table); one that does not is strict."""
    oldest = "0000"
    for script in reversed(list(scripts.walk_revisions())):  # base first
        oldest = max(oldest, getattr(script.module, "OLDEST_CODE", script.revision))
    return oldest


def _record_oldest_code(conn: sa.Connection, scripts: ScriptDirectory) -> None:
    # in the database, for code older than these scripts: it cannot read them (see below)
    conn.execute(sa.text("DELETE FROM schema_compat"))
    conn.execute(sa.text("INSERT INTO schema_compat (oldest_code) VALUES (:o)"), {"o": oldest_code(scripts)})


def _a_newer_schema_this_code_runs_on(conn: sa.Connection, scripts: ScriptDirectory, where: str) -> bool:
    """A store a newer tuneserve migrated (a rollback to this release, or this replica restarted during
    a rolling update): run on it without migrating when its migrations say this code still can; refuse
    it, saying what to do, when they do not (Alembic alone says "Can't locate revision ...")."""
    current = MigrationContext.configure(conn).get_current_revision()
    if current is None or current in {script.revision for script in scripts.walk_revisions()}:
        return False
    needed = None
    if "schema_compat" in sa.inspect(conn).get_table_names():
        needed = conn.execute(sa.text("SELECT oldest_code FROM schema_compat")).scalar()
    if needed is not None and str(needed) <= SCHEMA_HEAD:
        log.warning(
            "the job store %s has schema revision %s, newer than this tuneserve's %s; its migrations "
            "say code from revision %s on runs on it: running without migrating",
            where, current, SCHEMA_HEAD, needed,
        )  # fmt: skip
        return True
    raise FailedPrecondition(
        f"the job store {where} has schema revision {current}, which this tuneserve does not know (its "
        f"newest is {SCHEMA_HEAD}) and which needs tuneserve code of schema revision {needed or current} "
        "or newer: a newer tuneserve has migrated it. Run that version or a newer one (finish the rolling "
        "update); to go back to this version, restore the store from a backup taken before the upgrade"
    )
