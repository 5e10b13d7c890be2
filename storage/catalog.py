"""The artifact catalog: ``<root>/catalog.duckdb`` records every artifact with its parents.

Kinds: ``source``, ``translation``, ``dataset``, ``run``, ``report`` (and any later ones).
An artifact is identified by its content version; lineage is a recursive query over parents.
Connections are opened per call so that no process holds the file lock between stages.

Paths under the root are stored relative to it, so a root that is moved, copied or mounted
elsewhere keeps working; artifacts always come back with absolute paths. (Catalogs written before
that held absolute paths: one that no longer exists is looked for under the current root.)
"""
from __future__ import annotations

import json
import os
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Iterator

import duckdb

from storage import layout
from storage.versioning import CODE_VERSION

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
        if self.engine is not None:
            with self._attached(read_only) as con:
                yield con
            return
        con = duckdb.connect(self.path, read_only=read_only)
        try:
            if not read_only:
                con.execute(_SCHEMA)
            yield con
        finally:
            con.close()

    @contextmanager
    def _attached(self, read_only: bool) -> Iterator[duckdb.DuckDBPyConnection]:
        con = self.engine.cursor()
        alias = f"ccrk_catalog_{uuid.uuid4().hex[:12]}"
        try:
            home = con.execute("SELECT current_database()").fetchall()[0][0]
            path = self.path.replace("'", "''")
            con.execute(f"ATTACH '{path}' AS {alias}" + (" (READ_ONLY)" if read_only else ""))
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
            rows = con.execute("SELECT version FROM artifacts WHERE version LIKE ? || '%'", [prefix]).fetchall()
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
