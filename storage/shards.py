"""K-lingual WebDataset shards: deterministic tar writing and safe sample keys.

A shard is a plain POSIX (ustar) tar of samples ``<key>.jpg`` + ``<key>.json``. Every header is
fixed (mtime 0, uid/gid 0, no owner names, mode 0644) and the members of a sample are written in
sorted name order, so the same samples in the same order give byte-identical shards. The writer
emits the tar stream itself (headers via :class:`tarfile.TarInfo`) so that it knows each member's
data offset -- the manifest stores them and the reader seeks straight to a sample.
"""
from __future__ import annotations

import hashlib
import os
import re
import tarfile
from dataclasses import dataclass, field

BLOCK = tarfile.BLOCKSIZE  # 512
RECORD = tarfile.RECORDSIZE  # 10240: tar archives are padded to a whole record
MAX_KEY_LEN = 80  # ustar names hold 100 bytes; leave room for the extension
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
_ZERO = bytes(RECORD)


def safe_key(raw: str) -> str:
    """A dot-free, slash-free tar key for ``raw``: itself when already safe, else a cleaned name
    with a short hash of the original (so two different raw keys never clean to the same key)."""
    raw = str(raw)
    cleaned = _UNSAFE.sub("_", raw)[:MAX_KEY_LEN]
    if cleaned == raw and raw:
        return raw
    digest = hashlib.sha1(raw.encode("utf-8", "surrogatepass")).hexdigest()[:10]
    return f"{cleaned[:MAX_KEY_LEN - 11]}-{digest}"


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.tar"


@dataclass
class MemberRef:
    """Where one sample's members lie inside its shard (data offsets, sizes in bytes)."""
    key: str
    jpg_offset: int
    jpg_size: int
    json_offset: int
    json_size: int


@dataclass
class ShardInfo:
    name: str
    n_samples: int
    bytes: int
    sha256: str
    members: list[MemberRef] = field(default_factory=list)


def _header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info.tobuf(format=tarfile.USTAR_FORMAT, encoding="utf-8", errors="strict")


class KLingualShardWriter:
    """Write one shard: ``add(key, jpg_bytes, json_bytes)`` per sample, then ``close()``.

    The shard is written to a hidden temporary sibling and renamed into place on close, so a
    shard file under its final name is always complete (a killed build leaves only temp files).
    """

    def __init__(self, path: str):
        self.path = path
        self.tmp = os.path.join(os.path.dirname(path), f".tmp-{os.path.basename(path)}")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self._f = open(self.tmp, "wb")
        self._sha = hashlib.sha256()
        self._offset = 0
        self._keys: set[str] = set()
        self.members: list[MemberRef] = []

    def _write(self, data) -> None:
        self._f.write(data)
        self._sha.update(data)
        self._offset += len(data)

    def _member(self, name: str, data: bytes) -> int:
        self._write(_header(name, len(data)))
        offset = self._offset
        self._write(data)
        pad = -len(data) % BLOCK
        if pad:
            self._write(_ZERO[:pad])
        return offset

    def add(self, key: str, jpg: bytes, meta_json: bytes) -> None:
        if key != safe_key(key):
            raise ValueError(f"unsafe sample key {key!r}")
        if key in self._keys:
            raise ValueError(f"duplicate sample key {key!r} in {self.path}")
        self._keys.add(key)
        # Sorted member names within a sample: '<key>.jpg' < '<key>.json'.
        jpg_off = self._member(f"{key}.jpg", jpg)
        json_off = self._member(f"{key}.json", meta_json)
        self.members.append(MemberRef(key, jpg_off, len(jpg), json_off, len(meta_json)))

    def close(self) -> ShardInfo:
        # End of archive: two zero blocks, then pad to a whole record (as GNU tar and tarfile do).
        end = self._offset + 2 * BLOCK
        self._write(_ZERO[: 2 * BLOCK + (-end % RECORD)])
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        os.replace(self.tmp, self.path)
        return ShardInfo(os.path.basename(self.path), len(self.members), self._offset,
                         self._sha.hexdigest(), self.members)

    def abort(self) -> None:
        self._f.close()
        if os.path.exists(self.tmp):
            os.unlink(self.tmp)

    def __enter__(self) -> "KLingualShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


def index_source_tar(path: str, ext: str = ".jpg") -> dict[str, tuple[int, int]]:
    """``{key: (data offset, size)}`` of the ``<key><ext>`` members of an image tar, read from the
    headers only (img2dataset shards). A truncated tail ends the index; it never raises."""
    out: dict[str, tuple[int, int]] = {}
    try:
        with tarfile.open(path, "r:") as tar:
            while True:
                try:
                    m = tar.next()
                except (tarfile.TarError, OSError):
                    break
                if m is None:
                    break
                if m.isfile() and m.name.endswith(ext):
                    base = os.path.basename(m.name)[: -len(ext)]
                    out[base] = (m.offset_data, m.size)
    except (tarfile.TarError, OSError):
        pass
    size = os.path.getsize(path) if os.path.exists(path) else 0
    # A member whose data runs past the end of a truncated file is not an image we have.
    return {k: v for k, v in out.items() if v[0] + v[1] <= size}
