-- The job store's schema as service/jobs/store.py created it before migrations (commit 0e299f8), verbatim:
-- tests/unit/test_store_backends.py makes a file with it to check that such a file is adopted.
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
