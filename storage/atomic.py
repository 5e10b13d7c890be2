"""Atomic writes: a file is either absent or complete, never half-written (kill -9 safe).

Local paths: write to a temporary sibling, fsync, then ``os.replace``. Remote fsspec paths rely
on the object store's whole-object PUT semantics.

Temporary names are unique per process and per write: ``.tmp-<pid>-<random>-<name>``
(:func:`temp_path`), so two runs writing the same file never write one temporary file; a killed
run's are found by :func:`stale_temps` (their pid is gone), never a live run's. A write that finds
the disk full raises ``OSError(ENOSPC)`` naming the file it was writing.
"""
from __future__ import annotations

import errno
import json
import os
import re
import tempfile
from contextlib import contextmanager
from typing import Iterator

from storage import layout
from storage.locks import pid_alive

TEMP_PREFIX = ".tmp-"
# .tmp-<pid>-<random>-<name> (and .tmp-<pid>-<name>, an older ccrk's staging files); .tmp-<name> names no pid.
_TEMP = re.compile(r"\.tmp-(?P<pid>\d+)-.+")


def temp_path(path: str) -> str:
    """A temporary sibling of ``path`` no other process or write uses: ``.tmp-<pid>-<random>-<name>``."""
    return os.path.join(os.path.dirname(path), f"{TEMP_PREFIX}{os.getpid()}-{os.urandom(4).hex()}-"
                                               f"{os.path.basename(path)}")


def stale_temps(directory: str) -> list[str]:
    """The temporary files in ``directory`` left by writers that are gone: their pid is not alive,
    or they name none (an older ccrk's). A live run's are never among them."""
    try:
        entries = sorted(os.listdir(directory))
    except FileNotFoundError:
        return []
    out = []
    for entry in entries:
        if entry.startswith(TEMP_PREFIX):
            m = _TEMP.fullmatch(entry)
            if m is None or not pid_alive(int(m.group("pid"))):
                out.append(os.path.join(directory, entry))
    return out


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` is the disk being full: ENOSPC, or its message (pyarrow's, DuckDB's) saying so."""
    return getattr(exc, "errno", None) == errno.ENOSPC or os.strerror(errno.ENOSPC) in str(exc)


@contextmanager
def naming_full_disk(path: str) -> Iterator[None]:
    """The disk found full inside the block (an error naming no file) is raised as
    ``OSError(ENOSPC)`` naming ``path``, the file being written."""
    try:
        yield
    except Exception as exc:
        if not is_disk_full(exc) or getattr(exc, "filename", None) is not None:
            raise
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path) from exc


@contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yield a temporary path to write; it replaces ``path`` only if the block succeeds."""
    if not layout.is_local(path):
        yield path
        return
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{os.getpid()}-", suffix=f"-{os.path.basename(path)}",
                               dir=directory)
    os.close(fd)
    # mkstemp creates 0600; give the final file the usual umask-derived mode.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        with naming_full_disk(path):
            yield tmp
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_bytes(path: str, data: bytes) -> None:
    with atomic_path(path) as tmp:
        import fsspec  # third-party, ~80 ms to import: only when a file is written

        with fsspec.open(tmp, "wb") as f:
            f.write(data)


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False, default=str) + "\n")


def write_parquet(table, path: str) -> None:
    """Write a pyarrow Table or pandas DataFrame as parquet, atomically."""
    import pyarrow as pa  # third-party: atomic is imported by modules that never write parquet
    import pyarrow.parquet as pq

    if not isinstance(table, pa.Table):
        table = pa.Table.from_pandas(table, preserve_index=False)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
