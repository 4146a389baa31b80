"""Bring a job store's schema to the newest revision (Alembic, scripts in service/jobs/migrations).

Every process that opens the store runs this at start. It is safe when several start at once: the whole
upgrade is one transaction that first takes the database's writer lock (SQLite: BEGIN IMMEDIATE;
PostgreSQL: an advisory lock), so the second one finds the schema already new and does nothing.
A SQLite file made before migrations existed (tables but no alembic_version) is stamped at 0001, the
schema it has, then upgraded like any other. A store a newer tuneserve migrated (a rollback, or an old
replica restarted mid-update) is refused with what to do: this code cannot know that schema.
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
        _refuse_a_newer_schema(conn, config, engine.url.render_as_string(hide_password=True))
        command.upgrade(config, SCHEMA_HEAD)


def _refuse_a_newer_schema(conn: sa.Connection, config: Config, where: str) -> None:
    # Alembic alone says "Can't locate revision identified by ..." and nothing of what to do
    current = MigrationContext.configure(conn).get_current_revision()
    known = {script.revision for script in ScriptDirectory.from_config(config).walk_revisions()}
    if current is not None and current not in known:
        raise FailedPrecondition(
            f"the job store {where} has schema revision {current}, which this tuneserve does not know (its "
            f"newest is {SCHEMA_HEAD}): a newer tuneserve has migrated it. Run that version or a newer one "
            "(finish the rolling update); to go back to this version, restore the store from a backup "
            "taken before the upgrade"
        )
