"""K-lingual WebDataset shards: deterministic tar writing and safe sample keys.

A shard is a plain POSIX (ustar) tar of samples ``<key>.jpg`` + ``<key>.json``. Every header is
fixed (mtime 0, uid/gid 0, no owner names, mode 0644) and the members of a sample are written in
sorted name order, so the same samples in the same order give byte-identical shards. The writer
emits the tar stream itself (headers via :class:`tarfile.TarInfo`) so that it knows each member's
data offset -- the manifest stores them and the reader seeks straight to a sample.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import hashlib
import mmap
import os
import re
import tarfile
import threading
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from storage.atomic import naming_full_disk, temp_path
from storage.switches import switched_off

BLOCK = tarfile.BLOCKSIZE  # 512
RECORD = tarfile.RECORDSIZE  # 10240: tar archives are padded to a whole record
MAX_KEY_LEN = 80  # ustar names hold 100 bytes; leave room for the extension
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
_ZERO = bytes(RECORD)
_ZERO_BLOCK = bytes(BLOCK)
_INDEX_WINDOW = 4096


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


_TEMPLATE = np.frombuffer(_header("", 0), dtype=np.uint8)  # name empty, size 0: the constant fields
_SIZE_SHIFTS = np.arange(30, -1, -3, dtype=np.int64)      # 11 octal digits, most significant first
_SUM_SHIFTS = np.arange(15, -1, -3, dtype=np.int64)       # 6 octal digits of the checksum


def ustar_headers(names: list[str], sizes) -> np.ndarray:
    """The :func:`_header` of every ``(name, size)`` at once, as an ``(n, 512)`` uint8 array (numpy
    instead of ~2 us of Python per header; same bytes)."""
    sizes = np.asarray(sizes, dtype=np.int64)
    raw = [n.encode("ascii") for n in names]
    if raw and max(map(len, raw)) > 100:
        raise ValueError(f"tar member name too long: {max(raw, key=len)!r}")
    if sizes.size and (sizes.min() < 0 or sizes.max() >= 8 ** 11):
        raise ValueError("member size out of the ustar range")
    out = np.tile(_TEMPLATE, (len(raw), 1))
    out[:, :100] = np.frombuffer(b"".join(r.ljust(100, b"\0") for r in raw), dtype=np.uint8).reshape(-1, 100)
    out[:, 124:135] = ((sizes[:, None] >> _SIZE_SHIFTS) & 7) + 48
    out[:, 148:156] = 32  # the checksum counts its own field as spaces
    chk = out.sum(axis=1, dtype=np.int64)
    out[:, 148:154] = ((chk[:, None] >> _SUM_SHIFTS) & 7) + 48
    out[:, 154] = 0
    return out


_SAFE = re.compile(r"[A-Za-z0-9_-]+")


def is_safe_key(k: str) -> bool:
    """``safe_key(k) == k``, without building it (this runs for every sample)."""
    return bool(k) and len(k) <= MAX_KEY_LEN and _SAFE.fullmatch(k) is not None


def safe_keys(raw_keys) -> list[str]:
    """:func:`safe_key` of many keys: already-safe keys (nearly all) pass through untouched."""
    return [k if is_safe_key(k) else safe_key(k) for k in raw_keys]


def shard_layout(jpg_sizes, json_sizes) -> tuple[np.ndarray, int]:
    """Where each sample starts in a shard (``starts[i]``: its jpg header; the jpg data follows at
    ``+ BLOCK``, the json header at ``+ BLOCK + padded jpg``), and the shard's total size: end of
    archive (two zero blocks) padded to a whole record, as GNU tar and tarfile do."""
    jpg_sizes = np.asarray(jpg_sizes, dtype=np.int64)
    json_sizes = np.asarray(json_sizes, dtype=np.int64)
    rec = 2 * BLOCK + jpg_sizes + (-jpg_sizes % BLOCK) + json_sizes + (-json_sizes % BLOCK)
    starts = np.zeros(len(rec) + 1, dtype=np.int64)
    np.cumsum(rec, out=starts[1:])
    end = int(starts[-1]) + 2 * BLOCK
    return starts, end + (-end % RECORD)


def _writeback_starter():
    """``start(fd, offset, nbytes)``: ask the kernel to begin writing a file range to disk now
    (Linux ``sync_file_range(SYNC_FILE_RANGE_WRITE)``, asynchronous), so that the disk works while
    the next chunk is being filled and the final fsync waits only for the tail. A no-op elsewhere;
    durability still comes from the fsync alone."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.sync_file_range
        fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
        fn.restype = ctypes.c_int
    except (OSError, AttributeError):
        return lambda fd, offset, nbytes: None
    return lambda fd, offset, nbytes: fn(fd, offset, nbytes, 2)  # 2: SYNC_FILE_RANGE_WRITE


start_writeback = _writeback_starter()


DIRECT_ALIGN = 4096  # O_DIRECT writes: file offsets, lengths and the buffer on 4 KiB (any disk's logical block)


def mapped_reads_default() -> bool:
    """Whether images found in the page cache are copied from a mapping of their source tar
    (:func:`write_planned_shard`): yes, unless ``CCRK_MAPPED_READS=0``."""
    return not switched_off("CCRK_MAPPED_READS")


def direct_io_default() -> bool:
    """Whether shards are written with ``O_DIRECT`` unless told otherwise: yes, unless
    ``CCRK_DIRECT_IO=0`` (or ``false``/``no``/``off``)."""
    return not switched_off("CCRK_DIRECT_IO")


def _open_output(path: str, direct: bool) -> tuple[int, bool]:
    """Open ``path`` for writing (truncated), with ``O_DIRECT`` when asked and the filesystem takes
    it (some refuse it at open: EINVAL); returns (fd, whether O_DIRECT is on)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    if direct and hasattr(os, "O_DIRECT"):
        try:
            return os.open(path, flags | os.O_DIRECT, 0o644), True
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
    return os.open(path, flags, 0o644), False


def _write_all(fd: int, view: memoryview, direct: bool) -> bool:
    """Write all of ``view`` at the file position. A filesystem that takes ``O_DIRECT`` at open but
    refuses a write (EINVAL: an alignment it does not support) gets it switched off and the rest
    written through the page cache. Returns whether ``O_DIRECT`` is still on."""
    done = 0
    while done < len(view):
        try:
            done += os.write(fd, view[done:])
        except OSError as exc:
            if not direct or exc.errno != errno.EINVAL:
                raise
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_DIRECT)
            direct = False
    return direct


_BUFFERS = threading.local()


def _chunk_buffer(size: int) -> mmap.mmap:
    """A page-aligned buffer (anonymous mmap, as ``O_DIRECT`` wants) of at least ``size`` bytes,
    kept for the calling thread's next shard: a fresh one costs a page fault and a zeroed page per
    4 KiB of it, for every shard. The writer sets every byte it writes out, so what an earlier
    shard left in it never reaches a file (as between the chunks of one shard)."""
    buf = getattr(_BUFFERS, "buf", None)
    if buf is None or len(buf) < size:
        buf = _BUFFERS.buf = mmap.mmap(-1, size)
    return buf


_MAPS: "OrderedDict[tuple, memoryview]" = OrderedDict()
_MAPS_LOCK = threading.Lock()
MAX_MAPS = 1024


def _mapped_source(fd: int) -> memoryview:
    """A read-only view of the whole file ``fd`` (an ``mmap``), shared by every shard of this
    process: each page of a source is mapped once, not once per shard -- mapping and unmapping per
    shard cost more than the copies saved (page faults and ``mmap_lock`` contention between shard
    threads). Keyed by the file's identity and size (a replaced or resized file gets a new mapping,
    which reads it as it is now); the least recently used of over :data:`MAX_MAPS` are dropped (and
    unmapped once no shard uses them)."""
    st = os.fstat(fd)
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    with _MAPS_LOCK:
        view = _MAPS.get(key)
        if view is not None:
            _MAPS.move_to_end(key)
            return view
    view = memoryview(mmap.mmap(fd, st.st_size, access=mmap.ACCESS_READ) if st.st_size else b"")
    with _MAPS_LOCK:
        view = _MAPS.setdefault(key, view)
        while len(_MAPS) > MAX_MAPS:
            _MAPS.popitem(last=False)
    return view


def _truncated(source: str, key: str, size: int, offset: int) -> ValueError:
    return ValueError(f"{source}: image {key} is truncated (wanted {size} bytes at {offset})")


def drop_source_maps() -> None:
    """Forget this process's source mappings (:func:`_mapped_source`); each is unmapped once no
    shard being written uses it. A build drops them when it ends: their page tables take about
    0.2% of the bytes mapped."""
    with _MAPS_LOCK:
        _MAPS.clear()


def write_planned_shard(path: str, keys: list[str], sources: list[str], src_offsets, src_sizes,
                        metas: list[bytes], chunk_bytes: int = 4 << 20, direct: bool | None = None,
                        prefetch: bool | None = None, mapped: bool | None = None) -> ShardInfo:
    """Write one shard whose images lie in other tars (image ``i``: ``src_sizes[i]`` bytes at
    ``src_offsets[i]`` of file ``sources[i]``). Samples are laid out chunk by chunk in one reused
    buffer (about ``chunk_bytes``; a bigger sample gets a chunk of its own): the headers, json and
    padding by :class:`_PlannedLayout`, each image read once straight into its place by
    :class:`_ImageReads`; each chunk is hashed while it is hot in cache and written by
    :class:`_ShardOutput`; one fsync, then the rename. Byte-identical to
    :class:`KLingualShardWriter` given the same samples; ``members`` is left empty (the layout is
    :func:`shard_layout`).

    ``direct`` (default :func:`direct_io_default`): write with ``O_DIRECT`` (:class:`_ShardOutput`).
    ``prefetch``: ask the kernel for each chunk's images one chunk ahead; default: from the first
    image not in the page cache on. ``mapped`` (default :func:`mapped_reads_default`; only with that
    page-cache-first default): copy the images in the page cache from a mapping of their source
    tar. Both: :class:`_ImageReads`."""
    n = len(keys)
    if len(set(keys)) != n:
        raise ValueError(f"duplicate sample key in {path}")
    for k in keys:
        if not is_safe_key(k):
            raise ValueError(f"unsafe sample key {k!r}")
    layout = _PlannedLayout(keys, src_sizes, metas)
    # Room for: the carried partial block, a chunk, the archive's end, the last write's padding.
    room = max(int(chunk_bytes), layout.biggest) + 2 * DIRECT_ALIGN + 2 * BLOCK + RECORD
    buf = _chunk_buffer(room + (-room % DIRECT_ALIGN))  # anonymous mmap: page-aligned, as O_DIRECT wants
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = temp_path(path)  # this process's: a killed writer's are swept when the build finishes
    reads = _ImageReads(keys, sources, src_offsets, layout, prefetch, mapped)
    with naming_full_disk(path):  # a full disk: one line naming the shard
        out = _ShardOutput(tmp, direct_io_default() if direct is None else direct, buf)
        blocks = np.frombuffer(buf, dtype=np.uint8).reshape(-1, BLOCK)
        try:
            i, last = 0, False
            while not last:
                # Samples [i, j) make one chunk (at least one sample); the last chunk ends the archive.
                # The buffer's byte 0 is the file's byte ``out.written``.
                base = out.written
                reads.advise_ahead(i, base, chunk_bytes)
                j = layout.chunk_end(i, base, chunk_bytes)
                last = j >= n
                fill = layout.fill(blocks, i, j, base)
                for k in range(i, j):
                    reads.read(k, out.view, layout.st[k] - base + BLOCK, first=k == i)
                i = j
                out.write(fill, last)
            out.finish(layout.total)
        except BaseException:
            out.abort()
            raise
        finally:
            reads.close()
        out.close()
    os.replace(tmp, path)
    return ShardInfo(os.path.basename(path), n, layout.total, out.sha.hexdigest())


class _PlannedLayout:
    """Where everything of a planned shard lies, in 512-byte blocks: sample ``i`` is [jpg header]
    [image: ``img_blocks[i]``][json header][json: ``json_blocks[i]``]. Every tar member starts on a
    block, so a chunk's headers (from :func:`ustar_headers`), its json blocks (padded) and the zeros
    under each image's padding go into the buffer with one numpy assignment each (:meth:`fill`);
    only the images are left, for :class:`_ImageReads`."""

    def __init__(self, keys: list[str], src_sizes, metas: list[bytes]):
        n = len(keys)
        src_sizes = np.asarray(src_sizes, dtype=np.int64)
        json_sizes = np.fromiter((len(m) for m in metas), dtype=np.int64, count=n)
        names = [f"{k}{ext}" for k in keys for ext in (".jpg", ".json")]
        self.headers = ustar_headers(names, np.stack([src_sizes, json_sizes], axis=1).reshape(-1))
        starts, self.total = shard_layout(src_sizes, json_sizes)
        img_blocks, json_blocks = -(-src_sizes // BLOCK), -(-json_sizes // BLOCK)
        self.jpg_at = starts[:-1] // BLOCK
        self.img_end = (self.jpg_at + img_blocks)[img_blocks > 0]  # an image's last block: its padding lies there
        self.img_from = np.concatenate([[0], np.cumsum(img_blocks > 0)])
        self.json_at = self.jpg_at + img_blocks + 1
        self.json_from = np.concatenate([[0], np.cumsum(json_blocks)])
        self.json_dst = np.repeat(self.json_at + 1 - self.json_from[:-1], json_blocks) + np.arange(self.json_from[-1])
        self.json_data = np.frombuffer(b"".join(m + _ZERO[:-len(m) % BLOCK] for m in metas),
                                       dtype=np.uint8).reshape(-1, BLOCK)
        self.n, self.st, self.ss = n, starts.tolist(), src_sizes.tolist()
        self.biggest = int((starts[1:] - starts[:-1]).max()) if n else 0

    def chunk_end(self, i: int, base: int, chunk_bytes: int) -> int:
        """The end ``j`` of the chunk of samples [i, j) that starts at file byte ``base``."""
        j = i + 1 if i < self.n else i
        while j < self.n and self.st[j + 1] - base <= chunk_bytes:
            j += 1
        return j

    def fill(self, blocks: np.ndarray, i: int, j: int, base: int) -> int:
        """Lay samples [i, j) but their images into ``blocks`` (byte 0: file byte ``base``), and the
        archive's end when ``j`` is the last; returns the chunk's end in the buffer."""
        last = j >= self.n
        fill = (self.total if last else self.st[j]) - base
        if last:  # end of archive: two zero blocks, padded to a whole record
            blocks[(self.st[self.n] - base) // BLOCK:fill // BLOCK] = 0
        # Zeroed: each image's last block (the read fills all but its padding); every other
        # block of the chunk is written whole.
        b0 = base // BLOCK
        blocks[self.img_end[self.img_from[i]:self.img_from[j]] - b0] = 0
        blocks[self.jpg_at[i:j] - b0] = self.headers[2 * i:2 * j:2]
        blocks[self.json_at[i:j] - b0] = self.headers[2 * i + 1:2 * j:2]
        blocks[self.json_dst[self.json_from[i]:self.json_from[j]] - b0] = \
            self.json_data[self.json_from[i]:self.json_from[j]]
        return fill


class _ImageReads:
    """Each image of a planned shard read once, straight into its place in the chunk buffer.

    Reads try the page cache first (``preadv`` with ``RWF_NOWAIT``, when ``prefetch`` is None):
    from the first image not in the page cache on, each chunk's images are asked for one chunk
    ahead (``POSIX_FADV_WILLNEED``, :meth:`advise_ahead`), so that the disk reads them while the
    chunk before is filled, hashed and written -- a shard's images lie at random places of the
    source tars (the seeded sample order), so from a disk, one read at a time, each would wait for
    the last. ``prefetch`` True: ask ahead from the start; False: never.

    ``mapped``: while the images are in the page cache, each chunk's first image is read as above --
    the probe -- and the others are copied from a read-only mapping of their source tar
    (:func:`_mapped_source`, shared by the shards of a process). A copy from a mapping is a plain
    memory copy that keeps the GIL; a read per image gives the GIL up and must win it back, and
    with several shard threads those hand-overs cost more than the copies (the shard step of
    100,000 images: about a quarter less CPU). A chunk whose probe misses switches the shard to
    the reads and read-ahead above. A source shorter than an image's end is a clear error."""

    def __init__(self, keys, sources, src_offsets, layout: _PlannedLayout, prefetch, mapped):
        self.keys, self.sources, self.layout = keys, sources, layout
        self.offs = [int(x) for x in src_offsets]
        self.ahead, self.advise = 0, prefetch  # images advised so far; None: not yet known whether to
        self.nowait = prefetch is None and hasattr(os, "RWF_NOWAIT")
        self.mapped = self.nowait and (mapped_reads_default() if mapped is None else mapped)
        self.fds: dict[str, int] = {}
        self.views: dict[str, memoryview] = {}

    def fd(self, k: int) -> int:
        fd = self.fds.get(self.sources[k])
        if fd is None:
            fd = self.fds[self.sources[k]] = os.open(self.sources[k], os.O_RDONLY)
        return fd

    def view(self, k: int) -> memoryview:
        view = self.views.get(self.sources[k])
        if view is None:
            view = self.views[self.sources[k]] = _mapped_source(self.fd(k))
        return view

    def advise_ahead(self, i: int, base: int, chunk_bytes: int) -> None:
        """When asking ahead: the images of the chunk at ``base`` and the next (the disk reads them meanwhile)."""
        if not self.advise:
            return
        st, ss, n = self.layout.st, self.layout.ss, self.layout.n
        self.ahead = max(self.ahead, i)
        while self.ahead < n and st[self.ahead] < base + 2 * chunk_bytes:
            k = self.ahead
            os.posix_fadvise(self.fd(k), self.offs[k], ss[k], os.POSIX_FADV_WILLNEED)
            self.ahead += 1

    def read(self, k: int, mv: memoryview, at: int, first: bool) -> None:
        """Image ``k`` into ``mv[at:]``; ``first``: the first of its chunk (the probe)."""
        size, off = self.layout.ss[k], self.offs[k]
        if self.mapped and not self.advise and not first:  # the chunk's probe found its image in memory
            view = self.view(k)
            if off + size > len(view):
                raise _truncated(self.sources[k], self.keys[k], size, off)
            mv[at:at + size] = view[off:off + size]
            return
        fd, got = self.fd(k), 0
        if self.nowait and not self.advise:
            # From the page cache only: a miss means the sources are on the disk, not in
            # memory, so from then on each chunk's images are asked for ahead.
            try:
                got = os.preadv(fd, [mv[at:at + size]], off, os.RWF_NOWAIT)
            except BlockingIOError:
                pass
            except OSError:  # a kernel or filesystem without RWF_NOWAIT: always ask ahead
                self.nowait = False
            if got < size:
                self.advise = True
        if got < size:
            got += os.preadv(fd, [mv[at + got:at + size]], off + got)
        if got != size:
            raise _truncated(self.sources[k], self.keys[k], size, off)

    def close(self) -> None:
        self.views.clear()
        for fd in self.fds.values():
            os.close(fd)


class _ShardOutput:
    """A shard's temporary file, written chunk by chunk from the buffer and hashed as it goes.

    With ``direct``, written with ``O_DIRECT``, from the buffer straight to the disk. A shard is not
    read back soon, so passing it through the page cache only costs a copy of every byte and the
    kernel's writeback work -- on a 2-core machine a fifth of the shard step's CPU. Each write then
    covers whole 4 KiB blocks: the bytes past the last whole block of a chunk move to the buffer's
    start and go out with the next chunk, and the last write is padded with zeros and the file
    truncated to its size. Where the filesystem refuses ``O_DIRECT``, the page cache is used (then
    each chunk's writeback is started at once)."""

    def __init__(self, tmp: str, direct: bool, buf):
        self.tmp, self.view, self.sha = tmp, memoryview(buf), hashlib.sha256()
        self.fd, self.direct = _open_output(tmp, direct)
        # The buffer's first ``carry`` bytes (under one block of DIRECT_ALIGN) came from the last
        # chunk, filled and hashed but not yet written; the file holds ``written`` bytes.
        self.written, self.carry = 0, 0

    def write(self, fill: int, last: bool) -> None:
        """Hash and write the buffer's bytes up to ``fill`` (but a carried partial block)."""
        mv = self.view
        self.sha.update(mv[self.carry:fill])
        if not self.direct:
            carry, upto = 0, fill
        elif last:  # padded to whole blocks; the file is cut to its size in finish
            carry, upto = 0, fill + (-fill % DIRECT_ALIGN)
            mv[fill:upto] = bytes(upto - fill)
        else:
            carry = fill % DIRECT_ALIGN
            upto = fill - carry
        was_direct = self.direct
        self.direct = _write_all(self.fd, mv[:upto], self.direct)
        if not was_direct:
            start_writeback(self.fd, self.written, upto)
        self.written += upto
        self.carry = carry
        if carry:
            mv[:carry] = mv[upto:fill]

    def finish(self, total: int) -> None:
        if self.written != total:
            os.ftruncate(self.fd, total)
        os.fsync(self.fd)

    def abort(self) -> None:
        os.close(self.fd)
        os.unlink(self.tmp)

    def close(self) -> None:
        self.view.release()
        os.close(self.fd)


class KLingualShardWriter:
    """Write one shard: ``add(key, jpg_bytes, json_bytes)`` per sample, then ``close()``.

    The shard is written to a hidden temporary sibling and renamed into place on close, so a
    shard file under its final name is always complete (a killed build leaves only temp files).
    """

    def __init__(self, path: str):
        self.path = path
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self.tmp = temp_path(path)
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
        with naming_full_disk(self.path):
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
    shards), from the headers only (one 512-byte ``pread`` per member). Plain ustar headers are
    parsed here (fast); an archive with extended headers (pax / GNU long names) goes through
    :mod:`tarfile`. A truncated or damaged tail ends the index: the images before it count, the rest
    are simply absent."""
    out: dict[str, tuple[int, int]] = {}
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return out
    try:
        size = os.fstat(fd).st_size
        suffix = ext.encode()
        pos, win, win_at = 0, b"", 0
        while pos + BLOCK <= size:
            if not win_at <= pos <= win_at + len(win) - BLOCK:
                # One read also covers the small members after this header (json, txt) and the
                # next image's header: about one read per sample instead of one per member.
                win, win_at = os.pread(fd, _INDEX_WINDOW, pos), pos
                if len(win) < BLOCK:
                    break
            h = win[pos - win_at:pos - win_at + BLOCK]
            if h == _ZERO_BLOCK:
                break
            try:
                stored = int(h[148:156].split(b"\0", 1)[0].strip() or b"-1", 8)
                n = int(h[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
            except ValueError:
                break  # a damaged header: the archive ends here for us
            # The ustar checksum (sum of the header bytes, its own field as spaces), checked through
            # adler32's low half -- (1 + byte sum) mod 65521 -- which is C speed, not a Python sum.
            if zlib.adler32(h) & 0xFFFF != (stored - 255 + sum(h[148:156])) % 65521:
                break
            if h[156:157] not in (b"0", b"\0"):
                return _index_with_tarfile(path, ext)
            name = h[:100].split(b"\0", 1)[0]
            if h[345:346] != b"\0" and h[257:262] == b"ustar":
                name = h[345:500].split(b"\0", 1)[0] + b"/" + name
            data = pos + BLOCK
            if name.endswith(suffix) and data + n <= size:
                out[os.path.basename(name.decode("utf-8", "replace"))[: -len(ext)]] = (data, n)
            pos = data + n + (-n % BLOCK)
    except OSError:
        pass
    finally:
        os.close(fd)
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
