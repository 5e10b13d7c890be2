"""Verify a built dataset against its manifest: every shard re-read, every fault named.

Fault kinds: ``incomplete`` (no ``_COMPLETE`` marker), ``missing_shard``, ``unexpected_shard`` (a
tar or leftover temp file the manifest does not list), ``truncated`` (shorter than recorded),
``size_mismatch`` (longer), ``corrupted`` (not a readable tar, a sample without its jpg/json, bad
json, an image that does not decode), ``sample_count_mismatch``, ``sample_keys_mismatch``,
``sha256_mismatch``, ``index_mismatch`` (sizes.json / wids index disagree with the manifest).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from storage import manifest
from storage.errors import CCRKError


@dataclass
class Problem:
    kind: str
    shard: str
    detail: str


@dataclass
class VerifyReport:
    path: str
    n_shards: int = 0
    n_samples: int = 0
    bytes_read: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def kinds(self) -> set[str]:
        return {p.kind for p in self.problems}

    def add(self, kind: str, shard: str, detail: str) -> None:
        self.problems.append(Problem(kind, shard, detail))


def verify_dataset(dataset_path: str, deep: bool = True, progress=None, workers: int | None = None,
                   contents: bool = True) -> VerifyReport:
    """Check every shard listed in the manifest (``deep``: parse every sample and decode images;
    otherwise sizes and sha256 only; ``contents=False``: no shard is read -- presence and sizes,
    the marker and the index files) and report every problem found. Shards are checked by
    ``workers`` threads at once (default: one per CPU, at most 8): sha256 and image decoding
    release the GIL.
    Problems are reported in shard order whatever the number of workers."""
    dataset_path = os.path.abspath(dataset_path)
    if not os.path.isdir(dataset_path):
        raise CCRKError(f"no dataset directory {dataset_path}")
    if not os.path.exists(manifest.manifest_path(dataset_path)):
        raise CCRKError(f"{dataset_path} has no manifest.duckdb: the build did not finish (run ccrk build again)")
    if workers is not None and workers < 1:
        raise CCRKError(f"--workers {workers} must be at least 1")
    report = VerifyReport(dataset_path)
    if not os.path.exists(os.path.join(dataset_path, "_COMPLETE")):
        report.add("incomplete", "", "no _COMPLETE marker: the build did not finish")
    records = manifest.shard_records(dataset_path)
    keys_by_shard: dict[str, list[str]] = {}
    deep = deep and contents
    if deep:
        con = manifest.connect(dataset_path)
        try:
            for key, shard in con.execute("SELECT key, shard FROM samples ORDER BY idx").fetchall():
                keys_by_shard.setdefault(shard, []).append(key)
        finally:
            con.close()
    report.n_shards = len(records)
    report.n_samples = sum(r["n_samples"] for r in records)
    shard_dir = os.path.join(dataset_path, "shards")
    listed = {r["name"] for r in records}
    present = set(os.listdir(shard_dir)) if os.path.isdir(shard_dir) else set()
    for name in sorted(present):
        if (name.endswith(".tar") or name.startswith(".tmp-")) and name not in listed:
            report.add("unexpected_shard", name, "not listed in the manifest")
    _check_indexes(shard_dir, records, report)

    def check(rec: dict) -> VerifyReport:
        one = VerifyReport(dataset_path)
        _check_shard(os.path.join(shard_dir, rec["name"]), rec, keys_by_shard.get(rec["name"]), deep, one, contents)
        if progress:
            progress(1)
        return one

    # Each worker holds one whole shard in memory; past about 8 threads the GIL-bound parts (tar
    # and json parsing) gain little more.
    n_workers = max(1, min(len(records), workers or min(8, os.cpu_count() or 1))) if contents else 1
    if n_workers == 1:
        results = map(check, records)
        pool = None
    else:
        pool = ThreadPoolExecutor(n_workers, thread_name_prefix="verify")
        results = pool.map(check, records)  # in shard order
    try:
        for one in results:
            report.problems += one.problems
            report.bytes_read += one.bytes_read
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    return report


def _check_indexes(shard_dir, records, report) -> None:
    expected = {r["name"]: r["n_samples"] for r in records}
    try:
        sizes = json.load(open(os.path.join(shard_dir, "sizes.json")))
        if sizes != expected:
            report.add("index_mismatch", "sizes.json", "shard sample counts differ from the manifest")
    except (OSError, ValueError) as exc:
        report.add("index_mismatch", "sizes.json", f"unreadable: {exc}")
    try:
        wids = json.load(open(os.path.join(shard_dir, "wids-index.json")))
        got = {s["url"]: s["nsamples"] for s in wids.get("shardlist", [])}
        if got != expected:
            report.add("index_mismatch", "wids-index.json", "shard list differs from the manifest")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        report.add("index_mismatch", "wids-index.json", f"unreadable: {exc}")


def _check_shard(path: str, rec: dict, keys: list[str] | None, deep: bool, report: VerifyReport,
                 contents: bool = True) -> None:
    name = rec["name"]
    if not os.path.exists(path):
        report.add("missing_shard", name, "listed in the manifest but absent")
        return
    data = None
    if contents:
        with open(path, "rb") as f:
            data = f.read()
        report.bytes_read += len(data)
    size = len(data) if contents else os.path.getsize(path)
    shorter = size < rec["bytes"]
    if size != rec["bytes"]:
        # Shorter and unreadable is reported as truncated (below); otherwise the size is wrong.
        if not shorter or not deep or not contents:
            report.add("truncated" if shorter else "size_mismatch", name, f"{size} bytes, manifest says {rec['bytes']}")
    if not contents:
        return
    if hashlib.sha256(data).hexdigest() != rec["sha256"]:
        report.add("sha256_mismatch", name, "content differs from the manifest's sha256")
    if not deep:
        return
    found, problem = _read_samples(data)
    if shorter:
        report.add("truncated" if problem else "size_mismatch", name,
                   f"{size} bytes, manifest says {rec['bytes']}" + (f"; {problem}" if problem else ""))
    if problem:
        if not shorter:
            report.add("corrupted", name, problem)
        return
    if len(found) != rec["n_samples"]:
        report.add("sample_count_mismatch", name, f"{len(found)} samples, manifest says {rec['n_samples']}")
    elif keys is not None and found != keys:
        report.add("sample_keys_mismatch", name, "sample keys differ from the manifest")


def _read_samples(data: bytes) -> tuple[list[str], str | None]:
    """Sample keys of a shard in order, or the first problem found."""
    from PIL import Image  # third-party: only a deep check decodes images

    keys: list[str] = []
    members: dict[str, dict[str, bytes]] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for m in tar:
                if not m.isfile():
                    return keys, f"member {m.name!r} is not a regular file"
                base, _, ext = m.name.partition(".")
                if "/" in m.name or not base or ext not in ("jpg", "json"):
                    return keys, f"unexpected member {m.name!r}"
                blob = tar.extractfile(m).read()
                if len(blob) != m.size:
                    return keys, f"member {m.name!r} is cut short"
                if base not in members:
                    members[base] = {}
                    keys.append(base)
                members[base][ext] = blob
    except (tarfile.TarError, OSError, EOFError) as exc:
        return keys, f"not a readable tar: {exc}"
    for key in keys:
        parts = members[key]
        if set(parts) != {"jpg", "json"}:
            return keys, f"sample {key} lacks {'json' if 'jpg' in parts else 'jpg'}"
        try:
            meta = json.loads(parts["json"])
            if not isinstance(meta.get("captions"), list) or not meta["captions"]:
                return keys, f"sample {key}: json has no captions"
        except (ValueError, AttributeError) as exc:
            return keys, f"sample {key}: bad json ({exc})"
        try:
            with Image.open(io.BytesIO(parts["jpg"])) as im:
                # A JPEG is decoded at 1/8 scale: the whole entropy-coded stream is still read and
                # checked (truncation, bad Huffman data and markers raise as at full size), only
                # the inverse DCT and colour conversion are skipped -- half the time per image.
                im.draft(im.mode, (max(1, im.width // 8), max(1, im.height // 8)))
                im.load()
        except Exception as exc:  # PIL raises many types for broken images
            return keys, f"sample {key}: image does not decode ({type(exc).__name__}: {exc})"
    return keys, None
