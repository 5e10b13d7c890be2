"""Resolve ``--metadata`` specs to local files: download urls, unpack archives safely.

A spec is a local file, a local directory (all files under it), or an http(s) url, of an official
metadata file or of the archive it ships in (``.zip``, ``.tar.gz`` / ``.tgz``, ``.tar``).

- Urls download once into ``<cache_dir>/url-<sha256(url)[:16]>/<file name>`` (streamed to a
  temporary file, renamed into place when complete, so a killed download is redone, never used).
- Archives extract into ``<cache_dir>/extract-<sha256(archive)[:16]>/`` (again via a temporary
  directory renamed when complete). Members with absolute paths, ``..`` components, links or
  devices are refused: :class:`CCRKError` naming the member; nothing is written outside.
- Every download and extraction is bounded (:class:`MetadataLimits`): bytes on the wire, bytes
  decompressed (a gzip ``Content-Encoding``, each archive member, all members of an archive) and a
  total deadline per download. Passing one is a one-line :class:`CCRKError` naming the url or
  archive, the cap and the environment variable raising it; the partial file is removed.
- A file name taken from a url that is empty, ``.``/``..``, hidden, or holds a separator or a
  control character is replaced by ``download``: nothing is written, or read back, outside the
  url's own directory of the cache.
- Anything missing, unreadable or failing to download: :class:`CCRKError` naming it.
"""
from __future__ import annotations

import fnmatch
import hashlib
import os
import re
import shutil
import stat
import tarfile
import tempfile
import time
import zipfile
import zlib
from dataclasses import dataclass
from typing import Iterable
from urllib.parse import unquote, urljoin, urlsplit

from storage.addresses import ALLOW_ENV, BLOCKED_ADDRESS, allowed, refused_target, url_pair
from storage.errors import CCRKError

ARCHIVE_SUFFIXES = (".zip", ".tar.gz", ".tgz", ".tar")
DOWNLOAD_TIMEOUT_S = (15, 120)  # connect, read (per socket read; MetadataLimits.deadline_s bounds the whole)
_CHUNK = 1 << 20
_GIB = 1 << 30
# Above the largest official files (VG's region_descriptions.json.zip: about 0.7 GB zipped, several GB
# unzipped; CC3M's GCC-training.tsv: about 0.5 GB), far below what fills a disk.
MAX_DOWNLOAD_BYTES = 4 * _GIB
MAX_UNPACKED_BYTES = 16 * _GIB
DOWNLOAD_DEADLINE_S = 2 * 3600
_ENV = {"max_download_bytes": "CCRK_METADATA_MAX_DOWNLOAD_BYTES",
        "max_unpacked_bytes": "CCRK_METADATA_MAX_UNPACKED_BYTES",
        "deadline_s": "CCRK_METADATA_DEADLINE_S"}
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True)
class MetadataLimits:
    """Caps on one metadata download / archive; :meth:`from_env` reads the ``CCRK_METADATA_*`` overrides."""

    max_download_bytes: int = MAX_DOWNLOAD_BYTES  # on the wire, per url
    max_unpacked_bytes: int = MAX_UNPACKED_BYTES  # decompressed: a gzip-encoded body, an archive member, an archive
    # The body's reads stop at the deadline; until the headers are in, each read waits at most
    # min(read timeout, deadline).
    deadline_s: float = DOWNLOAD_DEADLINE_S

    @classmethod
    def from_env(cls) -> "MetadataLimits":
        values = {}
        for key, env in _ENV.items():
            raw = os.environ.get(env, "").strip()
            if raw:
                try:
                    values[key] = float(raw) if key == "deadline_s" else int(raw)
                except ValueError:
                    kind = "number of seconds" if key == "deadline_s" else "whole number of bytes"
                    raise CCRKError(f"{env}={raw!r} is not a {kind}") from None
                if values[key] <= 0:
                    raise CCRKError(f"{env}={raw!r} must be positive")
        return cls(**values)


def _too_big(what: str, key: str, cap: float, where: str) -> CCRKError:
    """The one-line error for a passed cap (``key`` a :class:`MetadataLimits` field)."""
    if key == "deadline_s":
        return CCRKError(f"{what} ran past the metadata deadline of {cap:g} s (raise it with {_ENV[key]})")
    return CCRKError(f"{what} passed the metadata cap of {_bytes(int(cap))} {where} (raise it with {_ENV[key]})")


def _bytes(n: int) -> str:
    for unit, size in (("GiB", _GIB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:g} {unit}"
    return f"{n} bytes"


def resolve_metadata(specs: Iterable[str], cache_dir: str, keep: Iterable[str] | None = None,
                     limits: MetadataLimits | None = None) -> list[str]:
    """Local paths of the metadata files named by ``specs`` (archives replaced by their members).

    ``keep``: optional file-name patterns (fnmatch, on the base name); archive members not
    matching any are not extracted (the COCO archive also holds 800 MB of instance annotations).
    ``limits``: the caps (default :meth:`MetadataLimits.from_env`).
    """
    patterns = tuple(keep) if keep else None
    limits = limits or MetadataLimits.from_env()
    out: list[str] = []
    for spec in specs:
        spec = str(spec)
        path = _download(spec, cache_dir, limits) if _is_url(spec) else _local(spec)
        for f in _expand(path):
            if is_archive(f):
                out += extract_archive(f, cache_dir, patterns, limits)
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


def _file_name(path: str) -> str:
    """The cache file name for a url's (percent-encoded) path: its last component, or ``download``
    when that would not be one plain, visible file name of the url's own directory."""
    name = unquote(path).rsplit("/", 1)[-1]
    if name in ("", ".", "..") or name.startswith(".") or "\\" in name or _CONTROL.search(name) \
            or len(name.encode("utf-8", "surrogateescape")) > 200:
        return "download"
    return name


def _download(url: str, cache_dir: str, limits: MetadataLimits) -> str:
    import requests  # third-party, ~70 ms to import: only when metadata is downloaded

    parts = urlsplit(url)
    if parts.scheme.lower() not in ("http", "https") or not parts.netloc:
        raise CCRKError(f"metadata url must be http(s): {url}")
    d = os.path.join(cache_dir, "url-" + hashlib.sha256(url.encode("utf-8")).hexdigest()[:16])
    dest = os.path.join(d, _file_name(parts.path))
    if os.path.isfile(dest) and not os.path.islink(dest):
        return dest
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".part-", dir=d)
    try:
        with os.fdopen(fd, "wb") as f:
            try:
                _fetch(requests, url, f, limits)
            except requests.RequestException as exc:
                raise CCRKError(f"could not download metadata {url}: {_reason(exc)}") from None
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dest


def _fetch(requests, url: str, out, limits: MetadataLimits) -> None:
    """Stream ``url``'s body into ``out`` (a gzip/deflate ``Content-Encoding`` decoded here, so that
    its output is counted), within ``limits``; CCRKError on a bad status, a passed cap or a short body."""
    import urllib3  # requests' own transport

    deadline = time.monotonic() + limits.deadline_s
    timeout = (min(DOWNLOAD_TIMEOUT_S[0], limits.deadline_s), min(DOWNLOAD_TIMEOUT_S[1], limits.deadline_s))
    headers = {"Accept-Encoding": "gzip, deflate"}  # what _decoder decodes; no br/zstd
    with requests.get(url, stream=True, timeout=timeout, headers=headers, hooks={"response": _redirects_checked(url)}) \
            as r:
        if r.status_code != 200:
            raise CCRKError(f"could not download metadata {url}: HTTP {r.status_code}")
        expected = r.headers.get("Content-Length", "")
        if expected.isdigit() and int(expected) > limits.max_download_bytes:
            raise _too_big(f"metadata download {url} ({_bytes(int(expected))})", "max_download_bytes",
                           limits.max_download_bytes, "on the wire")
        decode = _decoder(url, r.headers.get("Content-Encoding", ""))
        wire = unpacked = 0
        try:
            while True:
                if time.monotonic() > deadline:
                    raise _too_big(f"metadata download {url}", "deadline_s", limits.deadline_s, "")
                block = r.raw.read1(_CHUNK, decode_content=False)  # one socket read: the deadline is checked often
                wire += len(block)
                if wire > limits.max_download_bytes:
                    raise _too_big(f"metadata download {url}", "max_download_bytes", limits.max_download_bytes,
                                   "on the wire")
                for piece in decode(block):
                    unpacked += len(piece)
                    if unpacked > limits.max_unpacked_bytes:
                        raise _too_big(f"metadata download {url}", "max_unpacked_bytes",
                                       limits.max_unpacked_bytes, "decompressed")
                    out.write(piece)
                if not block:
                    break
        except (urllib3.exceptions.HTTPError, zlib.error) as exc:
            raise CCRKError(f"could not download metadata {url}: {_reason(exc)}") from None
    if expected.isdigit() and int(expected) != wire:
        raise CCRKError(f"could not download metadata {url}: got {wire} of {expected} bytes (truncated)")


def _redirects_checked(url: str):
    """A requests response hook (it sees every hop) refusing a redirect to a non-http(s) url or to an
    address image fetches refuse (storage.addresses), unless it is ``url``'s own host and port or on
    the allow-list: the url is the user's, where its host sends the download is not."""
    allow = allowed() | {url_pair(url)}

    def hook(response, *args, **kwargs):
        if response.is_redirect:
            target = urljoin(response.url, response.headers["location"])
            why = refused_target(target, allow)
            if why is not None:
                raise CCRKError(f"could not download metadata {url}: it redirects to {target}, {why}: refused "
                                f"({BLOCKED_ADDRESS}; allow an exact HOST:PORT with {ALLOW_ENV})")
        return response

    return hook


def _decoder(url: str, encoding: str):
    """A function from wire blocks to decoded pieces of at most ``_CHUNK`` bytes each (a bomb's
    expansion never sits in memory whole); the empty block (the body's end) flushes the rest."""
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return lambda block: (block,)
    if encoding not in ("gzip", "x-gzip", "deflate"):
        raise CCRKError(f"could not download metadata {url}: unsupported Content-Encoding {encoding!r}")
    z = zlib.decompressobj(47 if encoding != "deflate" else 15)  # 47: gzip or zlib header

    def decode(block: bytes):
        if not block:
            yield z.flush()  # what the last input still holds: less than one deflate match
        while block:
            piece = z.decompress(block, _CHUNK)
            block = z.unconsumed_tail
            if piece:
                yield piece

    return decode


def _reason(exc: Exception) -> str:
    """A few words for a failed request (requests' own messages run to several lines)."""
    import requests  # third-party: as in _download
    import urllib3  # requests' own transport

    for kind, words in ((requests.Timeout, "timed out"), (requests.TooManyRedirects, "too many redirects"),
                        (requests.exceptions.ChunkedEncodingError, "connection dropped mid-transfer (truncated)"),
                        (urllib3.exceptions.ReadTimeoutError, "timed out"),
                        (urllib3.exceptions.ProtocolError, "connection dropped mid-transfer (truncated)"),
                        (requests.ConnectionError, "connection failed"), (zlib.error, "bad compressed body")):
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


def _members(archive: str, limits: MetadataLimits) -> list[tuple[list[str], object]]:
    """(path parts, handle) of every regular file member, after checking every member is safe and
    the members' sizes are within ``limits`` (each member, and all of them together)."""
    out = []
    total = 0

    def count(name: str, size: int) -> None:
        nonlocal total
        total += size
        if size > limits.max_unpacked_bytes:
            raise _too_big(f"member {name!r} ({_bytes(size)}) of archive {archive}", "max_unpacked_bytes",
                           limits.max_unpacked_bytes, "decompressed")
        if total > limits.max_unpacked_bytes:
            raise _too_big(f"archive {archive}", "max_unpacked_bytes", limits.max_unpacked_bytes,
                           "decompressed in total")

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
                    count(info.filename, info.file_size)
                    out.append((parts, info))
        else:
            with tarfile.open(archive, "r:*") as tf:
                for m in tf:  # lazily: a bomb is refused at its first oversized member, not after reading all
                    parts = _check_member_name(archive, m.name)
                    if m.isdir():
                        continue
                    if not m.isfile():
                        raise CCRKError(f"unsafe member {m.name!r} in archive {archive}: "
                                        f"links and special files refused")
                    count(m.name, m.size)
                    if parts:
                        out.append((parts, m))
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        raise CCRKError(f"cannot read metadata archive {archive}: {exc}") from None
    return out


def extract_archive(archive: str, cache_dir: str, keep: tuple[str, ...] | None = None,
                    limits: MetadataLimits | None = None) -> list[str]:
    """Safely extract ``archive`` (members matching ``keep``) within ``limits`` (default
    :meth:`MetadataLimits.from_env`); returns the extracted files, sorted."""
    limits = limits or MetadataLimits.from_env()
    members = _members(archive, limits)  # validates every member before anything is written
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
    budget = _Budget(archive, limits)
    try:
        try:
            if archive.lower().endswith(".zip"):
                with zipfile.ZipFile(archive) as zf:
                    for parts, info in chosen:
                        _copy_out(zf.open(info), os.path.join(tmp, *parts), budget, info.filename)
            else:
                with tarfile.open(archive, "r:*") as tf:
                    for parts, m in chosen:
                        _copy_out(tf.extractfile(m), os.path.join(tmp, *parts), budget, m.name)
        except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError, zlib.error) as exc:
            raise CCRKError(f"cannot extract metadata archive {archive}: {exc}") from None
        os.replace(tmp, target)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return sorted(files)


class _Budget:
    """Bytes written so far from one archive, against the per-member and total caps (the sizes an
    archive declares were checked already; this counts what decompression really yields)."""

    def __init__(self, archive: str, limits: MetadataLimits):
        self.archive, self.cap, self.total = archive, limits.max_unpacked_bytes, 0

    def add(self, name: str, member_bytes: int, n: int) -> None:
        self.total += n
        if member_bytes > self.cap:
            raise _too_big(f"member {name!r} of archive {self.archive}", "max_unpacked_bytes", self.cap,
                           "decompressed")
        if self.total > self.cap:
            raise _too_big(f"archive {self.archive}", "max_unpacked_bytes", self.cap, "decompressed in total")


def _copy_out(src, dest: str, budget: _Budget, name: str) -> None:
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    written = 0
    with src, open(dest, "wb") as out:
        for block in iter(lambda: src.read(_CHUNK), b""):
            written += len(block)
            budget.add(name, written, len(block))
            out.write(block)
