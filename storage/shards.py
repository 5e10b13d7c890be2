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


def _tarinfo_header(name: str, size: int) -> bytes:
    """The reference header (tarfile's own encoder) -- used to check :func:`_header`."""
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info.tobuf(format=tarfile.USTAR_FORMAT, encoding="utf-8", errors="strict")


# Every header field but the name, size and checksum is constant: assemble the ustar header
# directly (tarfile's encoder costs ~150 us per member; this is ~5 us). Same bytes as tarfile.
_MID = (b"0000644\0" + b"0000000\0" + b"0000000\0")           # mode, uid, gid
_MTIME = b"00000000000\0"
_TAIL = (b"0" + bytes(100) + b"ustar\x0000" + bytes(32) + bytes(32)   # type, linkname, magic+version, owner
         + bytes(8) + bytes(8) + bytes(155) + bytes(12))              # devmajor, devminor, prefix, pad
_CONST_SUM = sum(_MID) + sum(_MTIME) + sum(_TAIL) + 8 * 32         # checksum field counts as spaces


def _header(name: str, size: int) -> bytes:
    raw = name.encode("ascii")
    if len(raw) > 100:
        raise ValueError(f"tar member name too long: {name!r}")
    if size >= 8 ** 11:
        raise ValueError(f"member {name!r} too large for a ustar header ({size} bytes)")
    name_field = raw + bytes(100 - len(raw))
    size_field = b"%011o\0" % size
    chksum = _CONST_SUM + sum(raw) + sum(size_field)
    return b"".join((name_field, _MID, size_field, _MTIME, b"%06o\0 " % chksum, _TAIL))


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

    def add(self, key: str, jpg: bytes, meta_json: bytes) -> None:
        if key != safe_key(key):
            raise ValueError(f"unsafe sample key {key!r}")
        if key in self._keys:
            raise ValueError(f"duplicate sample key {key!r} in {self.path}")
        self._keys.add(key)
        # Sorted member names within a sample: '<key>.jpg' < '<key>.json'. One write per sample.
        jpg_off = self._offset + BLOCK
        json_off = jpg_off + len(jpg) + (-len(jpg) % BLOCK) + BLOCK
        self._write(b"".join((_header(f"{key}.jpg", len(jpg)), jpg, _ZERO[:-len(jpg) % BLOCK],
                              _header(f"{key}.json", len(meta_json)), meta_json,
                              _ZERO[:-len(meta_json) % BLOCK])))
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
    """``{key: (data offset, size)}`` of the ``<key><ext>`` members of an image tar (img2dataset
    shards), from the headers only. Plain ustar headers are parsed here (fast); an archive with
    extended headers (pax / GNU long names) goes through :mod:`tarfile`. A truncated or damaged
    tail ends the index: the images before it count, the rest are simply absent."""
    out: dict[str, tuple[int, int]] = {}
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            pos = 0
            while pos + BLOCK <= size:
                f.seek(pos)
                h = f.read(BLOCK)
                if len(h) < BLOCK or h == _ZERO[:BLOCK]:
                    break
                try:
                    stored = int(h[148:156].split(b"\0", 1)[0].strip() or b"-1", 8)
                    n = int(h[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
                except ValueError:
                    break  # a damaged header: the archive ends here for us
                if stored != sum(h) - sum(h[148:156]) + 256:
                    break
                if h[156:157] not in (b"0", b"\0"):
                    return _index_with_tarfile(path, ext)
                name = h[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
                if h[257:262] == b"ustar" and h[345:500].strip(b"\0"):
                    name = h[345:500].split(b"\0", 1)[0].decode("utf-8", "replace") + "/" + name
                data = pos + BLOCK
                if name.endswith(ext) and data + n <= size:
                    out[os.path.basename(name)[: -len(ext)]] = (data, n)
                pos = data + n + (-n % BLOCK)
    except OSError:
        pass
    return out


def _index_with_tarfile(path: str, ext: str) -> dict[str, tuple[int, int]]:
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
                    out[os.path.basename(m.name)[: -len(ext)]] = (m.offset_data, m.size)
    except (tarfile.TarError, OSError):
        pass
    size = os.path.getsize(path) if os.path.exists(path) else 0
    # A member whose data runs past the end of a truncated file is not an image we have.
    return {k: v for k, v in out.items() if v[0] + v[1] <= size}
