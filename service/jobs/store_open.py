"""Which database the job store opens: a SQLite file by default, PostgreSQL when a URL names it.

Opening migrates the schema to the newest revision (service.jobs.store_migrate). For the default SQLite
file, a file already at that revision is opened without importing SQLAlchemy or Alembic (a fraction of
a second for every process that opens the store).
"""

from __future__ import annotations

from pathlib import Path

from service.jobs.store_db import SCHEMA_HEAD, Database, SqliteDatabase, sqlite_revision
from service.settings import Settings


def store_target(settings: Settings) -> Path | str:
    """TUNESERVE_DATABASE_URL when it is set, else the SQLite file in the state folder."""
    if settings.database_url is not None and settings.database_url.get_secret_value():
        return settings.database_url.get_secret_value()
    return settings.jobs_db


def open_database(target: Path | str | Database) -> Database:
    """An open, migrated database for a SQLite path, a database URL, or a Database as it is."""
    if isinstance(target, Path):
        if sqlite_revision(target) != SCHEMA_HEAD:
            # imported here on purpose: SQLAlchemy and Alembic load only when a file needs migrating
            from service.jobs.store_sqlalchemy import upgrade_sqlite

            upgrade_sqlite(target)
        return SqliteDatabase(target)
    if isinstance(target, str):
        from service.jobs.store_sqlalchemy import SqlAlchemyDatabase

        database = SqlAlchemyDatabase(target)
        try:
            database.migrate()
        except BaseException:
            database.close()
            raise
        return database
    return target
