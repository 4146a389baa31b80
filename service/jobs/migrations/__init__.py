"""Alembic migrations of the job store's schema, run by service.jobs.store_migrate at every start."""
