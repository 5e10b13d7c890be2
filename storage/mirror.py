"""Acquire a source's images from a WebDataset mirror instead of the web (``ccrk acquire
--from-webdataset``), into the same source artifact: the official metadata's ``images.parquet`` /
``captions.parquet``, image shards with the download's contracts (:mod:`storage.local_shards`).

The mirror. Tar shards of samples ``{key}.jpg`` (or .jpeg/.png/.webp), ``{key}.txt`` (the caption) and
``{key}.json`` (img2dataset's metadata: ``url``, ``caption``, ``key``, sizes...), as
``pixparse/cc3m-wds`` on the Hugging Face Hub; named by fsspec paths or urls (a local folder,
``hf://datasets/...``, ``s3://...``): a folder (its ``*.tar``, recursively), a tar, a glob or a
brace range (``cc3m-train-{0000..0575}.tar``), several of them in order.

Matching. A mirror sample is an official row when its json's ``url`` equals the row's url after
:func:`normalize_url` (scheme, host case, default port, fragment); a sample whose json has no url (or
that has no json) is matched by its caption (``.txt``, else the json's ``caption``) under
:func:`storage.versioning.match_key`, only when exactly one image of the metadata has that caption
(else ``ambiguous_caption``). Unmatched samples are counted, never added: image keys are the official
rows' and the source version is the metadata's -- the mirror is where the bytes came from, as a web
server is, not an input of the version (it is recorded in ``mirror.json`` and the summary). Images
are resized again with the download's settings (the mirror maker resized them already).

Fills. One pass over the mirror is a *fill* of the rows it is for (``targets``): on a source with no
shards, every row (shards from 0; rows the mirror lacks get a ``not_in_mirror`` attempt, in shards
after the mirror's); with ``only_failures`` (``--retry-failed``), the rows whose latest attempt
failed, in new shards after the last (as a retry; a row the mirror lacks keeps its web failure).
Streaming: tar by tar, sample by sample; a shard closes at N rows or at the end of a tar. Resumable:
``mirror.json`` records after each shard (and each tar) where the mirror was read up to and the
counts so far; a rerun drops shards past that point and reads on from there.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tarfile
import time
from collections import Counter
from dataclasses import dataclass
from typing import Iterator
from urllib.parse import urlsplit

import numpy as np

from storage import atomic
from storage.download import NOT_IN_MIRROR, SHARDS, attempts, shard_files, validate_shards, write_summary
from storage.errors import CCRKError
from storage.local_shards import LOCAL_SETTINGS, Sample, writer_for
from storage.progress import Progress, or_silent
from storage.versioning import match_key

MIRROR_FILE = "mirror.json"
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
# What a fill counts of the mirror's samples (beside the rows it filled).
COUNTS = ("samples", "matched_by_url", "matched_by_caption", "unmatched_url", "unmatched_caption",
          "ambiguous_caption", "duplicate", "not_needed", "no_image", "bad_json", "truncated_tars")
_GLOB = re.compile(r"[*?\[]")
_WDS_NAME = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # webdataset's key / extension split


# --------------------------------------------------------------------------- the mirror's files


def _expand_braces(spec: str) -> list[str]:
    import braceexpand  # webdataset's dependency: its brace ranges

    return list(braceexpand.braceexpand(spec))


def list_mirror(specs: list[str]) -> list[str]:
    """The mirror's tar shards (fsspec urls; local paths absolute), in the order given, each folder or
    glob sorted. CCRKError when a spec names nothing or its filesystem is not installed."""
    import fsspec

    out: list[str] = []
    for spec in specs:
        for one in _expand_braces(str(spec)):
            try:
                fs, path = fsspec.core.url_to_fs(one)
            except (ImportError, ValueError) as exc:
                raise CCRKError(f"cannot open mirror {one}: {exc}") from None
            local = "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))
            if _GLOB.search(path):
                found = sorted(p for p in fs.glob(path) if p.endswith(".tar"))
            elif path.endswith(".tar") and not local:
                found = [path]  # a remote tar named as such: no round trip to ask (opening it tells)
            elif fs.isdir(path):
                found = sorted(p for p in fs.find(path) if p.endswith(".tar"))
            elif fs.exists(path):
                found = [path]
            else:
                raise CCRKError(f"mirror not found: {one}")
            if not found:
                raise CCRKError(f"mirror {one} holds no .tar shards")
            out += [os.path.abspath(p) if local else fs.unstrip_protocol(p) for p in found]
    return list(dict.fromkeys(out))


@dataclass
class MirrorSample:
    key: str
    image: bytes | None
    caption: str | None
    meta: dict | None
    bad_json: bool = False


def _sample(key: str, parts: dict[str, bytes]) -> MirrorSample:
    image = next((parts[e] for e in IMAGE_EXTS if e in parts), None)
    caption = parts["txt"].decode("utf-8", errors="replace") if "txt" in parts else None
    meta, bad = None, False
    if "json" in parts:
        try:
            meta = json.loads(parts["json"])
            bad = not isinstance(meta, dict)
        except ValueError:
            bad = True
        meta = meta if not bad else None
    return MirrorSample(key, image, caption, meta, bad)


def iter_samples(url: str, counts: Counter | None = None) -> Iterator[MirrorSample]:
    """The samples of one mirror tar, streamed (members of a sample are consecutive, as webdataset
    writes them). A tar cut short ends its samples there (counted as ``truncated_tars``); a tar that
    cannot be opened at all is a CCRKError (a rerun resumes)."""
    import fsspec

    try:
        f = fsspec.open(url, "rb").open()
    except (OSError, ValueError) as exc:
        raise CCRKError(f"cannot read mirror tar {url}: {exc}") from None
    with f:
        key, parts = None, {}
        try:
            with tarfile.open(fileobj=f, mode="r|") as tar:
                for member in tar:
                    m = _WDS_NAME.match(member.name) if member.isfile() else None
                    if m is None:
                        continue
                    if m.group(1) != key:
                        if key is not None:
                            yield _sample(key, parts)
                        key, parts = m.group(1), {}
                    parts[m.group(2).lower()] = tar.extractfile(member).read()
        except (tarfile.TarError, EOFError):
            if counts is not None:
                counts["truncated_tars"] += 1
            key = None  # the sample being read when the tar broke may lack members: dropped
        if key is not None:
            yield _sample(key, parts)


# --------------------------------------------------------------------------- matching


def normalize_url(url: str) -> str:
    """A url as two spellings of one resource agree on: stripped, scheme and host lower case, https as
    http, the default port and the fragment dropped (path and query kept as they are)."""
    u = url.strip()
    try:
        parts = urlsplit(u)
        port = parts.port
    except ValueError:
        return u
    scheme = parts.scheme.lower()
    scheme = "http" if scheme == "https" else scheme
    host = (parts.hostname or "").lower()
    if parts.username or parts.password:
        host = parts.netloc.rsplit("@", 1)[0] + "@" + host
    netloc = host + (f":{port}" if port not in (None, 80, 443) else "")
    return f"{scheme}://{netloc}{parts.path or '/'}" + (f"?{parts.query}" if parts.query else "")


def _h64(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")


class MetadataIndex:
    """The official rows by normalised url and by caption: 64-bit hashes, sorted (16 bytes a row, not
    a Python object per row). ``keys`` / ``urls``: the rows' image keys and urls (Arrow)."""

    def __init__(self, images_path: str, captions_path: str):
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        images = pq.read_table(images_path, columns=["image_key", "url"])
        self.keys, self.urls = images.column("image_key"), images.column("url")
        self.n = images.num_rows
        hashes = np.zeros(self.n, np.uint64)
        has = np.zeros(self.n, bool)
        at = 0
        for batch in pq.ParquetFile(images_path).iter_batches(columns=["url"], batch_size=65536):
            for u in batch.column(0).to_pylist():
                if u:
                    hashes[at], has[at] = _h64(normalize_url(u)), True
                at += 1
        rows = np.flatnonzero(has)
        order = np.argsort(hashes[rows], kind="stable")
        self.url_hash, self.url_rows = hashes[rows][order], rows[order]

        captions = pq.read_table(captions_path, columns=["image_key", "caption"])
        found = pc.index_in(captions.column("image_key"), value_set=self.keys.combine_chunks())
        cap_rows = pc.fill_null(found, -1).to_numpy()
        hs, rs = [], []
        for row, text in zip(cap_rows, captions.column("caption").to_pylist()):
            key = match_key(text) if row >= 0 and text else ""
            if key:
                hs.append(_h64(key))
                rs.append(row)
        del captions
        h, r = np.array(hs, np.uint64), np.array(rs, np.int64)
        del hs, rs
        order = np.lexsort((r, h))
        h, r = h[order], r[order]
        if len(h):
            starts = np.flatnonzero(np.r_[True, h[1:] != h[:-1]])
            lo, hi = np.minimum.reduceat(r, starts), np.maximum.reduceat(r, starts)
            unique = lo == hi
            self.cap_hash, self.cap_rows = h[starts][unique], lo[unique]
            self.ambiguous = h[starts][~unique]
        else:
            self.cap_hash = self.ambiguous = np.zeros(0, np.uint64)
            self.cap_rows = np.zeros(0, np.int64)

    @staticmethod
    def _find(sorted_hashes: np.ndarray, h: int) -> tuple[int, int]:
        v = np.uint64(h)
        return int(np.searchsorted(sorted_hashes, v, "left")), int(np.searchsorted(sorted_hashes, v, "right"))

    def by_url(self, url: str) -> list[int]:
        lo, hi = self._find(self.url_hash, _h64(normalize_url(url)))
        return [int(x) for x in self.url_rows[lo:hi]]

    def by_caption(self, caption: str) -> tuple[int | None, bool]:
        """(the one row with this caption or None, whether several images have it)."""
        key = match_key(caption)
        if not key:
            return None, False
        h = _h64(key)
        lo, hi = self._find(self.cap_hash, h)
        if hi > lo:
            return int(self.cap_rows[lo]), False
        lo, hi = self._find(self.ambiguous, h)
        return None, hi > lo


# --------------------------------------------------------------------------- fill state


def load_fills(directory: str) -> list[dict]:
    """The fills recorded in ``mirror.json`` (oldest first; the last may be unfinished)."""
    path = os.path.join(directory, MIRROR_FILE)
    if not os.path.exists(path):
        return []
    try:
        with open(path) as f:
            return list(json.load(f)["fills"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CCRKError(f"{path} is unreadable ({exc}); remove it and the shards it names to start over") from None


def unfinished_fill(directory: str) -> dict | None:
    """The fill a kill interrupted, if any (its record in ``mirror.json``)."""
    fills = load_fills(directory)
    return fills[-1] if fills and not fills[-1]["complete"] else None


def starts_from_mirror(directory: str) -> bool:
    """Whether the source's shards begin with a mirror fill (no web download laid them out)."""
    fills = load_fills(directory)
    return bool(fills) and fills[0]["base"] == 0


def _save(directory: str, fills: list[dict]) -> None:
    atomic.write_json(os.path.join(directory, MIRROR_FILE), {"fills": fills})


def _is_in(keys, values) -> np.ndarray:
    """Per key (Arrow), whether it is among ``values`` (a pandas column of image keys)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    found = pc.is_in(keys, value_set=pa.array(list(values), pa.string()))
    return pc.fill_null(found, False).to_numpy(zero_copy_only=False).astype(bool)


# --------------------------------------------------------------------------- the fill


class _Fill:
    """One pass over the mirror: which rows it is for, which it filled, where it has read up to."""

    def __init__(self, index: MetadataIndex, target: np.ndarray, covered: np.ndarray, record: dict, per_shard: int):
        self.index, self.target, self.covered, self.record = index, target, covered, record
        self.per_shard = per_shard
        self.counts = Counter(record["counts"])
        self.pos = (record["next_tar"], record["next_sample"])
        self.peeked = None
        self.tar_ended = None  # called at the end of each tar with whether the open shard is empty

    def _match(self, s: MirrorSample) -> tuple[str, list[int]]:
        """(the count it falls under, the rows to write) -- no state changes."""
        if s.image is None:
            return "no_image", []
        url = s.meta.get("url") if s.meta else None
        if isinstance(url, str) and url.strip():
            rows, how = self.index.by_url(url), "matched_by_url"
            if not rows:
                return "unmatched_url", []
        else:
            caption = s.caption if s.caption is not None else (s.meta or {}).get("caption")
            row, ambiguous = self.index.by_caption(caption) if isinstance(caption, str) else (None, False)
            if row is None:
                return ("ambiguous_caption" if ambiguous else "unmatched_caption"), []
            rows, how = [row], "matched_by_caption"
        wanted = [r for r in rows if self.target[r]]
        if not wanted:
            return "not_needed", []
        fresh = [r for r in wanted if not self.covered[r]]
        return (how if fresh else "duplicate"), fresh[: self.per_shard]

    def shard_samples(self, stream) -> Iterator[Sample]:
        """The rows of one shard: up to N, or up to the end of a tar (a tar with none read on)."""
        n = 0
        while True:
            item = self.peeked if self.peeked is not None else next(stream, None)
            self.peeked = None
            if item is None:
                return
            t, j, s = item
            if s is None:  # the end of tar t
                self.pos = (t + 1, 0)
                self.tar_ended(n == 0)
                if n:
                    return
                continue
            how, rows = self._match(s)
            if n and n + len(rows) > self.per_shard:
                self.peeked = item  # it goes to the next shard, whole
                return
            self.pos = (t, j + 1)
            self.counts["samples"] += 1
            self.counts[how] += 1
            self.counts["bad_json"] += s.bad_json
            for r in rows:
                self.covered[r] = True
                n += 1
                yield Sample(self.index.keys[r].as_py(), self.index.urls[r].as_py(), s.image)

    def checkpoint(self, next_shard: int) -> None:
        self.record.update(next_tar=self.pos[0], next_sample=self.pos[1], next_shard=next_shard,
                           counts={c: int(self.counts[c]) for c in COUNTS})


def _stream(tars: list[str], start_tar: int, start_sample: int, counts: Counter):
    for t in range(start_tar, len(tars)):
        for j, s in enumerate(iter_samples(tars[t], counts)):
            if t == start_tar and j < start_sample:
                continue
            yield t, j, s
        yield t, None, None


def _drop_shards_from(shards_dir: str, first: int) -> None:
    for sid, files in shard_files(shards_dir).items():
        if sid >= first:
            for path in files.values():
                os.unlink(path)


def _new_fill(directory: str, shards_dir: str, mirror: list[str], tars: list[str], only_failures: bool,
              fills: list[dict]) -> dict | None:
    """The record of a new fill, or None when the last fill read this very mirror and no shard came
    since (reading it again would add nothing)."""
    done = sorted(s for s, f in shard_files(shards_dir).items() if "stats" in f)
    last = fills[-1] if fills else None
    if last and last["tars"] == tars and last["end"] == (done[-1] + 1 if done else 0) and \
            (only_failures or not last["only_failures"]):
        return None
    if done and not only_failures:
        raise CCRKError(f"{shards_dir} already holds images (a web download or another mirror): add "
                        f"--retry-failed to fill only the failed ones from this mirror")
    if not done and only_failures:
        raise CCRKError(f"{shards_dir} holds no images yet: nothing failed to fill; acquire from the "
                        f"mirror without --retry-failed")
    return {"mirror": list(mirror), "tars": tars, "only_failures": only_failures, "base": done[-1] + 1 if done else 0,
            "next_tar": 0, "next_sample": 0, "next_shard": done[-1] + 1 if done else 0,
            "counts": {c: 0 for c in COUNTS}, "complete": False, "end": None, "targets": None, "filled": None,
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def fill_from_mirror(prepared, mirror: list[str], settings: dict, *, only_failures: bool = False,
                     progress: Progress | None = None) -> dict:
    """Fill ``prepared``'s shards from the WebDataset mirror ``mirror`` (see the module docstring);
    returns the acquire summary (:func:`storage.download.write_summary`'s, plus ``mirror``: this
    fill's counts). ``settings``: the acquire settings (:data:`storage.local_shards.LOCAL_SETTINGS`).
    Safe to call again after any interruption."""
    t0 = time.perf_counter()
    with writer_for(str(prepared.directory), settings) as writer:
        return _fill(prepared, writer, mirror, settings, only_failures, progress, t0)


def _fill(prepared, writer, mirror: list[str], settings: dict, only_failures: bool, progress, t0: float) -> dict:
    directory = str(prepared.directory)
    shards_dir = os.path.join(directory, SHARDS)
    tars = list_mirror(mirror)
    redone = validate_shards(shards_dir)
    fills = load_fills(directory)
    record = fills[-1] if fills and not fills[-1]["complete"] else None  # saved with ``fills`` below
    if record is not None:
        if record["tars"] != tars or record["only_failures"] != only_failures:
            raise CCRKError(f"{directory} has an unfinished fill from mirror {', '.join(record['mirror'])}"
                            f"{' (--retry-failed)' if record['only_failures'] else ''}: run that command again "
                            f"to finish it first")
    else:
        record = _new_fill(directory, shards_dir, mirror, tars, only_failures, fills)
        if record is None:
            return _summary(prepared, fills[-1], fills, redone, 0, time.perf_counter() - t0, settings)
        fills.append(record)
        _save(directory, fills)
    _drop_shards_from(shards_dir, record["next_shard"])  # written after the last checkpoint: redone

    index = MetadataIndex(str(prepared.images_path), str(prepared.captions_path))
    att = attempts(shards_dir)
    base = record["base"]
    # A success is never attempted again, so "has a success before the fill" is "its latest attempt succeeded".
    ok_before = att.loc[(att["shard"] < base) & (att["status"] == "success"), "image_key"]
    target = ~_is_in(index.keys, ok_before)
    covered = _is_in(index.keys, att.loc[att["shard"] >= base, "image_key"])
    del att, ok_before
    fill = _Fill(index, target, covered, record, writer.per_shard)
    record["targets"] = int(target.sum())
    written = 0

    with or_silent(progress)("from mirror", len(tars), "tars") as advance:
        advance(record["next_tar"])

        def tar_ended(empty: bool) -> None:
            advance()
            if empty:  # nothing written since the last checkpoint: the open shard is dropped on a resume
                fill.checkpoint(record["next_shard"])
                _save(directory, fills)

        fill.tar_ended = tar_ended
        stream = _stream(tars, record["next_tar"], record["next_sample"], fill.counts)
        while True:
            sid = record["next_shard"]
            first = tars[min(fill.pos[0], len(tars) - 1)]
            stats = writer.write(sid, fill.shard_samples(stream), {"mirror_first_tar": first})
            if stats["count"] == 0:
                _drop_shards_from(shards_dir, sid)
                break
            written += stats["count"]
            fill.checkpoint(sid + 1)
            _save(directory, fills)

    # Rows with no attempt at all (a source acquired from the mirror alone) get one: not in the mirror.
    missing = [int(r) for r in np.flatnonzero(target & ~covered)]
    if not only_failures:
        per = writer.per_shard
        for at in range(0, len(missing), per):
            sid = record["next_shard"]
            rows = missing[at:at + per]
            writer.write(sid, (Sample(index.keys[r].as_py(), index.urls[r].as_py(), None, NOT_IN_MIRROR) for r in rows),
                         {"not_in_mirror": True})
            written += len(rows)
            record["next_shard"] = sid + 1
            _save(directory, fills)
    att = attempts(shards_dir)
    mine = att[(att["shard"] >= base) & (att["shard"] < record["next_shard"])]
    filled = int((mine["error_message"] != NOT_IN_MIRROR).sum())
    record.update(complete=True, end=record["next_shard"], filled=filled, not_in_mirror=record["targets"] - filled,
                  finished=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    _save(directory, fills)
    return _summary(prepared, record, fills, redone, written, time.perf_counter() - t0, settings)


def _summary(prepared, record: dict, fills: list[dict], redone, written: int, wall: float, settings: dict) -> dict:
    import pyarrow.parquet as pq

    n_rows = pq.ParquetFile(str(prepared.images_path)).metadata.num_rows
    summary = write_summary(prepared, n_rows, incomplete=0, redone=redone, retried=0, rows_attempted=written,
                            wall=wall, settings={**{k: settings[k] for k in LOCAL_SETTINGS},
                                                 "from_webdataset": record["mirror"]})
    import pandas as pd

    status = pd.read_parquet(os.path.join(str(prepared.directory), "download_status.parquet"),
                             columns=["shard", "status"])
    in_fills = np.zeros(len(status), bool)
    for f in fills:
        end = f["end"] if f["end"] is not None else f["next_shard"]
        in_fills |= (status["shard"] >= f["base"]).to_numpy() & (status["shard"] < end).to_numpy()
    summary["images_from_mirror"] = int((in_fills & (status["status"] == "success").to_numpy()).sum())
    summary["mirror"] = {"mirror": record["mirror"], "tars": len(record["tars"]), "only_failures": record["only_failures"],
                         "targets": record["targets"], "filled": record["filled"],
                         "not_in_mirror": record.get("not_in_mirror", 0), **record["counts"]}
    atomic.write_json(os.path.join(str(prepared.directory), "summary.json"), summary)
    return summary
