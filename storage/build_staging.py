"""What the build's steps share: the dataset directory's file names, staging files written
under a temporary name (unique per process and write: :func:`storage.atomic.temp_path`) then
renamed, and DuckDB connections."""
from __future__ import annotations

import json
import os
from contextlib import contextmanager

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from storage.atomic import naming_full_disk, temp_path
from storage.errors import CCRKError

COMPLETE = "_COMPLETE"
MANIFEST = "manifest.duckdb"
STAGING = "_build"
WIDS_INDEX = "wids-index.json"
SIZES = "sizes.json"
BOX_COLUMNS = ("region_id", "x", "y", "w", "h")  # a caption's region, when its source has them


def write_staging(path: str, write) -> None:
    """Write a staging file under a temporary name, then rename: a killed build never leaves a
    half-written one. No fsync -- staging only spares work on resume; a lost file is rebuilt."""
    tmp = temp_path(path)
    try:
        with naming_full_disk(path):
            write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_staging_json(path: str, obj) -> None:
    data = json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False, default=str).encode("utf-8")

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(data)

    write_staging(path, write)


@contextmanager
def duckdb_cursor(engine=None):
    """A connection to ``engine``'s DuckDB instance (a cursor), or to a new one when None (creating
    an instance costs ~13 ms: one per step, not one per catalog or manifest call); closed after."""
    con = duckdb.connect() if engine is None else engine.cursor()
    try:
        yield con
    finally:
        con.close()


def parquet_columns(files: list[str]) -> set[str]:
    """The union of the parquet files' column names (footers only)."""
    out: set[str] = set()
    for f in files:
        try:
            out.update(pq.read_schema(f).names)
        except (OSError, pa.ArrowException) as exc:
            raise CCRKError(f"{f} is not a readable parquet file: {exc}") from exc
    return out


def arrow_table(rel) -> pa.Table:
    out = rel.arrow()
    return out if isinstance(out, pa.Table) else out.read_all()
