"""The fine-tuning service's durable state: SQLite (WAL) for files, jobs, events and
checkpoints, and content-addressed file bodies under ``STATE/files/``.

Everything the service knows is here, so a server killed at any moment (``kill -9``) starts
again where it was: every change is one transaction, a file body is written to a temporary
name, fsynced and renamed to its SHA-256 before the row that names it commits. Ids are
generated here (``file-…``, ``ftjob-…``) and only ever reach the filesystem as hex digests
or ids matched against ``ID``; a user's file name is stored as a value, never used as a path.
Standard library only.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import sqlite3
import threading
import time
from pathlib import Path

ID = re.compile(r"^(file|ftjob|ftevent|ftckpt)-[0-9a-f]{24}$")

SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    id TEXT PRIMARY KEY, created_at INTEGER NOT NULL, bytes INTEGER NOT NULL,
    filename TEXT NOT NULL, purpose TEXT NOT NULL, sha256 TEXT NOT NULL,
    deleted INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, created_at INTEGER NOT NULL,
    request TEXT NOT NULL, status TEXT NOT NULL, started_at INTEGER, finished_at INTEGER,
    trained_tokens INTEGER, error TEXT, fine_tuned_model TEXT, result_files TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, job_id TEXT NOT NULL,
    created_at INTEGER NOT NULL, level TEXT NOT NULL, message TEXT NOT NULL, data TEXT,
    type TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS checkpoints (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, job_id TEXT NOT NULL,
    created_at INTEGER NOT NULL, step INTEGER NOT NULL, metrics TEXT NOT NULL,
    UNIQUE (job_id, step)
);
"""

ACTIVE = ("validating_files", "queued", "running")


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


class Store:
    """One state dir. Thread-safe: one connection, serialized by a lock (the writes are
    small; SQLite's WAL lets a reader in another process, e.g. a backup, run alongside)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        (self.root / "files").mkdir(parents=True, exist_ok=True)
        (self.root / "jobs").mkdir(exist_ok=True)
        self._lock = threading.RLock()
        self.db = sqlite3.connect(self.root / "edgetune.db", check_same_thread=False)
        self.db.row_factory = sqlite3.Row
        with self._lock:
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self.db.close()

    def _tx(self, sql: str, args: tuple = ()) -> sqlite3.Cursor:
        with self._lock, self.db:
            return self.db.execute(sql, args)

    def _all(self, sql: str, args: tuple = ()) -> list[dict]:
        with self._lock:
            return [dict(r) for r in self.db.execute(sql, args).fetchall()]

    # -- files ----------------------------------------------------------------------------------

    def blob_path(self, sha256: str) -> Path:
        assert re.fullmatch(r"[0-9a-f]{64}", sha256)
        return self.root / "files" / sha256

    def add_file(self, tmp: Path, filename: str, purpose: str) -> dict:
        """Move an already validated temporary file into the store; returns its row."""
        h = hashlib.sha256()
        with open(tmp, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
            os.fsync(f.fileno())
        digest = h.hexdigest()
        blob = self.blob_path(digest)
        if blob.exists():
            tmp.unlink()
        else:
            os.replace(tmp, blob)
        row = {
            "id": new_id("file"),
            "created_at": int(time.time()),
            "bytes": blob.stat().st_size,
            "filename": filename,
            "purpose": purpose,
            "sha256": digest,
        }
        self._insert("files", row)
        return row

    def _insert(self, table: str, row: dict) -> None:
        cols = ", ".join(row)
        marks = ", ".join("?" for _ in row)
        self._tx(f"INSERT INTO {table} ({cols}) VALUES ({marks})", tuple(row.values()))

    def file(self, file_id: str) -> dict | None:
        if not ID.match(file_id):
            return None
        rows = self._all("SELECT * FROM files WHERE id = ? AND deleted = 0", (file_id,))
        return rows[0] if rows else None

    def files(self, purpose: str | None = None) -> list[dict]:
        if purpose:
            return self._all(
                "SELECT * FROM files WHERE deleted = 0 AND purpose = ? ORDER BY created_at DESC, "
                "rowid DESC",
                (purpose,),
            )
        return self._all(
            "SELECT * FROM files WHERE deleted = 0 ORDER BY created_at DESC, rowid DESC"
        )

    def delete_file(self, file_id: str) -> bool:
        row = self.file(file_id)
        if row is None:
            return False
        self._tx("UPDATE files SET deleted = 1 WHERE id = ?", (file_id,))
        others = self._all(
            "SELECT id FROM files WHERE sha256 = ? AND deleted = 0", (row["sha256"],)
        )
        if not others:
            self.blob_path(row["sha256"]).unlink(missing_ok=True)
        return True

    # -- jobs -----------------------------------------------------------------------------------

    def add_job(self, request: dict) -> dict:
        row: dict[str, str | int] = {
            "id": new_id("ftjob"),
            "created_at": int(time.time()),
            "request": json.dumps(request),
            "status": "validating_files",
            "result_files": "[]",
        }
        self._insert("jobs", row)
        job = self.job(str(row["id"]))
        assert job is not None
        return job

    def job(self, job_id: str) -> dict | None:
        if not ID.match(job_id):
            return None
        rows = self._all("SELECT * FROM jobs WHERE id = ?", (job_id,))
        return rows[0] if rows else None

    def jobs(self, after: str | None = None, limit: int = 20) -> tuple[list[dict], bool]:
        """Newest first; ``after``: the id of the last job of the previous page."""
        if after:
            start = self.job(after)
            if start is None:
                return [], False
            rows = self._all(
                "SELECT * FROM jobs WHERE seq < ? ORDER BY seq DESC LIMIT ?",
                (start["seq"], limit + 1),
            )
        else:
            rows = self._all("SELECT * FROM jobs ORDER BY seq DESC LIMIT ?", (limit + 1,))
        return rows[:limit], len(rows) > limit

    def jobs_with_status(self, *status: str) -> list[dict]:
        marks = ", ".join("?" for _ in status)
        return self._all(f"SELECT * FROM jobs WHERE status IN ({marks}) ORDER BY seq", status)

    def update_job(self, job_id: str, only_if: tuple[str, ...] = (), **fields) -> bool:
        """Set fields; with ``only_if``, only while the job's status is one of those (so a
        cancel and a finishing worker cannot both win). True when the row changed."""
        sets = ", ".join(f"{k} = ?" for k in fields)
        args = tuple(json.dumps(v) if isinstance(v, (dict, list)) else v for v in fields.values())
        sql = f"UPDATE jobs SET {sets} WHERE id = ?"
        if only_if:
            sql += f" AND status IN ({', '.join('?' for _ in only_if)})"
        return self._tx(sql, (*args, job_id, *only_if)).rowcount == 1

    def job_dir(self, job_id: str) -> Path:
        assert ID.match(job_id)
        return self.root / "jobs" / job_id

    # -- events and checkpoints ------------------------------------------------------------------

    def add_event(self, job_id: str, message: str, level: str = "info", data: dict | None = None):
        self._insert(
            "events",
            {
                "id": new_id("ftevent"),
                "job_id": job_id,
                "created_at": int(time.time()),
                "level": level,
                "message": message,
                "data": json.dumps(data) if data is not None else None,
                "type": "metrics" if data is not None else "message",
            },
        )

    def events(self, job_id: str, after: str | None = None, limit: int = 20):
        """Newest first, as OpenAI lists them: (rows, has_more)."""
        return self._page("events", job_id, after, limit)

    def _page(self, table: str, job_id: str, after: str | None, limit: int):
        """A job's rows of ``table`` newest first, from the one after id ``after``."""
        args: tuple = (job_id,)
        where = "job_id = ?"
        if after:
            rows = self._all(f"SELECT seq FROM {table} WHERE id = ?", (after,))
            if not rows:
                return [], False
            where += " AND seq < ?"
            args += (rows[0]["seq"],)
        rows = self._all(
            f"SELECT * FROM {table} WHERE {where} ORDER BY seq DESC LIMIT ?", (*args, limit + 1)
        )
        return rows[:limit], len(rows) > limit

    def last_metrics_step(self, job_id: str) -> int:
        """The step of the job's newest metrics event (0: none)."""
        rows = self._all(
            "SELECT data FROM events WHERE job_id = ? AND type = 'metrics' ORDER BY seq DESC "
            "LIMIT 1",
            (job_id,),
        )
        return int(json.loads(rows[0]["data"])["step"]) if rows else 0

    def checkpoint_steps(self, job_id: str) -> set[int]:
        rows = self._all("SELECT step FROM checkpoints WHERE job_id = ?", (job_id,))
        return {int(r["step"]) for r in rows}

    def add_checkpoint(self, job_id: str, step: int, metrics: dict) -> bool:
        with self._lock, self.db:
            cur = self.db.execute(
                "INSERT OR IGNORE INTO checkpoints (id, job_id, created_at, step, metrics) "
                "VALUES (?, ?, ?, ?, ?)",
                (new_id("ftckpt"), job_id, int(time.time()), step, json.dumps(metrics)),
            )
            return cur.rowcount == 1

    def checkpoints(self, job_id: str, after: str | None = None, limit: int = 10):
        return self._page("checkpoints", job_id, after, limit)
