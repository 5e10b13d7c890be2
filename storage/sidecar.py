"""Values computed from a file's bytes, cached in a hidden sidecar file beside it.

A build reads facts about its inputs that only change when the input does: where each image lies
in a source tar, the sha256 of a translation part. Computing them again on every build costs a
scan of the inputs (at CC3M's scale, gigabytes), and a no-op rebuild should cost nothing of the
sort. :func:`cached_beside` keeps such a value in ``.<file name>.<tag>.json`` next to the file,
stamped with the file's identity (size, mtime, ctime and inode, plus the caller's format
version). The value is used only while the stamp matches: any write to the file, or a copy of it,
moves its ctime or inode, and the value is computed afresh. Sidecars are written atomically (a
temporary name, then a rename) and are hidden, so no ``part-*`` or ``*.tar`` glob sees them. Where
the directory is read-only the value is simply not kept.
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable


def sidecar_path(path: str, tag: str) -> str:
    return os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{tag}.json")


def file_stamp(path: str, version: int = 1) -> list[int] | None:
    """What identifies this state of ``path``'s bytes; None when it is not there."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [version, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def cached_beside(path: str, tag: str, compute: Callable[[str], Any], version: int = 1,
                  valid: Callable[[Any], bool] = lambda value: True) -> Any:
    """``compute(path)`` (a JSON value), from the sidecar when it was made from these very bytes
    and ``valid`` accepts it; else computed and, where the directory allows, stored. ``version``:
    the value's format (bump it to ignore older sidecars)."""
    stamp = file_stamp(path, version)
    cache = sidecar_path(path, tag)
    if stamp is not None:
        try:
            with open(cache, "rb") as f:
                kept = json.loads(f.read())
            if kept["stamp"] == stamp and valid(kept["value"]):
                return kept["value"]
        except (OSError, ValueError, KeyError, TypeError):
            pass
    value = compute(path)
    if stamp is None or file_stamp(path, version) != stamp:  # changed while it was read: not kept
        return value
    # Unique per writer (threads of one process may build at once); renamed over the sidecar.
    tmp = os.path.join(os.path.dirname(cache), f".tmp-{os.getpid()}-{os.urandom(4).hex()}-{os.path.basename(cache)}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(json.dumps({"stamp": stamp, "value": value}))
        os.replace(tmp, cache)
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass
    return value
