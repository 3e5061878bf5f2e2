"""The server's durable model store: one safetensors file per upload plus a SQLite index.

Layout under ``root``: ``uploads/<key>-<version>.safetensors`` (weights, descriptor,
architecture), ``meta_model-<version>.safetensors`` and ``index.sqlite``. Every write goes to a
new file (itself written to a temp name, fsynced and renamed); the index row is switched to it in
one SQLite transaction and only then is the previous file deleted. A crash at any point leaves
the index pointing at a complete file, the old one or the new one; files no row points to are
collected when the store is next opened. Entries are keyed by the client's own id: an upload from
a known id replaces its entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from fedfuse.errors import FedfuseError, ZooError
from fedfuse.io import load_tensors, save_tensors
from fedfuse import architectures
from fedfuse.meta_model import MetaModel
from fedfuse.parallel import ParallelMap
from fedfuse.wire import Upload
from fedfuse.zoo import ModelZoo

SCHEMA = """
CREATE TABLE IF NOT EXISTS uploads (
    client_id TEXT PRIMARY KEY,
    file TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    n_examples INTEGER NOT NULL,
    received REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS metrics (
    client_id TEXT NOT NULL,
    run TEXT NOT NULL,
    payload TEXT NOT NULL,
    received REAL NOT NULL,
    PRIMARY KEY (client_id, run)
);
CREATE TABLE IF NOT EXISTS rounds (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    phase TEXT NOT NULL,
    payload TEXT NOT NULL,
    finished REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS meta_model (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    file TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    n_models INTEGER NOT NULL,
    fitted REAL NOT NULL
);
"""


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class ModelStore:
    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root).resolve()
        (self.root / "uploads").mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.root / "index.sqlite", timeout=30)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(SCHEMA)
        finally:
            db.close()
        self._collect_orphans()

    def _collect_orphans(self, min_age: float = 300.0) -> None:
        """Delete files no index row points to (left by a crash between write and commit).
        Young files are spared: another writer may be about to commit them."""
        with self._db() as db:
            live = {r[0] for r in db.execute("SELECT file FROM uploads")}
            live |= {r[0] for r in db.execute("SELECT file FROM meta_model")}
        now = time.time()
        for path in [*(self.root / "uploads").glob("*.safetensors"), *self.root.glob("meta_model-*.safetensors")]:
            rel = str(path.relative_to(self.root))
            if rel not in live and now - path.stat().st_mtime > min_age:
                path.unlink(missing_ok=True)

    def _drop_superseded(self, old: str | None, new: str) -> None:
        """After the commit that switched to ``new``: drop the superseded file."""
        if old and old != new:
            (self.root / old).unlink(missing_ok=True)

    @contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.root / "index.sqlite", timeout=30, isolation_level=None)
        try:
            db.execute("PRAGMA synchronous=FULL")
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        finally:
            db.close()

    # -- uploads --------------------------------------------------------------------------------
    def put(self, upload: Upload) -> None:
        """Store (or replace) one client's upload; returns once it is durable."""
        key = hashlib.sha256(upload.client_id.encode()).hexdigest()[:32]
        rel = f"uploads/{key}-{uuid.uuid4().hex[:12]}.safetensors"
        path = save_tensors(self.root / rel, {"weights": upload.weights, "tau": torch.tensor(upload.tau)},
                            {"client_id": upload.client_id, "spec": upload.spec.to_dict()})
        with self._db() as db:
            row = db.execute("SELECT file FROM uploads WHERE client_id = ?", (upload.client_id,)).fetchone()
            db.execute(
                "INSERT INTO uploads VALUES (?, ?, ?, ?, ?) ON CONFLICT(client_id) DO UPDATE SET "
                "file=excluded.file, sha256=excluded.sha256, n_examples=excluded.n_examples, "
                "received=excluded.received",
                (upload.client_id, rel, _sha256(path), upload.n_examples, time.time()),
            )
        self._drop_superseded(row[0] if row else None, rel)

    def ids(self) -> list[str]:
        with self._db() as db:
            return [r[0] for r in db.execute("SELECT client_id FROM uploads ORDER BY client_id")]

    def __len__(self) -> int:
        return len(self.ids())

    def zoo(self) -> ModelZoo:
        """Every stored upload as one zoo (checks each file against its recorded hash)."""
        with self._db() as db:
            rows = db.execute("SELECT client_id, file, sha256, n_examples FROM uploads "
                              "ORDER BY client_id").fetchall()
        if not rows:
            raise ZooError(f"the store at {self.root} holds no uploads yet: run the collect phase first")
        records, spec = [], None
        for cid, name, digest, n_examples in rows:
            path = self.root / name
            if _sha256(path) != digest:
                raise FedfuseError(f"store file {path} for client {cid!r} does not match its index entry")
            tensors, meta = load_tensors(path)
            s = architectures.from_dict(meta["spec"])
            if spec is None:
                spec = s
            records.append((cid, tensors["weights"], tensors["tau"], n_examples))
        return ModelZoo.from_models(spec, records)

    # -- meta-model -----------------------------------------------------------------------------
    def save_meta_model(self, model: MetaModel) -> Path:
        rel = f"meta_model-{uuid.uuid4().hex[:12]}.safetensors"
        path = self.root / rel
        model.save(path)
        with self._db() as db:
            row = db.execute("SELECT file FROM meta_model WHERE id = 1").fetchone()
            db.execute("INSERT OR REPLACE INTO meta_model VALUES (1, ?, ?, ?, ?)",
                       (rel, _sha256(path), len(model.ids_), time.time()))
        self._drop_superseded(row[0] if row else None, rel)
        return path

    def load_meta_model(self, pmap: ParallelMap | None = None) -> MetaModel:
        with self._db() as db:
            row = db.execute("SELECT file, sha256 FROM meta_model WHERE id = 1").fetchone()
        if row is None:
            raise FedfuseError(f"no fitted meta-model in the store at {self.root}: run the fit phase first")
        path = self.root / row[0]
        if _sha256(path) != row[1]:
            raise FedfuseError(f"{path} does not match its index entry")
        return MetaModel.load(path, pmap=pmap)

    # -- reports of rounds (who was accepted, rejected, failed, excluded) -----------------------
    def record_round(self, phase: str, report: dict[str, Any]) -> None:
        with self._db() as db:
            db.execute("INSERT INTO rounds (phase, payload, finished) VALUES (?, ?, ?)",
                       (phase, json.dumps(report), time.time()))

    def rounds(self, phase: str | None = None) -> list[dict[str, Any]]:
        with self._db() as db:
            q = "SELECT phase, payload FROM rounds" + (" WHERE phase = ?" if phase else "") + " ORDER BY id"
            rows = db.execute(q, (phase,) if phase else ()).fetchall()
        return [{"phase": p, **json.loads(payload)} for p, payload in rows]

    # -- personalization metrics ----------------------------------------------------------------
    def record_metrics(self, client_id: str, run: str, metrics: dict[str, Any]) -> None:
        with self._db() as db:
            db.execute("INSERT OR REPLACE INTO metrics VALUES (?, ?, ?, ?)",
                       (client_id, run, json.dumps(metrics), time.time()))

    def metrics(self, run: str | None = None) -> dict[str, dict[str, Any]]:
        with self._db() as db:
            q = "SELECT client_id, payload FROM metrics" + (" WHERE run = ?" if run else "")
            rows = db.execute(q, (run,) if run else ()).fetchall()
        return {cid: json.loads(p) for cid, p in rows}
