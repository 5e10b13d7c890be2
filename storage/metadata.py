"""Resolve ``--metadata`` specs to local files: download urls, unpack archives safely.

A spec is a local file, a local directory (all files under it), or an http(s) url, of an official
metadata file or of the archive it ships in (``.zip``, ``.tar.gz`` / ``.tgz``, ``.tar``).

- Urls download once into ``<cache_dir>/url-<sha256(url)[:16]>/<file name>`` (streamed to a
  temporary file, renamed into place when complete, so a killed download is redone, never used).
- Archives extract into ``<cache_dir>/extract-<sha256(archive)[:16]>/`` (again via a temporary
  directory renamed when complete). Members with absolute paths, ``..`` components, links or
  devices are refused: :class:`CCRKError` naming the member; nothing is written outside.
- Anything missing, unreadable or failing to download: :class:`CCRKError` naming it.
"""
from __future__ import annotations

import fnmatch
import hashlib
import os
import shutil
import stat
import tarfile
import tempfile
import zipfile
from typing import Iterable
from urllib.parse import unquote, urlsplit

from storage.errors import CCRKError

ARCHIVE_SUFFIXES = (".zip", ".tar.gz", ".tgz", ".tar")
DOWNLOAD_TIMEOUT_S = (15, 120)  # connect, read
_CHUNK = 1 << 20


def resolve_metadata(specs: Iterable[str], cache_dir: str, keep: Iterable[str] | None = None) -> list[str]:
    """Local paths of the metadata files named by ``specs`` (archives replaced by their members).

    ``keep``: optional file-name patterns (fnmatch, on the base name); archive members not
    matching any are not extracted (the COCO archive also holds 800 MB of instance annotations).
    """
    patterns = tuple(keep) if keep else None
    out: list[str] = []
    for spec in specs:
        spec = str(spec)
        path = _download(spec, cache_dir) if _is_url(spec) else _local(spec)
        for f in _expand(path):
            if is_archive(f):
                out += extract_archive(f, cache_dir, patterns)
            else:
                out.append(f)
    # Keep order, drop repeats (the same file named twice).
    return list(dict.fromkeys(out))


def is_archive(path: str) -> bool:
    return path.lower().endswith(ARCHIVE_SUFFIXES)


def _is_url(spec: str) -> bool:
    return "://" in spec and not spec.startswith("file://")


def _local(spec: str) -> str:
    path = spec[len("file://"):] if spec.startswith("file://") else spec
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.exists(path):
        raise CCRKError(f"metadata not found: {spec}")
    if not os.path.isdir(path) and not os.access(path, os.R_OK):
        raise CCRKError(f"metadata file is not readable: {spec}")
    return path


def _expand(path: str) -> list[str]:
    if not os.path.isdir(path):
        return [path]
    files = []
    for d, dirs, names in os.walk(path):
        dirs.sort()
        files += [os.path.join(d, n) for n in sorted(names) if not n.startswith(".")]
    if not files:
        raise CCRKError(f"metadata directory is empty: {path}")
    return files


# --------------------------------------------------------------------------- download


def _download(url: str, cache_dir: str) -> str:
    import requests  # third-party, ~70 ms to import: only when metadata is downloaded

    parts = urlsplit(url)
    if parts.scheme.lower() not in ("http", "https") or not parts.netloc:
        raise CCRKError(f"metadata url must be http(s): {url}")
    name = os.path.basename(unquote(parts.path)) or "index"
    d = os.path.join(cache_dir, "url-" + hashlib.sha256(url.encode("utf-8")).hexdigest()[:16])
    dest = os.path.join(d, name)
    if os.path.exists(dest):
        return dest
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".part-", dir=d)
    try:
        with os.fdopen(fd, "wb") as f:
            try:
                with requests.get(url, stream=True, timeout=DOWNLOAD_TIMEOUT_S) as r:
                    if r.status_code != 200:
                        raise CCRKError(f"could not download metadata {url}: HTTP {r.status_code}")
                    for block in r.iter_content(_CHUNK):
                        f.write(block)
                    expected = r.headers.get("Content-Length")
            except requests.RequestException as exc:
                raise CCRKError(f"could not download metadata {url}: {_reason(exc)}") from None
            f.flush()
            os.fsync(f.fileno())
            size = f.tell()
        if expected is not None and r.headers.get("Content-Encoding") in (None, "identity") \
                and int(expected) != size:
            raise CCRKError(f"could not download metadata {url}: got {size} of {expected} bytes")
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dest


def _reason(exc: Exception) -> str:
    """A few words for a failed request (requests' own messages run to several lines)."""
    import requests  # third-party: as in _download

    for kind, words in ((requests.Timeout, "timed out"), (requests.TooManyRedirects, "too many redirects"),
                        (requests.exceptions.ChunkedEncodingError, "connection dropped mid-transfer (truncated)"),
                        (requests.ConnectionError, "connection failed")):
        if isinstance(exc, kind):
            return words
    return type(exc).__name__


# --------------------------------------------------------------------------- archives


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _check_member_name(archive: str, name: str) -> list[str]:
    """The member's path components, or CCRKError when it would land outside the target."""
    norm = name.replace("\\", "/")
    parts = [p for p in norm.split("/") if p not in ("", ".")]
    if norm.startswith("/") or (len(norm) > 1 and norm[1] == ":") or ".." in parts:
        raise CCRKError(f"unsafe member {name!r} in archive {archive}: absolute path or '..' refused")
    return parts


def _wanted(parts: list[str], patterns: tuple[str, ...] | None) -> bool:
    return patterns is None or any(fnmatch.fnmatch(parts[-1], p) for p in patterns)


def _members(archive: str) -> list[tuple[list[str], object]]:
    """(path parts, handle) of every regular file member, after checking every member is safe."""
    out = []
    try:
        if archive.lower().endswith(".zip"):
            with zipfile.ZipFile(archive) as zf:
                for info in zf.infolist():
                    parts = _check_member_name(archive, info.filename)
                    mode = info.external_attr >> 16
                    if info.is_dir() or not parts:
                        continue
                    # Unix zips carry the file type in the high bits; zero (no type) is a plain file.
                    if stat.S_IFMT(mode) and not stat.S_ISREG(mode):
                        raise CCRKError(f"unsafe member {info.filename!r} in archive {archive}: "
                                        f"links and special files refused")
                    out.append((parts, info))
        else:
            with tarfile.open(archive, "r:*") as tf:
                for m in tf.getmembers():
                    parts = _check_member_name(archive, m.name)
                    if m.isdir():
                        continue
                    if not m.isfile():
                        raise CCRKError(f"unsafe member {m.name!r} in archive {archive}: "
                                        f"links and special files refused")
                    if parts:
                        out.append((parts, m))
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError) as exc:
        raise CCRKError(f"cannot read metadata archive {archive}: {exc}") from None
    return out


def extract_archive(archive: str, cache_dir: str, keep: tuple[str, ...] | None = None) -> list[str]:
    """Safely extract ``archive`` (members matching ``keep``); returns the extracted files, sorted."""
    members = _members(archive)  # validates every member before anything is written
    chosen = [(parts, h) for parts, h in members if _wanted(parts, keep)]
    tag = _sha256(archive)[:16]
    if keep:
        tag += "-" + hashlib.sha256("\0".join(sorted(keep)).encode()).hexdigest()[:8]
    target = os.path.join(cache_dir, f"extract-{tag}")
    files = [os.path.join(target, *parts) for parts, _ in chosen]
    if os.path.isdir(target):
        return sorted(files)
    os.makedirs(cache_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".extract-", dir=cache_dir)
    try:
        try:
            if archive.lower().endswith(".zip"):
                with zipfile.ZipFile(archive) as zf:
                    for parts, info in chosen:
                        _copy_out(zf.open(info), os.path.join(tmp, *parts))
            else:
                with tarfile.open(archive, "r:*") as tf:
                    for parts, m in chosen:
                        src = tf.extractfile(m)
                        _copy_out(src, os.path.join(tmp, *parts))
        except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError) as exc:
            raise CCRKError(f"cannot extract metadata archive {archive}: {exc}") from None
        os.replace(tmp, target)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return sorted(files)


def _copy_out(src, dest: str) -> None:
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    with src, open(dest, "wb") as out:
        shutil.copyfileobj(src, out, _CHUNK)
