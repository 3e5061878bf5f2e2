"""The server's durable model store: one safetensors file per upload plus a SQLite index.

Layout under ``root``: ``uploads/<key>-<version>.safetensors`` (weights, descriptor,
architecture, client id, example count), ``meta_model-<version>.safetensors``, ``index.sqlite``,
``readers.lock`` and ``quarantine/``. Every write goes to a new file (temp name, fsync, rename,
fsync of the folder); the index row is switched to it in one SQLite transaction. A crash at any
point leaves the index pointing at a complete file, the old one or the new one. Entries are keyed
by the client's own id: an upload from a known id replaces its entry, but only if it comes from
the device (node identity) that first uploaded that id; the binding is kept in the index and in
each upload file's header, so a rebuilt index keeps it too.

Nothing an index row might still need is ever deleted. A superseded file is deleted only while
no reader holds ``readers.lock``, so a reader sees its rows and their files as one snapshot. When
the store is opened, files no row points to are moved to ``quarantine/`` (with a row saying why),
and an index that was lost is rebuilt from the upload files, each of which names its client.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import logging
import os
import sqlite3
import time
import uuid
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Concatenate, Iterator, ParamSpec, Sequence, TypeVar

import torch

from fedfuse.errors import FedfuseError, NotFittedError, StoreError, ZooError
from fedfuse.io import fsync_dir, parse_tensors, peek_tensors, save_tensors
from fedfuse import architectures
from fedfuse.architectures import Architecture
from fedfuse.meta_model import MetaModel
from fedfuse.parallel import ParallelMap
from fedfuse.errors import MessageRejected
from fedfuse.wire import Upload
from fedfuse.zoo import ModelZoo

log = logging.getLogger(__name__)

# A file no index row points to and younger than this may be a concurrent writer's, about to be
# committed: it is left alone. Older ones are quarantined (temp files of a crashed write removed).
GRACE_S = 300.0
# Readers hold it shared while they read rows and the files those name; a file an entry no longer
# names is deleted only by a writer that holds it exclusively.
READERS_LOCK = "readers.lock"

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
CREATE TABLE IF NOT EXISTS superseded (
    file TEXT PRIMARY KEY,
    since REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS bindings (
    client_id TEXT PRIMARY KEY,
    node TEXT NOT NULL,
    bound REAL NOT NULL,
    run TEXT
);
CREATE TABLE IF NOT EXISTS quarantined (
    file TEXT PRIMARY KEY,
    client_id TEXT,
    n_examples INTEGER,
    received REAL,
    reason TEXT NOT NULL,
    quarantined REAL NOT NULL
);
"""


def bound_elsewhere(client_id: str) -> MessageRejected:
    """The refusal a device gets for a client id another device uploaded first."""
    return MessageRejected(f"client id {client_id!r} is bound to another device")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _older_than(path: Path, seconds: float) -> bool:
    try:
        return time.time() - path.stat().st_mtime > seconds
    except FileNotFoundError:  # renamed or removed meanwhile by a concurrent writer
        return False


P = ParamSpec("P")
R = TypeVar("R")


def _storage_errors(method: Callable[Concatenate[ModelStore, P], R]) -> Callable[Concatenate[ModelStore, P], R]:
    """Report sqlite3 and OS errors as a StoreError naming the path: the store failed, the
    caller's input was fine (so no ValueError), and the operator must know which file to fix."""
    @functools.wraps(method)
    def wrapper(store: ModelStore, *args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return method(store, *args, **kwargs)
        except sqlite3.Error as exc:
            if getattr(exc, "sqlite_errorname", "") in {"SQLITE_CORRUPT", "SQLITE_NOTADB"}:
                hint = (f"it is damaged: `fedfuse store rebuild-index {store.root}` rebuilds it from "
                        "the upload files (keeping the old one as index.sqlite.bak)")
            else:
                hint = "check that it is writable, that its disk has free space and that no process holds it locked"
            raise StoreError(f"the store index {store.root / 'index.sqlite'} failed: {exc}; {hint}") from exc
        except OSError as exc:
            raise StoreError(f"the store at {store.root} could not read or write a file: {exc}; check "
                             "that the folder exists, that this process may write there and that the "
                             "disk has free space") from exc
    return wrapper


@dataclass(frozen=True)
class StoreProblem:
    """A stored file that cannot be used, and why."""

    client_id: str | None
    file: str  # relative to the store's root
    reason: str

    def __str__(self) -> str:
        who = "" if self.client_id is None else f" (client {self.client_id!r})"
        return f"{self.file}{who}: {self.reason}"


@dataclass(frozen=True)
class MetaModelEntry:
    """The meta-model's index row: its file, the file's sha256 (the model's version), the
    number of models it was fitted on and when it was stored (Unix seconds)."""

    file: str  # relative to the store's root
    sha256: str
    n_models: int
    fitted: float


@dataclass(frozen=True)
class StoreEntry:
    """An entry as the operator sees it (`fedfuse store ls`): in the zoo or quarantined."""

    client_id: str | None  # None: a quarantined file whose header names no client
    file: str  # relative to the store's root
    received: float | None
    n_examples: int | None
    descriptor: list[float] | None  # None: the file could not be read
    status: str  # "ok", "unreadable" or "quarantined"
    reason: str  # why it is unreadable or quarantined


def _checked(cid: str, spec: Architecture, weights: torch.Tensor | None,
             tau: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights and descriptor in float32, the precision the store keeps, or MessageRejected saying
    why they would be unusable: a value finite in float64 (1e39) is inf in float32."""
    if weights is None or tau is None:
        raise MessageRejected(f"client {cid!r} has no weights or no descriptor")
    weights, tau = weights.detach().flatten().to(torch.float32), tau.detach().flatten().to(torch.float32)
    if weights.numel() != spec.num_weights:
        raise MessageRejected(f"client {cid!r} has {weights.numel()} weights; its architecture "
                             f"{spec} has {spec.num_weights}")
    if tau.numel() == 0:
        raise MessageRejected(f"client {cid!r} has an empty descriptor")
    bad = (~torch.isfinite(weights)).nonzero().flatten()
    if bad.numel():
        raise MessageRejected(f"client {cid!r} has {bad.numel()} weights that are not finite as float32, the "
                             f"store's precision (the first at index {int(bad[0])}): retrain the model or "
                             "keep its weights within ±3.4e38")
    bad = (~torch.isfinite(tau)).nonzero().flatten()
    if bad.numel():
        raise MessageRejected(f"client {cid!r} has a descriptor that is not finite as float32, the store's "
                             f"precision (entry {int(bad[0])}): scale descriptors to within ±3.4e38")
    return weights, tau


def _as_stored(upload: Upload) -> dict[str, torch.Tensor]:
    """The upload's tensors as the store keeps them, or MessageRejected: stored, an entry the store
    could not use later would only be skipped by every future zoo."""
    n = upload.n_examples
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n < 2**63:
        raise MessageRejected(f"client {upload.client_id!r} reports {n!r} training examples; "
                             "a whole number from 0 to 2**63 - 1 is needed")
    weights, tau = _checked(upload.client_id, upload.spec, torch.as_tensor(upload.weights),
                            torch.tensor(upload.tau, dtype=torch.float64))
    return {"weights": weights, "tau": tau}


class ModelStore:
    @_storage_errors
    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root).resolve()
        (self.root / "uploads").mkdir(parents=True, exist_ok=True)
        (self.root / READERS_LOCK).touch()
        db = sqlite3.connect(self.root / "index.sqlite", timeout=30)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(SCHEMA)
        finally:
            db.close()
        self._unreadable: list[StoreProblem] = []
        self._recover()

    @_storage_errors
    def check_writable(self) -> None:
        """Fail now, naming the folder, if an upload could not be stored: the server calls this
        before it asks any device for one."""
        for folder in (self.root, self.root / "uploads"):
            probe = folder / f".probe-{uuid.uuid4().hex[:12]}.tmp"
            try:
                fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                try:
                    os.write(fd, b"fedfuse")
                    os.fsync(fd)
                finally:
                    os.close(fd)
                    probe.unlink()
            except OSError as exc:
                raise StoreError(f"the store folder {folder} is not writable: {exc}; make it writable by "
                                 "this process (or free disk space) before collecting uploads") from exc
        db = sqlite3.connect(self.root / "index.sqlite", timeout=30, isolation_level=None)
        try:  # a write that is rolled back: fails on a read-only index
            db.execute("BEGIN IMMEDIATE")
            db.execute("INSERT INTO rounds (phase, payload, finished) VALUES ('probe', '{}', 0)")
            db.execute("ROLLBACK")
        finally:
            db.close()

    def _recover(self, grace: float = GRACE_S) -> None:
        """Make files and index agree again after a crash or a lost index, deleting nothing a
        row might need: an index without uploads is rebuilt from the upload files; files no row
        points to are quarantined; only a crashed writer's temp files are removed."""
        self._collect_superseded()
        with self._db() as db:
            superseded = {r[0] for r in db.execute("SELECT file FROM superseded")}
            if db.execute("SELECT 1 FROM uploads LIMIT 1").fetchone() is None:
                self._index_files(db, superseded)
            live = superseded | {r[0] for r in db.execute("SELECT file FROM uploads")}
            live |= {r[0] for r in db.execute("SELECT file FROM meta_model")}
            for path in self._stored_files():
                if str(path.relative_to(self.root)) not in live and _older_than(path, grace):
                    self._quarantine_file(db, path, "no index row points to it (a write cut short "
                                                    "before its commit, or a lost index row)")
        for tmp in [*(self.root / "uploads").glob(".*.tmp"), *self.root.glob(".*.tmp")]:
            if _older_than(tmp, grace):
                tmp.unlink(missing_ok=True)

    def _stored_files(self) -> list[Path]:
        return sorted([*(self.root / "uploads").glob("*.safetensors"), *self.root.glob("meta_model-*.safetensors")])

    def _index_files(self, db: sqlite3.Connection, superseded: set[str]) -> None:
        """One row per client from the upload files' headers (the index was lost): the newest
        file of each client (by modification time) is its entry, older ones are quarantined;
        files awaiting deletion are left to it."""
        by_client: dict[str, list[tuple[float, str, str, int]]] = {}
        for path in sorted((self.root / "uploads").glob("*.safetensors")):
            if f"uploads/{path.name}" in superseded:
                continue
            data = path.read_bytes()
            try:
                _, meta = parse_tensors(data, path)
            except FedfuseError as exc:
                self._quarantine_file(db, path, f"unreadable while rebuilding the index: {exc}")
                continue
            cid, n_examples = meta.get("client_id"), meta.get("n_examples")
            if not isinstance(cid, str):
                self._quarantine_file(db, path, "its header names no client (found while rebuilding the index)")
                continue
            node, run = meta.get("node"), meta.get("run")
            by_client.setdefault(cid, []).append((path.stat().st_mtime, path.name, hashlib.sha256(data).hexdigest(),
                                                  n_examples if isinstance(n_examples, int) else 0,
                                                  node if isinstance(node, str) else None,
                                                  run if isinstance(run, str) else None))
        for cid, files in by_client.items():
            *older, (mtime, name, digest, n_examples, node, run) = sorted(files)
            for old in older:
                self._quarantine_file(db, self.root / "uploads" / old[1],
                                      f"an older upload of client {cid!r} found while rebuilding the index")
            db.execute("INSERT INTO uploads VALUES (?, ?, ?, ?, ?)", (cid, f"uploads/{name}", digest, n_examples, mtime))
            if node is not None:  # a binding the old index held is kept (carried over by rebuild_index)
                db.execute("INSERT OR IGNORE INTO bindings VALUES (?, ?, ?, ?)", (cid, node, mtime, run))
        if by_client:
            log.warning("the index of the store at %s held no uploads: rebuilt %d entries from the "
                        "upload files", self.root, len(by_client))

    def _quarantine_file(self, db: sqlite3.Connection, path: Path, reason: str) -> None:
        """Move a file no row points to into quarantine/ and record why (never delete it); its
        header, where readable, names the client."""
        try:
            _, meta = peek_tensors(path)
        except FedfuseError:
            meta = {}
        cid, n_examples = meta.get("client_id"), meta.get("n_examples")
        dest = self.root / "quarantine" / path.name
        dest.parent.mkdir(exist_ok=True)
        os.replace(path, dest)
        fsync_dir(dest.parent)
        db.execute("INSERT OR REPLACE INTO quarantined VALUES (?, ?, ?, ?, ?, ?)",
                   (f"quarantine/{dest.name}", cid if isinstance(cid, str) else None,
                    n_examples if isinstance(n_examples, int) else None, dest.stat().st_mtime, reason,
                    time.time()))
        log.warning("quarantined %s: %s", dest, reason)

    def _collect_superseded(self) -> None:
        """Delete the files superseded entries left behind, if no reader (in any process) holds
        the shared lock now, so none can still be reading one; otherwise the next write that
        supersedes a file, or the next opening of the store, does it."""
        with open(self.root / READERS_LOCK, "rb") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return
            with self._db() as db:
                for (rel,) in db.execute("SELECT file FROM superseded").fetchall():
                    (self.root / rel).unlink(missing_ok=True)
                db.execute("DELETE FROM superseded")

    @contextmanager
    def _snapshot(self) -> Iterator[sqlite3.Connection]:
        """A read transaction during which every file its rows name stays in place: the shared
        lock keeps writers from deleting superseded files until it is released."""
        with open(self.root / READERS_LOCK, "rb") as lock:
            fcntl.flock(lock, fcntl.LOCK_SH)
            with self._db(write=False) as db:
                yield db

    @contextmanager
    def _db(self, write: bool = True) -> Iterator[sqlite3.Connection]:
        """One transaction; a write one takes SQLite's write lock at once (no upgrade deadlocks)."""
        db = sqlite3.connect(self.root / "index.sqlite", timeout=30, isolation_level=None)
        try:
            db.execute("PRAGMA synchronous=FULL")
            db.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield db
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        finally:
            db.close()

    # -- uploads --------------------------------------------------------------------------------
    @_storage_errors
    def put(self, upload: Upload, node: str | None = None, run: str | None = None) -> None:
        """Store (or replace) one client's upload; returns once it is durable. ``node``: the
        identity of the device that sent it. The first device to upload a client id is bound to
        it; an upload under that id from any other device is refused (MessageRejected). A
        binding made with ``run`` (a simulation's, whose nodes get new keys every run) holds for
        that run only. Without ``node`` (the operator's own upload) nothing is bound or checked."""
        refused = self.put_many([upload], nodes=[node], run=run)[0]
        if refused is not None:
            raise refused

    @_storage_errors
    def put_many(self, uploads: Sequence[Upload], nodes: Sequence[str | None] | None = None,
                 run: str | None = None) -> list[MessageRejected | None]:
        """Store (or replace) a round's uploads, ``nodes[i]`` the device that sent ``uploads[i]``
        (bound and checked as in :meth:`put`); returns once every stored one is durable, with
        the reason each refused one was not stored (``None`` where it was). Each file is written
        and fsynced, the folder fsynced once and every row switched in one SQLite transaction:
        one commit per round instead of one per upload (29 ms each on the 2-core machine). A later
        upload of the same client in one call supersedes the earlier."""
        nodes = list(nodes) if nodes is not None else [None] * len(uploads)
        refused: list[MessageRejected | None] = []
        written: list[tuple[int, Upload, str | None, Path, str]] = []
        for i, (upload, node) in enumerate(zip(uploads, nodes, strict=True)):
            try:
                tensors = _as_stored(upload)
            except MessageRejected as exc:
                refused.append(exc)
                continue
            refused.append(None)
            key = hashlib.sha256(upload.client_id.encode()).hexdigest()[:32]
            rel = f"uploads/{key}-{uuid.uuid4().hex[:12]}.safetensors"
            meta: dict[str, Any] = {"client_id": upload.client_id, "spec": upload.spec.to_dict(),
                                    "n_examples": upload.n_examples}
            if node is not None:
                meta |= {"node": node, "run": run}
            path = save_tensors(self.root / rel, tensors, meta, sync_dir=False)
            written.append((i, upload, node, path, rel))
        if not written:
            return refused
        fsync_dir(self.root / "uploads")  # every file's name is durable before a row names it
        superseded = False
        with self._db() as db:
            for i, upload, node, path, rel in written:
                if node is not None:
                    try:
                        self._bind(db, upload.client_id, node, run)
                    except MessageRejected as exc:
                        refused[i] = exc
                        path.unlink()  # no row names it, and none ever will
                        continue
                row = db.execute("SELECT file FROM uploads WHERE client_id = ?", (upload.client_id,)).fetchone()
                db.execute(
                    "INSERT INTO uploads VALUES (?, ?, ?, ?, ?) ON CONFLICT(client_id) DO UPDATE SET "
                    "file=excluded.file, sha256=excluded.sha256, n_examples=excluded.n_examples, "
                    "received=excluded.received",
                    (upload.client_id, rel, _sha256(path), upload.n_examples, time.time()),
                )
                if row:
                    db.execute("INSERT INTO superseded VALUES (?, ?)", (row[0], time.time()))
                    superseded = True
        if superseded:
            self._collect_superseded()
        return refused

    @staticmethod
    def _bind(db: sqlite3.Connection, client_id: str, node: str, run: str | None) -> None:
        """Bind ``client_id`` to ``node`` unless a binding in force names another device."""
        bound = db.execute("SELECT node FROM bindings WHERE client_id = ? AND (run IS NULL OR run IS ?)",
                           (client_id, run)).fetchone()
        if bound is not None and bound[0] != node:
            raise bound_elsewhere(client_id)
        if bound is None:
            db.execute("INSERT OR REPLACE INTO bindings VALUES (?, ?, ?, ?)", (client_id, node, time.time(), run))

    @_storage_errors
    def bindings(self, run: str | None = None) -> dict[str, str]:
        """Client id -> the identity of the device it is bound to, for the bindings in force in
        ``run``: the lasting ones, and those a simulation made in that run."""
        with self._db(write=False) as db:
            rows = db.execute("SELECT client_id, node FROM bindings WHERE run IS NULL OR run IS ?", (run,))
            return dict(rows.fetchall())

    @_storage_errors
    def ids(self) -> list[str]:
        with self._db(write=False) as db:
            return [r[0] for r in db.execute("SELECT client_id FROM uploads ORDER BY client_id")]

    @_storage_errors
    def zoo(self) -> ModelZoo:
        """Every usable stored upload as one zoo. An entry whose file is missing, unreadable,
        changed since it was stored (hash), non-finite or of another architecture than most is
        skipped, logged and listed by :meth:`unreadable`: one bad entry must not block every fit."""
        n_rows, spec, loaded, problems = self._usable()
        self._unreadable = problems
        for p in problems:
            log.warning("skipped a stored upload: %s", p)
        if not n_rows:
            raise ZooError(f"the store at {self.root} holds no uploads yet: run the collect phase first")
        if not loaded:
            raise ZooError(f"the store at {self.root} holds {n_rows} uploads but none is usable "
                           f"({problems[0]}, ...): `fedfuse store verify {self.root}` lists every problem")
        return ModelZoo.from_models(spec, loaded)

    def _usable(self) -> tuple[int, Architecture | None, list[tuple[str, torch.Tensor, torch.Tensor, int]],
                               list[StoreProblem]]:
        """Read in one snapshot: the number of entries, the zoo's architecture, the ``(client_id,
        weights, tau, n_examples)`` of every usable entry and the problems of the others."""
        with self._snapshot() as db:
            rows = db.execute("SELECT client_id, file, sha256, n_examples FROM uploads "
                              "ORDER BY client_id").fetchall()
            entries = [self._read_entry(cid, rel, digest) for cid, rel, digest, _ in rows]
        problems = [e for e in entries if isinstance(e, StoreProblem)]
        good = [(row, e) for row, e in zip(rows, entries) if not isinstance(e, StoreProblem)]
        if not good:
            return len(rows), None, [], sorted(problems, key=lambda p: p.file)
        # the zoo's architecture and descriptor length are those most entries have
        spec, tau_dim = Counter((s, tau.numel()) for _, (s, _, tau) in good).most_common(1)[0][0]
        loaded = []
        for (cid, rel, _, n_examples), (s, w, tau) in good:
            if (s, tau.numel()) == (spec, tau_dim):
                loaded.append((cid, w, tau, n_examples))
            else:
                problems.append(StoreProblem(cid, rel, f"architecture {s} with descriptors of "
                                             f"length {tau.numel()} differs from the zoo's ({spec}, "
                                             f"length {tau_dim}), which most entries have"))
        return len(rows), spec, loaded, sorted(problems, key=lambda p: p.file)

    def unreadable(self) -> list[StoreProblem]:
        """The entries the last :meth:`zoo` skipped, each with its reason."""
        return list(self._unreadable)

    def _read_entry(self, cid: str, rel: str, digest: str) -> tuple[Architecture, torch.Tensor, torch.Tensor] | StoreProblem:
        """One entry's architecture, weights and descriptor, checked; or why it is unusable."""
        read = self._read_file(rel, digest)
        if isinstance(read, str):
            return StoreProblem(cid, rel, read)
        tensors, meta = read
        try:
            spec = architectures.from_dict(meta.get("spec"))
        except FedfuseError as exc:
            return StoreProblem(cid, rel, str(exc))
        if meta.get("client_id") != cid:
            return StoreProblem(cid, rel, f"its header names client {meta.get('client_id')!r}")
        try:
            return spec, *_checked(cid, spec, tensors.get("weights"), tensors.get("tau"))
        except FedfuseError as exc:
            return StoreProblem(cid, rel, str(exc))

    def _read_file(self, rel: str, digest: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | str:
        """A stored file's tensors and header, read once and checked against the hash its index
        row recorded; or what is wrong with it."""
        path = self.root / rel
        try:
            data = path.read_bytes()
        except OSError as exc:
            return f"cannot be read: {exc.strerror or exc}"
        if hashlib.sha256(data).hexdigest() != digest:
            return "does not match its index entry: the file changed after it was stored"
        try:
            return parse_tensors(data, path)
        except FedfuseError as exc:
            return str(exc)

    # -- the operator's view ----------------------------------------------------------------------
    @_storage_errors
    def entries(self) -> list[StoreEntry]:
        """Every entry, in the zoo (by client id) or quarantined (oldest first), with the
        descriptor its file holds; no hash check (that is :meth:`verify`)."""
        def descriptor(rel: str) -> tuple[list[float] | None, str]:
            try:
                return peek_tensors(self.root / rel, ("tau",))[0]["tau"].tolist(), ""
            except FedfuseError as exc:
                return None, str(exc)

        with self._snapshot() as db:
            live = db.execute("SELECT client_id, file, received, n_examples FROM uploads ORDER BY client_id").fetchall()
            held = db.execute("SELECT client_id, file, received, n_examples, reason FROM quarantined "
                              "ORDER BY quarantined").fetchall()
            out = []
            for cid, rel, received, n_examples in live:
                tau, error = descriptor(rel)
                out.append(StoreEntry(cid, rel, received, n_examples, tau, "unreadable" if error else "ok", error))
            for cid, rel, received, n_examples, reason in held:
                out.append(StoreEntry(cid, rel, received, n_examples, descriptor(rel)[0], "quarantined", reason))
        return out

    @_storage_errors
    def verify(self) -> list[StoreProblem]:
        """Whatever would keep an entry out of the zoo (a missing, changed, unreadable or
        non-finite file, a minority architecture) and a damaged meta-model file; empty when all
        is well."""
        problems = self._usable()[3]
        with self._snapshot() as db:
            row = db.execute("SELECT file, sha256 FROM meta_model WHERE id = 1").fetchone()
            read = self._read_file(*row) if row else None
        if isinstance(read, str):
            problems.append(StoreProblem(None, row[0], f"the meta-model {read}"))
        return problems

    @_storage_errors
    def quarantine(self, client_id: str, reason: str) -> None:
        """Take a client's entry out of the zoo; its file is kept under quarantine/ and
        :meth:`entries` lists it with ``reason``. A later upload from the client is judged afresh."""
        self._retire(client_id, reason)

    @_storage_errors
    def remove(self, client_id: str) -> None:
        """Drop a client's entry (`fedfuse store rm`); its file is kept under quarantine/. The
        id is released: the next device to upload it is bound to it (the way back for a device
        that lost its key and was registered anew)."""
        self._retire(client_id, None)

    def _retire(self, client_id: str, reason: str | None) -> None:
        """Link the entry's file into quarantine/ and drop its row in one transaction; the old
        name goes the way of superseded files, since a reader may still be reading it."""
        with self._db() as db:
            row = db.execute("SELECT file, n_examples, received FROM uploads WHERE client_id = ?",
                             (client_id,)).fetchone()
            if row is None:
                raise FedfuseError(f"the store at {self.root} has no entry for client {client_id!r}: "
                                   f"`fedfuse store ls {self.root}` lists them")
            src = self.root / row[0]
            dest = self.root / "quarantine" / src.name
            dest.parent.mkdir(exist_ok=True)
            try:
                os.link(src, dest)
            except FileNotFoundError:
                log.warning("the file %s of client %r was already gone", src, client_id)
            except FileExistsError:  # linked by an earlier try that did not commit
                if not os.path.samefile(src, dest):
                    raise
            fsync_dir(dest.parent)
            db.execute("DELETE FROM uploads WHERE client_id = ?", (client_id,))
            db.execute("INSERT INTO superseded VALUES (?, ?)", (row[0], time.time()))
            if reason is None:
                db.execute("DELETE FROM bindings WHERE client_id = ?", (client_id,))
            else:
                db.execute("INSERT OR REPLACE INTO quarantined VALUES (?, ?, ?, ?, ?, ?)",
                           (f"quarantine/{dest.name}", client_id, row[1], row[2], reason, time.time()))
        self._collect_superseded()
        if reason is None:
            log.info("removed the entry of client %r; its file is kept as %s", client_id, dest)
        else:
            log.warning("quarantined the entry of client %r (%r); its file is kept as %s", client_id, reason, dest)

    # -- meta-model -----------------------------------------------------------------------------
    @_storage_errors
    def save_meta_model(self, model: MetaModel) -> Path:
        rel = f"meta_model-{uuid.uuid4().hex[:12]}.safetensors"
        path = self.root / rel
        model.save(path)
        with self._db() as db:
            row = db.execute("SELECT file FROM meta_model WHERE id = 1").fetchone()
            db.execute("INSERT OR REPLACE INTO meta_model VALUES (1, ?, ?, ?, ?)",
                       (rel, _sha256(path), len(model.ids_), time.time()))
            if row:
                db.execute("INSERT INTO superseded VALUES (?, ?)", (row[0], time.time()))
        if row:
            self._collect_superseded()
        return path

    @_storage_errors
    def meta_model_entry(self) -> MetaModelEntry | None:
        """The current meta-model's index row (``None`` before the first fit): one cheap query,
        so that a server can poll it for a new fit."""
        with self._db(write=False) as db:
            row = db.execute("SELECT file, sha256, n_models, fitted FROM meta_model WHERE id = 1").fetchone()
        return None if row is None else MetaModelEntry(*row)

    @_storage_errors
    def load_meta_model(self, pmap: ParallelMap | None = None) -> MetaModel:
        return self.load_meta_model_entry(pmap)[0]

    @_storage_errors
    def load_meta_model_entry(self, pmap: ParallelMap | None = None) -> tuple[MetaModel, MetaModelEntry]:
        """The current meta-model with the index row it was read under, in one snapshot: the
        row's sha256 names exactly the model returned (its version), even while a fit lands."""
        with self._snapshot() as db:
            row = db.execute("SELECT file, sha256, n_models, fitted FROM meta_model WHERE id = 1").fetchone()
            if row is None:
                raise NotFittedError(f"no fitted meta-model in the store at {self.root}: run the fit phase first")
            entry = MetaModelEntry(*row)
            path = self.root / entry.file
            if _sha256(path) != entry.sha256:
                raise FedfuseError(f"{path} does not match its index entry")
            return MetaModel.load(path, pmap=pmap), entry

    # -- reports of rounds (who was accepted, rejected, failed, excluded) -----------------------
    @_storage_errors
    def record_round(self, phase: str, report: dict[str, Any]) -> None:
        with self._db() as db:
            db.execute("INSERT INTO rounds (phase, payload, finished) VALUES (?, ?, ?)",
                       (phase, json.dumps(report), time.time()))

    @_storage_errors
    def rounds(self, phase: str | None = None) -> list[dict[str, Any]]:
        with self._db(write=False) as db:
            q = "SELECT phase, payload FROM rounds" + (" WHERE phase = ?" if phase else "") + " ORDER BY id"
            rows = db.execute(q, (phase,) if phase else ()).fetchall()
        return [{"phase": p, **json.loads(payload)} for p, payload in rows]

    # -- personalization metrics ----------------------------------------------------------------
    @_storage_errors
    def record_metrics(self, client_id: str, run: str, metrics: dict[str, Any]) -> None:
        with self._db() as db:
            db.execute("INSERT OR REPLACE INTO metrics VALUES (?, ?, ?, ?)",
                       (client_id, run, json.dumps(metrics), time.time()))

    @_storage_errors
    def metrics(self, run: str | None = None) -> dict[str, dict[str, Any]]:
        with self._db(write=False) as db:
            q = "SELECT client_id, payload FROM metrics" + (" WHERE run = ?" if run else "")
            rows = db.execute(q, (run,) if run else ()).fetchall()
        return {cid: json.loads(p) for cid, p in rows}


def rebuild_index(root: str | os.PathLike) -> ModelStore:
    """Set a damaged or suspect index aside as ``index.sqlite.bak`` and rebuild the uploads from
    the files, as when an index is lost. What the files cannot tell (rounds, metrics, quarantine
    records, files awaiting deletion, the meta-model entry) is copied from the old index as far as
    it can still be read. Run it with the server stopped: a process that has the old index open
    would go on writing to it."""
    root = Path(root).resolve()
    index, backup = root / "index.sqlite", root / "index.sqlite.bak"
    if backup.exists():
        raise StoreError(f"{backup} already exists (an earlier rebuild's backup): move it away, then rebuild again")
    try:
        for suffix in ("", "-wal", "-shm"):  # SQLite finds a database's log by its name
            if (root / f"index.sqlite{suffix}").exists():
                os.replace(root / f"index.sqlite{suffix}", root / f"index.sqlite.bak{suffix}")
        fsync_dir(root)
        _carry_over(backup, index)
    except (OSError, sqlite3.Error) as exc:
        raise StoreError(f"could not set the index {index} aside and start a new one: {exc}; check "
                         "that the store folder is writable") from exc
    return ModelStore(root)


def _carry_over(backup: Path, index: Path) -> None:
    """A new index holding the old one's tables that the files cannot rebuild, table by table,
    as far as the old one is readable; a meta-model entry only if its file is still there."""
    db = sqlite3.connect(index, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.executescript(SCHEMA)
        if not backup.exists():
            return
        try:
            db.execute("ATTACH DATABASE ? AS old", (str(backup),))
            db.execute("SELECT count(*) FROM old.sqlite_master")
        except sqlite3.DatabaseError as exc:
            log.warning("the old index %s is unreadable (%s): rounds, metrics and quarantine records "
                        "are not carried over", backup, exc)
            return
        for table in ("rounds", "metrics", "quarantined", "superseded", "meta_model", "bindings"):
            try:
                db.execute(f"INSERT OR IGNORE INTO main.{table} SELECT * FROM old.{table}")
            except sqlite3.DatabaseError as exc:
                log.warning("table %s of the old index %s is not carried over: %s", table, backup, exc)
        row = db.execute("SELECT file FROM meta_model").fetchone()
        if row and not (index.parent / row[0]).is_file():
            db.execute("DELETE FROM meta_model")
    finally:
        db.close()
