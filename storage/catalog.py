"""The artifact catalog: ``<root>/catalog.duckdb`` records every artifact with its parents.

Kinds: ``source``, ``translation``, ``dataset``, ``run``, ``report`` (and any later ones).
An artifact is identified by its content version; lineage is a recursive query over parents.
Connections are opened per call so that no process holds the file lock between stages. Between ccrk
processes a lock file (:func:`storage.locks.shared_lock`: shared to read, exclusive to write)
queues them; a catalog another program holds open (a DuckDB shell, a notebook) is waited for up to
:data:`CATALOG_WAIT_S` seconds (``CCRK_CATALOG_WAIT``), then one line names it and DuckDB's pid.

Paths under the root are stored relative to it, so a root that is moved, copied or mounted
elsewhere keeps working; artifacts always come back with absolute paths. (Catalogs written before
that held absolute paths: one that no longer exists is looked for under the current root.)
"""
from __future__ import annotations

import json
import os
import re
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Iterator

import duckdb

from storage import layout
from storage.errors import CCRKError
from storage.locks import lock_file, shared_lock
from storage.versioning import CODE_VERSION

CATALOG_WAIT_S = 20.0  # how long a command waits for a catalog held by another process
CATALOG_WAIT_ENV = "CCRK_CATALOG_WAIT"
_DUCKDB_LOCKED = "Could not set lock on file"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS artifacts (
    version      VARCHAR PRIMARY KEY,
    kind         VARCHAR NOT NULL,
    name         VARCHAR NOT NULL,
    path         VARCHAR NOT NULL,
    params       JSON,
    stats        JSON,
    code_version VARCHAR,
    created_at   TIMESTAMP
);
CREATE TABLE IF NOT EXISTS parents (
    child  VARCHAR NOT NULL,
    parent VARCHAR NOT NULL,
    PRIMARY KEY (child, parent)
);
"""


def catalog_wait() -> float:
    """Seconds to wait for a catalog another process holds: ``CCRK_CATALOG_WAIT``, else :data:`CATALOG_WAIT_S`."""
    value = os.environ.get(CATALOG_WAIT_ENV, "").strip()
    if not value:
        return CATALOG_WAIT_S
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:
        raise CCRKError(f"{CATALOG_WAIT_ENV}={value!r} is not a number of seconds")
    return seconds


def _waiting(open_it, path: str, wait: float, deadline: float):
    """``open_it()`` (a DuckDB connect or ATTACH of the catalog at ``path``), tried again while
    another process holds the file's lock, until ``deadline``; then one line naming the holder."""
    delay = 0.05
    while True:
        try:
            return open_it()
        except duckdb.IOException as exc:
            if _DUCKDB_LOCKED not in str(exc):
                raise
            message = str(exc)
        if time.monotonic() + delay > deadline:
            # Raised outside the except: DuckDB's error, whose frames hold the connection, is not kept with it.
            raise CCRKError(f"the catalog {path} is held open by {_holder(message)} and stayed so for {wait:g} s "
                            f"({CATALOG_WAIT_ENV} sets the wait): close it there, then run again")
        time.sleep(delay)
        delay = min(delay * 2, 1.0)


def _holder(message: str) -> str:
    """The process DuckDB's lock error names: ``pid 123 (/usr/bin/python3)``, else 'another process'."""
    m = re.search(r"held in (.+?) \(PID (\d+)\)", message)
    return f"pid {m.group(2)} ({m.group(1)})" if m else "another process"


@dataclass
class Artifact:
    version: str
    kind: str
    name: str
    path: str
    params: dict = field(default_factory=dict)
    stats: dict = field(default_factory=dict)
    parents: list[str] = field(default_factory=list)
    code_version: str = CODE_VERSION
    created_at: datetime | None = None


class Catalog:
    def __init__(self, root: str | None = None, engine: duckdb.DuckDBPyConnection | None = None):
        """``engine``: an open DuckDB connection; each call then ATTACHes the catalog to its
        instance (and DETACHes it after) instead of starting a new instance (~60 ms each)."""
        self.root = layout.data_root(root)
        self.path = layout.catalog_path(self.root)
        self.engine = engine

    @contextmanager
    def _connect(self, read_only: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
        if read_only and not os.path.exists(self.path):
            read_only = False
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        wait = catalog_wait()
        deadline = time.monotonic() + wait
        with shared_lock(lock_file(self.root, "catalog"), exclusive=not read_only, timeout=wait,
                         what=f"the catalog {self.path}"):
            if self.engine is not None:
                with self._attached(read_only, wait, deadline) as con:
                    yield con
                return
            con = _waiting(lambda: duckdb.connect(self.path, read_only=read_only), self.path, wait, deadline)
            try:
                if not read_only:
                    con.execute(_SCHEMA)
                yield con
            finally:
                con.close()

    @contextmanager
    def _attached(self, read_only: bool, wait: float, deadline: float) -> Iterator[duckdb.DuckDBPyConnection]:
        con = self.engine.cursor()
        alias = f"ccrk_catalog_{uuid.uuid4().hex[:12]}"
        try:
            home = con.execute("SELECT current_database()").fetchall()[0][0]
            path = self.path.replace("'", "''")
            _waiting(lambda: con.execute(f"ATTACH '{path}' AS {alias}" + (" (READ_ONLY)" if read_only else "")),
                     self.path, wait, deadline)
            try:
                con.execute(f"USE {alias}")
                if not read_only:
                    con.execute(_SCHEMA)
                yield con
            finally:
                try:
                    con.execute("ROLLBACK")  # a transaction the body left open (it failed)
                except duckdb.Error:
                    pass
                con.execute(f"USE {home}")
                con.execute(f"DETACH {alias}")
        finally:
            con.close()

    def record(self, artifact: Artifact) -> Artifact:
        """Insert or replace one artifact and its parent edges."""
        created = artifact.created_at or datetime.now(timezone.utc).replace(tzinfo=None)
        with self._connect() as con:
            con.execute("BEGIN")
            con.execute("DELETE FROM artifacts WHERE version = ?", [artifact.version])
            con.execute("DELETE FROM parents WHERE child = ?", [artifact.version])
            con.execute(
                "INSERT INTO artifacts VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [artifact.version, artifact.kind, artifact.name, layout.rooted(self.root, artifact.path),
                 json.dumps(artifact.params, default=str), json.dumps(artifact.stats, default=str),
                 artifact.code_version, created],
            )
            for parent in sorted(set(artifact.parents)):
                con.execute("INSERT INTO parents VALUES (?, ?)", [artifact.version, parent])
            con.execute("COMMIT")
        artifact.created_at = created
        return artifact

    def get(self, version: str) -> Artifact | None:
        with self._connect(read_only=True) as con:
            row = con.execute("SELECT * FROM artifacts WHERE version = ?", [version]).fetchone()
            if row is None:
                return None
            parents = [r[0] for r in con.execute(
                "SELECT parent FROM parents WHERE child = ? ORDER BY parent", [version]).fetchall()]
        return self._artifact(row, parents)

    def find(self, prefix: str) -> Artifact | None:
        """An artifact by version or unique version prefix."""
        with self._connect(read_only=True) as con:
            # starts_with, not LIKE: a '_' or '%' in the prefix is a character, not a wildcard.
            rows = con.execute("SELECT version FROM artifacts WHERE starts_with(version, ?)", [prefix]).fetchall()
        if len(rows) != 1:
            return None
        return self.get(rows[0][0])

    def latest(self, kind: str, name: str) -> Artifact | None:
        """The most recently recorded artifact of this kind and name."""
        with self._connect(read_only=True) as con:
            row = con.execute("SELECT version FROM artifacts WHERE kind = ? AND name = ? "
                              "ORDER BY created_at DESC LIMIT 1", [kind, name]).fetchone()
        return self.get(row[0]) if row else None

    def list(self, kind: str | None = None) -> list[Artifact]:
        with self._connect(read_only=True) as con:
            if kind:
                rows = con.execute("SELECT * FROM artifacts WHERE kind = ? ORDER BY created_at", [kind]).fetchall()
            else:
                rows = con.execute("SELECT * FROM artifacts ORDER BY created_at").fetchall()
            edges = con.execute("SELECT child, parent FROM parents ORDER BY parent").fetchall()
        by_child: dict[str, list[str]] = {}
        for child, parent in edges:
            by_child.setdefault(child, []).append(parent)
        return [self._artifact(r, by_child.get(r[0], [])) for r in rows]

    def _resolved_path(self, stored: str) -> str:
        """A recorded path made absolute: a relative one lies under the root. An absolute one that
        does not exist (a catalog written with absolute paths, whose root has since moved) is
        looked for under the root by its longest tail of at least two parts that exists there."""
        if not layout.is_local(stored):
            return stored
        if not os.path.isabs(stored):
            return layout.join(self.root, stored)
        if layout.is_local(self.root) and not os.path.exists(stored):
            parts = [p for p in stored.split(os.sep) if p]
            for i in range(1, len(parts) - 1):
                moved = os.path.join(self.root, *parts[i:])
                if os.path.exists(moved):
                    return moved
        return stored

    def _artifact(self, row, parents) -> Artifact:
        version, kind, name, path, params, stats, code_version, created = row
        return Artifact(version=version, kind=kind, name=name, path=self._resolved_path(path),
                        params=json.loads(params) if params else {}, stats=json.loads(stats) if stats else {},
                        parents=list(parents), code_version=code_version, created_at=created)

    def lineage(self, version: str) -> list[tuple[int, Artifact]]:
        """(depth, artifact) from the artifact itself (depth 0) back to its sources."""
        out: list[tuple[int, Artifact]] = []
        seen: set[str] = set()
        frontier = [(0, version)]
        while frontier:
            depth, v = frontier.pop(0)
            if v in seen:
                continue
            seen.add(v)
            art = self.get(v)
            if art is None:
                continue
            out.append((depth, art))
            frontier.extend((depth + 1, p) for p in art.parents)
        return out
