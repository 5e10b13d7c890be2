"""Image shards from images in hand -- a WebDataset mirror, a local folder -- with the very contracts
of an img2dataset download (:mod:`storage.download`), so that a build, a retry and a verify cannot
tell them apart.

One shard is ``NNNNN.tar`` (``{key}.jpg`` + ``{key}.json`` per success, written by img2dataset's own
``WebDatasetSampleWriter``), ``NNNNN.parquet`` (one row per attempted image: ``image_key``, ``url``,
``key``, ``status``, ``error_message``, sizes, ``exif``, ``sha256`` -- img2dataset's columns, in its
order) and ``NNNNN_stats.json`` written last (atomically), so a shard is done when its stats exist,
as for downloads. Keys are img2dataset's (:func:`img2dataset.downloader.compute_key` of the row's
place in the shard); images go through the download's resizer (:func:`storage.download.make_resizer`:
img2dataset's ``Resizer`` with the same settings), so a mirror image is processed as a downloaded one.
The resizer silences fds 1 and 2 around OpenCV with ``dup2``, which is not safe in two threads at
once (one thread can restore the other's /dev/null for good): as in img2dataset, one resizer per
process -- in this one, or in ``processes`` worker processes.

:class:`LocalShardWriter` writes one shard from :class:`Sample` s; :func:`acquire_folder` fills a
source whose ``images.parquet`` names files (``file``) under a local folder (Multi30K's Flickr30K
images), in the download's shard layout (shard ``i`` = rows ``[i*N, (i+1)*N)``), resumably.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import os
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Iterable, Iterator

import pyarrow as pa

from storage import atomic
from storage.download import (
    ENCODE_FORMAT,
    _die_with_parent,
    FILE_NOT_FOUND,
    OOM_SHARD_COUNT,
    SHARDS,
    make_resizer,
    record_layout,
    shard_files,
    validate_shards,
    write_summary,
)
from storage.errors import CCRKError
from storage.progress import Progress, or_silent

# img2dataset's per-row columns for input columns [image_key, url] (save_additional_columns first).
SCHEMA = pa.schema([("image_key", pa.string()), ("url", pa.string()), ("key", pa.string()),
                    ("status", pa.string()), ("error_message", pa.string()), ("width", pa.int32()),
                    ("height", pa.int32()), ("original_width", pa.int32()), ("original_height", pa.int32()),
                    ("exif", pa.string()), ("sha256", pa.string())])
FILE_COLUMN = "file"


@dataclass
class Sample:
    """One image to store: its bytes as fetched (``data``), or why there are none (``error``)."""

    image_key: str
    url: str | None
    data: bytes | None = None
    error: str | None = None


def _exif(data: bytes) -> str | None:
    import exifread  # img2dataset's dependency, as it reads exif

    try:
        tags = exifread.process_file(io.BytesIO(data), details=False)
        return json.dumps({k: str(v).strip() for k, v in tags.items() if v is not None})
    except Exception:  # noqa: BLE001 - img2dataset stores None for any exif failure
        return None


_WORKER_RESIZER = None


def _start_worker(resize_args: tuple, parent_pid: int) -> None:
    global _WORKER_RESIZER
    _die_with_parent(parent_pid)  # a kill -9 of the acquire leaves no worker behind
    _WORKER_RESIZER = make_resizer(*resize_args)


def _resize_in_worker(data: bytes) -> tuple:
    return _WORKER_RESIZER(io.BytesIO(data))


class LocalShardWriter:
    """Writes shards into ``shards_dir`` from samples in hand, resized here or by ``processes`` worker
    processes; at most ``number_sample_per_shard`` rows a shard (the keys' width). Close it (or use it
    as a context manager) to stop the workers."""

    def __init__(self, shards_dir: str, *, image_size: int = 256, resize_mode: str = "border",
                 resize_only_if_bigger: bool = False, max_image_area: float = float("inf"),
                 encode_quality: int = 95, number_sample_per_shard: int = 10_000, processes: int = 1):
        self.shards_dir = shards_dir
        self.resize_args = (image_size, resize_mode, resize_only_if_bigger, max_image_area, encode_quality)
        self.resizer = make_resizer(*self.resize_args)
        self.per_shard = int(number_sample_per_shard)
        self.oom_sample = math.ceil(math.log10(self.per_shard))
        self.processes = max(1, int(processes))
        self._pool: ProcessPoolExecutor | None = None
        os.makedirs(shards_dir, exist_ok=True)

    def __enter__(self) -> "LocalShardWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def _pool_once(self) -> ProcessPoolExecutor:
        if self._pool is None:
            import multiprocessing

            self._pool = ProcessPoolExecutor(self.processes, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_start_worker, initargs=(self.resize_args, os.getpid()))
        return self._pool

    def _processed(self, samples: Iterable[Sample]) -> Iterator[tuple[Sample, tuple]]:
        """(sample, resizer output) in the samples' order; at most a window of images in memory."""
        failed = (None, None, None, None, None)
        if self.processes == 1:
            for sample in samples:
                yield sample, (self.resizer(io.BytesIO(sample.data)) if sample.data is not None
                               else (*failed, sample.error or "no image"))
            return
        pool, pending = self._pool_once(), []
        for sample in samples:
            pending.append((sample, pool.submit(_resize_in_worker, sample.data) if sample.data is not None else None))
            if len(pending) >= 8 * self.processes:
                s, fut = pending.pop(0)
                yield s, fut.result() if fut is not None else (*failed, s.error or "no image")
        for s, fut in pending:
            yield s, fut.result() if fut is not None else (*failed, s.error or "no image")

    def write(self, shard_id: int, samples: Iterable[Sample], extra_stats: dict | None = None) -> dict:
        """Write shard ``shard_id`` from ``samples`` (rows in this order); returns its stats.

        ``extra_stats``: merged into ``NNNNN_stats.json`` (e.g. a mirror's counts for the samples
        this shard consumed), which is written last."""
        from img2dataset.downloader import compute_key
        from img2dataset.writer import WebDatasetSampleWriter

        start = time.time()
        writer = WebDatasetSampleWriter(shard_id, self.shards_dir, False, OOM_SHARD_COUNT, SCHEMA, ENCODE_FORMAT)
        count = successes = failed_download = failed_resize = 0
        status = Counter()
        try:
            for i, (sample, out) in enumerate(self._processed(samples)):
                if i >= self.per_shard:
                    raise CCRKError(f"shard {shard_id}: more than {self.per_shard} images")
                img, width, height, original_width, original_height, err = out
                meta = {"image_key": sample.image_key, "url": sample.url,
                        "key": compute_key(i, shard_id, self.oom_sample, OOM_SHARD_COUNT),
                        "status": "success", "error_message": err, "width": None, "height": None,
                        "original_width": None, "original_height": None, "exif": None, "sha256": None}
                count += 1
                if err is not None:
                    meta["status"] = "failed_to_download" if sample.data is None else "failed_to_resize"
                    failed_download += sample.data is None
                    failed_resize += sample.data is not None
                    status[err] += 1
                    writer.write(None, meta["key"], None, meta)
                    continue
                successes += 1
                status["success"] += 1
                meta.update(width=width, height=height, original_width=original_width,
                            original_height=original_height, exif=_exif(sample.data),
                            sha256=hashlib.sha256(sample.data).hexdigest())
                writer.write(img, meta["key"], None, meta)
        finally:
            writer.close()
        end = time.time()
        # img2dataset's stats fields (its CappedCounter keeps the 1000 most frequent messages).
        stats = {"count": count, "successes": successes, "failed_to_download": failed_download,
                 "failed_to_resize": failed_resize, "duration": end - start, "start_time": start, "end_time": end,
                 "status_dict": dict(status.most_common(1000)), **(extra_stats or {})}
        atomic.write_json(os.path.join(self.shards_dir, f"{shard_id:0{OOM_SHARD_COUNT}d}_stats.json"), stats)
        return stats


def writer_for(directory: str, settings: dict) -> LocalShardWriter:
    """The :class:`LocalShardWriter` of a source directory, its layout checked against ``download.json``
    (or recorded there). ``settings``: the acquire settings (:data:`LOCAL_SETTINGS`)."""
    record_layout(directory, settings["number_sample_per_shard"], settings["image_size"], settings["resize_mode"])
    return LocalShardWriter(os.path.join(directory, SHARDS), image_size=settings["image_size"],
                            resize_mode=settings["resize_mode"],
                            resize_only_if_bigger=settings["resize_only_if_bigger"],
                            max_image_area=settings["max_image_area"], encode_quality=settings["encode_quality"],
                            number_sample_per_shard=settings["number_sample_per_shard"],
                            processes=settings["processes"])


# The acquire settings a local writer uses (storage.specs.AcquireSettings' fields).
LOCAL_SETTINGS = ("image_size", "resize_mode", "resize_only_if_bigger", "max_image_area", "encode_quality",
                  "number_sample_per_shard", "processes")


def _read_file(path: str) -> tuple[bytes | None, str | None]:
    try:
        with open(path, "rb") as f:
            return f.read(), None
    except FileNotFoundError:
        return None, f"{FILE_NOT_FOUND}: {os.path.basename(path)}"
    except OSError as exc:
        return None, f"{FILE_NOT_FOUND}: {os.path.basename(path)} ({exc.strerror or exc})"


def acquire_folder(prepared, images_dir: str, settings: dict, progress: Progress | None = None) -> dict:
    """Store the images ``images.parquet`` names (``file``, relative to ``images_dir``) in the source's
    shards, in the download's layout; a missing file is a ``file_not_found`` failure. Safe to call
    again after any interruption: finished shards are kept, partial ones redone. Returns the summary
    (as :func:`storage.download.download_images`')."""

    t0 = time.perf_counter()
    if not os.path.isdir(images_dir):
        raise CCRKError(f"images folder not found: {images_dir}")
    with writer_for(str(prepared.directory), settings) as writer:
        attempted, redone, n_rows = _fill_folder(prepared, images_dir, writer, progress)
    return write_summary(prepared, n_rows, incomplete=0, redone=redone, retried=0, rows_attempted=attempted,
                         wall=time.perf_counter() - t0,
                         settings={**{k: settings[k] for k in LOCAL_SETTINGS}, "images": os.path.abspath(images_dir)})


def _fill_folder(prepared, images_dir: str, writer: LocalShardWriter, progress) -> tuple[int, dict, int]:
    """Write the shards not done yet; (rows attempted, shards redone, rows)."""
    import pyarrow.parquet as pq

    table = pq.read_table(str(prepared.images_path))
    if FILE_COLUMN not in table.column_names:
        raise CCRKError(f"{prepared.images_path} has no {FILE_COLUMN!r} column: source {prepared.source} "
                        f"downloads its images from urls")
    n_rows, per = table.num_rows, writer.per_shard
    redone = validate_shards(writer.shards_dir)
    done = {s for s, f in shard_files(writer.shards_dir).items() if "stats" in f}
    todo = [s for s in range(math.ceil(n_rows / per)) if s not in done]
    keys, urls, files = (table.column(c).to_pylist() for c in ("image_key", "url", FILE_COLUMN))
    attempted = 0
    with or_silent(progress)("images from folder", n_rows, "images") as advance:
        advance(n_rows - sum(min(per, n_rows - s * per) for s in todo))

        def samples(rows: range) -> Iterator[Sample]:
            for r in rows:
                data, err = _read_file(os.path.join(images_dir, files[r]))
                yield Sample(keys[r], urls[r], data, err)
                advance()

        for s in todo:
            rows = range(s * per, min(n_rows, (s + 1) * per))
            writer.write(s, samples(rows), {"images_dir": os.path.abspath(images_dir)})
            attempted += len(rows)
    return attempted, redone, n_rows
