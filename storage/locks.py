"""Advisory locks between ccrk processes sharing a local data root (``fcntl.flock``).

- One per artifact being produced (:func:`artifact_lock`, taken by :func:`storage.stage.run_stage`
  around a stage's ``completed``/``execute``/catalog entry): a second run of the same artifact
  waits, saying once which pid holds it, and then finds it complete (or resumes what is left);
  with ``--no-wait`` (:data:`NO_WAIT_ENV`) it stops at once with one line instead.
- One around the catalog's connections (:func:`shared_lock`: shared for reads, exclusive for
  writes, as DuckDB itself allows), so ccrk processes queue for it instead of failing on DuckDB's
  own lock.

Lock files live in ``<root>/locks/``. An artifact's holds its holder's pid (named to a waiter) and
is removed on release; the kernel drops a lock when its process dies, so a killed run never
leaves one held. Remote (fsspec) roots have no locks: object stores offer no ``flock``; nor does a
root where no lock file can be made or locked (read-only, a filesystem without locks), which is
used as it was before locks.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import re
import sys
import threading
import time
from contextlib import contextmanager
from typing import Iterator

from storage import layout
from storage.errors import CCRKError

LOCKS_DIR = "locks"
NO_WAIT_ENV = "CCRK_NO_WAIT"  # set (to 1) by ``ccrk --no-wait``: a run finding its artifact locked stops
_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]")
UNLOCKABLE = -1  # what _take returns where no lock file can be made or locked
_NO_LOCKS = (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOLCK, errno.ENOTSUP)
_held = threading.local()  # the artifact locks this thread holds: taken again inside, a no-op


def no_wait() -> bool:
    """Whether a run finding its artifact locked stops instead of waiting (:data:`NO_WAIT_ENV`)."""
    return os.environ.get(NO_WAIT_ENV, "").strip().lower() not in ("", "0", "false", "no")


def lock_file(root: str, key: str) -> str:
    """``<root>/locks/<key>.lock``, ``key`` made a plain file name (a long one shortened by a hash)."""
    name = _UNSAFE.sub("_", key.strip("/").replace("/", "+")) or "_"
    if len(name) > 180:
        name = name[:150] + "-" + hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]
    return os.path.join(root, LOCKS_DIR, f"{name}.lock")


def holder_pid(path: str) -> int | None:
    """The pid an artifact lock file names (None: unreadable, or not written yet)."""
    for _ in range(20):  # the holder writes its pid just after it takes the lock
        try:
            with open(path, encoding="ascii", errors="replace") as f:
                text = f.read().strip()
        except OSError:
            return None
        if text.isdigit():
            return int(text)
        time.sleep(0.01)
    return None


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists (one of another user counts)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def artifact_lock(root: str, path: str, what: str, wait: bool | None = None) -> Iterator[None]:
    """Hold the lock of the artifact at ``path`` (``what`` names it in messages) while the block
    runs. Held by another process: wait for it, saying so once on stderr with the holder's pid;
    ``wait=False`` (default: not :func:`no_wait`) raises a one-line CCRKError instead. A remote
    root or path is not locked."""
    if not (layout.is_local(root) and layout.is_local(path)):
        yield
        return
    lock = lock_file(root, layout.rooted(root, path))
    held = _held.__dict__.setdefault("paths", set())
    if lock in held:
        yield
        return
    wait = not no_wait() if wait is None else wait
    fd = _take(lock, exclusive=True, blocking=False)
    if fd == UNLOCKABLE:
        yield
        return
    if fd is None:
        pid = holder_pid(lock)
        holder = f"pid {pid}" if pid else "another process"
        if not wait:
            raise CCRKError(f"{what} is being produced by {holder} (lock {lock}); --no-wait ({NO_WAIT_ENV}) "
                            "is set, so not waiting: run again once it has finished")
        print(f"waiting for {holder}, which is producing {what} (lock {lock})", file=sys.stderr, flush=True)
        fd = _take(lock, exclusive=True, blocking=True)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        held.add(lock)
        yield
    finally:
        held.discard(lock)
        # Removed while held: a waiter that opened this file finds it gone and locks a new one.
        try:
            os.unlink(lock)
        except FileNotFoundError:
            pass
        os.close(fd)


@contextmanager
def shared_lock(path: str, exclusive: bool, timeout: float, what: str) -> Iterator[None]:
    """Hold the lock file ``path`` (shared, or ``exclusive``) while the block runs, waiting up to
    ``timeout`` seconds for it; the file stays (many may hold it shared). Past the wait: a one-line
    CCRKError naming ``what``. A remote path is not locked."""
    if not layout.is_local(path):
        yield
        return
    deadline = time.monotonic() + timeout
    delay = 0.01
    while (fd := _take(path, exclusive=exclusive, blocking=False)) is None:
        if time.monotonic() >= deadline:
            raise CCRKError(f"{what} stayed locked by another ccrk process for {timeout:g} s (lock {path}): "
                            "run again once it has finished")
        time.sleep(delay)
        delay = min(delay * 2, 0.25)
    if fd == UNLOCKABLE:
        yield
        return
    try:
        yield
    finally:
        os.close(fd)


def _take(path: str, exclusive: bool, blocking: bool) -> int | None:
    """An fd of ``path`` holding its flock, or None when not ``blocking`` and another holds it, or
    :data:`UNLOCKABLE` where no lock can be had (a read-only root, a filesystem without locks: the
    work goes on unlocked, as before locks). A file removed (by its releasing holder) between our
    open and our lock is opened anew."""
    op = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | (0 if blocking else fcntl.LOCK_NB)
    while True:
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            if exc.errno in _NO_LOCKS:
                return UNLOCKABLE
            raise
        try:
            fcntl.flock(fd, op)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
                return None
            if exc.errno in _NO_LOCKS:
                return UNLOCKABLE
            raise
        except BaseException:
            os.close(fd)
            raise
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)
