"""Download a source's images with img2dataset into WebDataset shards, resumably, and summarise.

:func:`download_images` reads ``images.parquet`` of a prepared source (one row per image: ``image_key``,
``url``) and runs the real ``img2dataset.download`` into ``<version dir>/shards/``
(``NNNNN.tar`` + ``NNNNN.parquet`` + ``NNNNN_stats.json``; ``image_key`` carried as an extra column).

Resume. img2dataset counts a shard as done when its ``_stats.json`` exists. After a kill -9 that is
not enough: a shard may be half-written, or its stats present while the tar is cut short. Before every
run :func:`validate_shards` checks each shard (stats parse, parquet rows == stats count, tar readable
with one image per success) and deletes inconsistent ones, so img2dataset redoes exactly those.

Retry. ``retry_failed=True`` downloads again only rows whose latest attempt failed with a retryable
error (timeouts, 5xx, connection errors), as new shards after the last one (img2dataset's "extend"
mode). The latest attempt of an image key wins, so counts stay exact: a success is never retried,
a superseded failure is reported as such in ``download_status.parquet``.

``summary.json`` beside the shards: rows read and rejected (from the adapter), images ok, failures
by class (:data:`FAILURE_CLASSES`), bytes, images/s and wall seconds.
"""
from __future__ import annotations

import functools
import http.client
import io
import json
import math
import os
import re
import socket
import sys
import tarfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from contextlib import ExitStack, contextmanager
from typing import Callable, ContextManager, Iterator

from storage import atomic
from storage.addresses import BLOCKED_ADDRESS, Allowed, allowed, connect, refused_scheme
from storage.errors import CCRKError
from storage.image_prep import flatten_alpha

# Third-party packages (img2dataset, pandas, pyarrow, rich) are imported where they are used: the
# CLI imports this module for its constants, and img2dataset's workers to unpickle its classes.

# img2dataset's imports check for updates and start wandb unless told not to (workers inherit this).
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

SHARDS = "shards"
ENCODE_FORMAT = "jpg"
OOM_SHARD_COUNT = 5  # shard names NNNNN, as img2dataset's default
DEFAULT_MAX_IMAGE_AREA = 89_478_485  # PIL's decompression-bomb threshold
DEFAULT_FETCH_DEADLINE = 60  # seconds for one image's whole fetch: timeout is per socket read
DEFAULT_MAX_IMAGE_BYTES = 50_000_000  # a body past this many bytes is not read further
OPT_OUT_DIRECTIVES = ["noai", "noimageai", "noindex", "noimageindex"]
# The TDM Reservation Protocol (W3C community group): a response header ``tdm-reservation: 1`` reserves
# text-and-data-mining rights; honoured as X-Robots-Tag noai is, wherever opt-outs are (opt_out_tdm).
TDM_HEADER = "tdm-reservation"
OPT_OUT_TDM = "use of image reserved by tdm-reservation: 1"
DISTRIBUTORS = ("multiprocessing", "ray")

# not_in_mirror / file_not_found: images taken from a WebDataset mirror or a local folder
# (storage.local_shards) rather than the web.
FAILURE_CLASSES = ("not_found_404", "server_error_5xx", "timeout", "redirect_loop", "empty_body",
                   "not_an_image", "truncated_image", "too_large", "opt_out_noai", "opt_out_tdm",
                   "blocked_address", "connection_error", "deadline_exceeded", "too_many_bytes", "not_in_mirror",
                   "file_not_found", "other")
# not_in_mirror: never tried on the web (a source acquired from a mirror, storage.mirror).
# deadline_exceeded is retryable as a timeout is (the host may be faster later; a retry costs one
# deadline); too_many_bytes is not (the body is what it is).
RETRYABLE = frozenset({"server_error_5xx", "timeout", "connection_error", "deadline_exceeded", "not_in_mirror"})
# The error messages of the two local classes (storage.local_shards writes them).
NOT_IN_MIRROR = "not in mirror"
FILE_NOT_FOUND = "file not found"
# The error messages of the bounded fetch and of the header check (:func:`fetch_image`, CheckedResizer).
DEADLINE_EXCEEDED = "deadline exceeded"
TOO_MANY_BYTES = "too many bytes"
TOO_LARGE_HEADER = "image area too large (from the header, not decoded)"

_SHARD_FILE = re.compile(r"^(\d+)(_stats\.json|\.tar|\.parquet)$")


# --------------------------------------------------------------------------- error classes


def classify_error(message: str | None) -> str | None:
    """Map an img2dataset per-row ``error_message`` to one of :data:`FAILURE_CLASSES` (None: no error)."""
    if message is None:
        return None
    m = message.lower()
    if m.startswith(NOT_IN_MIRROR):
        return "not_in_mirror"
    if m.startswith(FILE_NOT_FOUND):
        return "file_not_found"
    if m.startswith(DEADLINE_EXCEEDED):
        return "deadline_exceeded"
    if m.startswith(TOO_MANY_BYTES):
        return "too_many_bytes"
    if BLOCKED_ADDRESS in m:  # urllib wraps it: "<urlopen error blocked address: ...>"
        return "blocked_address"
    if m.startswith(OPT_OUT_TDM):
        return "opt_out_tdm"
    if "x-robots-tag" in m:
        return "opt_out_noai"
    if "infinite loop" in m or "redirect" in m:
        return "redirect_loop"
    if re.search(r"http error 5\d\d", m):
        return "server_error_5xx"
    if re.search(r"http error (404|410)", m):
        return "not_found_404"
    if "timed out" in m or "timeout" in m:
        return "timeout"
    if "empty body" in m or "buf.empty()" in m:
        return "empty_body"
    if "truncated" in m:
        return "truncated_image"
    if "not an image" in m or "image decoding error" in m:
        return "not_an_image"
    if "image area too large" in m:
        return "too_large"
    if any(s in m for s in ("urlopen error", "connection", "remote end closed", "incompleteread",
                            "errno", "eof occurred", "name or service")):
        return "connection_error"
    return "other"


# --------------------------------------------------------------------------- img2dataset extensions
# Subclasses handed to the real img2dataset (it builds them by name in img2dataset.main):
# workers that die with their parent, so a kill -9 leaves no orphan still writing shards; a
# downloader whose fetch has a total deadline and a byte cap (img2dataset's timeout is per socket
# read, and it reads a body whole); and a resizer that checks the area from the image's header
# before anything is decoded, and tells an empty body, a truncated image and a non-image apart.

_IMAGE_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")


_WATCHDOG_STARTED = False


def _die_with_parent(parent_pid: int) -> None:
    """End this worker as soon as ``parent_pid`` is gone (a kill -9 of ccrk leaves no orphan writer).

    Not PR_SET_PDEATHSIG: it fires when the *thread* that spawned the worker ends, and the pool's
    worker-handler thread (which spawns replacement workers) ends during Pool.terminate -- killing
    workers mid-write and deadlocking the pool on its result-queue lock. A daemon thread polling
    the parent pid has the process semantics we want.
    """
    global _WATCHDOG_STARTED
    if os.getppid() != parent_pid:  # the parent is already gone: stop now
        os._exit(1)
    if _WATCHDOG_STARTED:
        return
    _WATCHDOG_STARTED = True

    def watch() -> None:
        while True:
            time.sleep(0.02)  # a getppid() syscall 50 times a second: negligible, and near-immediate
            if os.getppid() != parent_pid:
                os._exit(1)

    threading.Thread(target=watch, name="ccrk-parent-watchdog", daemon=True).start()


_READ_CHUNK = 1 << 16


def _shut(sock) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:  # already closed
        pass


class _Deadline:
    """One fetch's total time. When it is up, the fetch's sockets are shut down, so a read blocked on a
    host that sends a byte a second returns at once (a socket timeout bounds each read, not the fetch)."""

    def __init__(self, seconds: float):
        self.expired = False
        self._sockets: list = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def watch(self, sock) -> None:
        with self._lock:
            self._sockets.append(sock)
            expired = self.expired
        if expired:
            _shut(sock)

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            sockets = list(self._sockets)
        for sock in sockets:
            _shut(sock)

    def cancel(self) -> None:
        self._timer.cancel()


class _WatchedConnection:
    """Mixin: every socket the connection opens (the TCP one, before any TLS) goes to an address
    :func:`storage.addresses.connect` allows, and is watched by ``deadline``."""

    def __init__(self, *args, deadline: _Deadline, allow: Allowed, **kwargs):
        super().__init__(*args, **kwargs)

        def create_checked(address, timeout=socket._GLOBAL_DEFAULT_TIMEOUT, source_address=None):
            sock = connect(address, timeout, source_address, allow)
            deadline.watch(sock)
            return sock

        self._create_connection = create_checked


class _WatchedHTTPConnection(_WatchedConnection, http.client.HTTPConnection):
    pass


class _WatchedHTTPSConnection(_WatchedConnection, http.client.HTTPSConnection):
    pass


class _CheckedHTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, deadline: _Deadline, allow: Allowed):
        super().__init__()
        self.connection = functools.partial(_WatchedHTTPConnection, deadline=deadline, allow=allow)

    def http_open(self, req):
        return self.do_open(self.connection, req)


class _CheckedHTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, deadline: _Deadline, allow: Allowed):
        super().__init__()
        self.connection = functools.partial(_WatchedHTTPSConnection, deadline=deadline, allow=allow)

    def https_open(self, req):
        extra = {"check_hostname": self._check_hostname} if hasattr(self, "_check_hostname") else {}
        return self.do_open(self.connection, req, context=self._context, **extra)


class _HTTPOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Redirects are followed to http(s) urls only (urllib's own also follows ftp://); each new
    connection goes through the same address check."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        why = refused_scheme(urllib.parse.urljoin(req.full_url, newurl))
        if why is not None:
            raise urllib.error.HTTPError(req.full_url, code, f"{BLOCKED_ADDRESS}: a redirect to {why}", headers, fp)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _tdm_reserved(headers) -> bool:
    return (headers.get(TDM_HEADER) or "").strip() == "1"


def fetch_image(row, timeout, user_agent_token, disallowed_header_directives, *, deadline: float,
                max_bytes: int, allow: Allowed = frozenset()):
    """img2dataset's ``download_image`` (same arguments and answer: key, stream or None, error or None)
    with ``deadline`` seconds for the whole fetch (connect, redirects, headers, body), at most
    ``max_bytes`` of body read (a longer Content-Length is refused before the body), connections only
    to public addresses or the exact pairs of ``allow`` (:mod:`storage.addresses`), redirects only to
    http(s), and, where opt-outs are honoured, ``tdm-reservation: 1`` honoured beside X-Robots-Tag."""
    from img2dataset.downloader import is_disallowed

    key, url = row
    user_agent = "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:72.0) Gecko/20100101 Firefox/72.0"
    if user_agent_token:
        user_agent += f" (compatible; {user_agent_token}; +https://github.com/rom1504/img2dataset)"
    clock = _Deadline(deadline)
    opener = urllib.request.build_opener(_CheckedHTTPHandler(clock, allow), _CheckedHTTPSHandler(clock, allow),
                                         _HTTPOnlyRedirects())
    try:
        request = urllib.request.Request(url, data=None, headers={"User-Agent": user_agent})
        with opener.open(request, timeout=min(timeout, deadline)) as r:
            if disallowed_header_directives and is_disallowed(r.headers, user_agent_token,
                                                              disallowed_header_directives):
                return key, None, "Use of image disallowed by X-Robots-Tag directive"
            if disallowed_header_directives and _tdm_reserved(r.headers):
                return key, None, OPT_OUT_TDM
            length = (r.headers.get("Content-Length") or "").strip()
            if length.isdigit() and int(length) > max_bytes:
                return key, None, f"{TOO_MANY_BYTES}: Content-Length {length} is over the cap of {max_bytes}"
            body = bytearray()
            while chunk := r.read1(_READ_CHUNK):
                body += chunk
                if len(body) > max_bytes:
                    return key, None, f"{TOO_MANY_BYTES}: the body is over the cap of {max_bytes}"
            if clock.expired:  # the shut socket read as the end of the body
                raise TimeoutError
            if r.length:  # read1 does not raise on a body cut short; read() does
                raise http.client.IncompleteRead(bytes(body), r.length)
        return key, io.BytesIO(body), None
    except Exception as err:  # noqa: BLE001 - as img2dataset: every failure is this row's error message
        if clock.expired:
            return key, None, f"{DEADLINE_EXCEEDED}: no whole image within {deadline} s"
        return key, None, str(err)
    finally:
        clock.cancel()


def _header_area(img_stream) -> float | None:
    """Width x height read from the image's header (PIL decodes no pixels); None: PIL cannot tell."""
    from PIL import Image

    img_stream.seek(0)
    try:
        with Image.open(img_stream) as im:
            width, height = im.size
    except Image.DecompressionBombError:  # PIL refuses past twice its limit: at least that many pixels
        return 2 * Image.MAX_IMAGE_PIXELS + 1
    except Exception:  # noqa: BLE001 - not for PIL to judge: img2dataset decodes and classifies it
        return None
    finally:
        img_stream.seek(0)
    return width * height


def _resizer_class():
    from img2dataset.resizer import Resizer

    class CheckedResizer(Resizer):
        def __call__(self, img_stream, blurring_bbox_list=None):
            # Before img2dataset's decode (and its float64 alpha matting) of the whole image.
            area = _header_area(img_stream)
            if area is not None and area > self.max_image_area:
                return None, None, None, None, None, TOO_LARGE_HEADER
            # Alpha composited on white here, in integers: img2dataset's float64 matting never runs
            # (with reencoding off, img2dataset hands on the bytes it is given: the original ones).
            flat = None if self.disable_all_reencoding else flatten_alpha(img_stream)
            out = super().__call__(img_stream if flat is None else flat, blurring_bbox_list)
            err = out[-1]
            if err is not None and ("decoding error" in err or "buf.empty()" in err):
                img_stream.seek(0)
                head = img_stream.read(16)
                if not head:
                    err = "empty body"
                elif head.startswith(_IMAGE_MAGIC) or head[8:12] == b"WEBP":
                    err = f"truncated image ({err})"
                else:
                    err = f"not an image ({err})"
                out = (*out[:-1], err)
            return out

    return CheckedResizer


def _downloader_classes():
    from img2dataset.downloader import Downloader

    class BoundedDownloader(Downloader):
        """Fetches with :func:`fetch_image`: ``fetch_deadline`` seconds and ``max_image_bytes`` per image,
        public addresses and the pairs of ``allow`` only."""

        def __init__(self, *args, fetch_deadline: float = DEFAULT_FETCH_DEADLINE,
                     max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES, allow: Allowed = frozenset(), **kwargs):
            super().__init__(*args, **kwargs)
            self.fetch_deadline, self.max_image_bytes, self.allow = fetch_deadline, max_image_bytes, allow

        def __call__(self, row):
            # img2dataset's shard loop fetches through its module's download_image (by global name);
            # a worker process runs one shard at a time.
            module = sys.modules["img2dataset.downloader"]
            saved = module.download_image
            module.download_image = functools.partial(fetch_image, deadline=self.fetch_deadline,
                                                      max_bytes=self.max_image_bytes, allow=self.allow)
            try:
                return super().__call__(row)
            finally:
                module.download_image = saved

    class GuardedDownloader(BoundedDownloader):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.parent_pid = os.getpid()

        def __call__(self, row):
            _die_with_parent(self.parent_pid)
            return super().__call__(row)

    return BoundedDownloader, GuardedDownloader


def _logger_class():
    from img2dataset.logger import LoggerProcess

    class GuardedLoggerProcess(LoggerProcess):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.parent_pid = os.getpid()

        def run(self):
            _die_with_parent(self.parent_pid)
            super().run()

    return GuardedLoggerProcess


_PATCH_LOCK = threading.Lock()
_EXTENSIONS: dict[str, type] = {}


def _extension(name: str) -> type:
    """The extension classes, built on first use (importing img2dataset is slow)."""
    if not _EXTENSIONS:
        for cls in (_resizer_class(), *_downloader_classes(), _logger_class()):
            cls.__module__, cls.__qualname__ = __name__, cls.__name__
            _EXTENSIONS[cls.__name__] = cls
    return _EXTENSIONS[name]


def __getattr__(name: str):
    # Spawned img2dataset workers unpickle storage.download.GuardedDownloader & co. by name.
    if name in ("CheckedResizer", "BoundedDownloader", "GuardedDownloader", "GuardedLoggerProcess"):
        return _extension(name)
    raise AttributeError(name)


def make_resizer(image_size: int, resize_mode: str, resize_only_if_bigger: bool, max_image_area: float,
                 encode_quality: int):
    """The resizer a download runs with (img2dataset.main builds it from the same arguments), for
    images that come from elsewhere (a mirror, a local folder): they are processed as downloaded ones."""
    return _extension("CheckedResizer")(image_size=image_size, resize_mode=resize_mode,
                                        resize_only_if_bigger=resize_only_if_bigger, encode_quality=encode_quality,
                                        encode_format=ENCODE_FORMAT, max_image_area=max_image_area)


@contextmanager
def _img2dataset_extensions(distributor: str = "multiprocessing", fetch_deadline: float = DEFAULT_FETCH_DEADLINE,
                            max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES, allow: Allowed = frozenset()) -> Iterator:
    import img2dataset.main  # noqa: F401 - the package re-exports a function named main

    main = sys.modules["img2dataset.main"]
    with _PATCH_LOCK:
        saved = (main.Resizer, main.Downloader, main.LoggerProcess)
        main.Resizer = _extension("CheckedResizer")
        # The parent guard is for pool workers spawned by this process. A Ray worker's parent is its
        # raylet, never this driver (the guard would kill it); Ray itself ends a dead driver's tasks.
        downloader = "GuardedDownloader" if distributor == "multiprocessing" else "BoundedDownloader"
        main.Downloader = functools.partial(_extension(downloader), fetch_deadline=fetch_deadline,
                                            max_image_bytes=max_image_bytes, allow=allow)
        # The logger is a child of this process under every distributor.
        main.LoggerProcess = _extension("GuardedLoggerProcess")
        try:
            yield
        finally:
            main.Resizer, main.Downloader, main.LoggerProcess = saved


@contextmanager
def _output_to(log_path: str) -> Iterator:
    """Send fds 1 and 2 (img2dataset's prints, its workers', tqdm) to ``log_path``; yield the old stderr."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    terminal = os.fdopen(os.dup(saved[1]), "w", buffering=1)
    with open(log_path, "ab") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield terminal
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            except Exception:  # noqa: BLE001 - restoring the fds matters more
                pass
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
            terminal.close()


# --------------------------------------------------------------------------- shard validation


def _shard_name(shard_id: int) -> str:
    return f"{shard_id:0{OOM_SHARD_COUNT}d}"


def shard_files(shards_dir: str) -> dict[int, dict[str, str]]:
    """{shard id: {"tar"|"parquet"|"stats": path}} for the shard files present."""
    out: dict[int, dict[str, str]] = {}
    if not os.path.isdir(shards_dir):
        return out
    kinds = {"_stats.json": "stats", ".tar": "tar", ".parquet": "parquet"}
    for name in os.listdir(shards_dir):
        m = _SHARD_FILE.match(name)
        if m:
            out.setdefault(int(m.group(1)), {})[kinds[m.group(2)]] = os.path.join(shards_dir, name)
    return out


def check_shard(files: dict[str, str]) -> str | None:
    """Why a shard is inconsistent (None: complete and consistent)."""
    import pyarrow.parquet as pq

    for kind in ("stats", "parquet", "tar"):
        if kind not in files:
            return f"no {kind} file"
    try:
        with open(files["stats"]) as f:
            stats = json.load(f)
        count, successes = int(stats["count"]), int(stats["successes"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"unreadable stats ({exc})"
    try:
        rows = pq.ParquetFile(files["parquet"]).metadata.num_rows
    except Exception as exc:  # noqa: BLE001 - any parquet error means redo
        return f"unreadable parquet ({exc})"
    if rows != count:
        return f"parquet has {rows} rows, stats say {count}"
    try:
        images = 0
        with tarfile.open(files["tar"], "r:") as tar:
            for member in tar:
                if member.name.endswith("." + ENCODE_FORMAT):
                    images += 1
    except (tarfile.TarError, OSError, EOFError) as exc:
        return f"unreadable tar ({exc})"
    if images != successes:
        return f"tar has {images} images, stats say {successes} successes"
    return None


def validate_shards(shards_dir: str) -> dict[int, str]:
    """Delete every inconsistent shard's files so img2dataset redoes it; return {shard id: why}."""
    removed: dict[int, str] = {}
    for shard_id, files in sorted(shard_files(shards_dir).items()):
        why = check_shard(files)
        if why is not None:
            for path in files.values():
                os.unlink(path)
            removed[shard_id] = why
    return removed


# --------------------------------------------------------------------------- status and summary


def attempts(shards_dir: str):
    """All per-row attempts recorded in consistent shards: a pandas DataFrame with a ``shard`` column."""
    import pandas as pd
    import pyarrow.parquet as pq

    frames = []
    for shard_id, files in sorted(shard_files(shards_dir).items()):
        if "stats" not in files or "parquet" not in files:
            continue
        df = pq.read_table(files["parquet"], columns=["image_key", "url", "key", "status", "error_message"]).to_pandas()
        df["shard"] = shard_id
        frames.append(df)
    if not frames:
        return pd.DataFrame(columns=["image_key", "url", "key", "status", "error_message", "shard"])
    return pd.concat(frames, ignore_index=True)


def latest_status(shards_dir: str):
    """One row per image key: its latest attempt (highest shard), error class and number of attempts."""
    att = attempts(shards_dir)
    att = att.sort_values(["image_key", "shard"], kind="stable")
    n = att.groupby("image_key", sort=False).size()
    latest = att.drop_duplicates("image_key", keep="last").set_index("image_key")
    latest["attempts"] = n.reindex(latest.index).astype("int64")
    latest["error_class"] = [None if s == "success" else (classify_error(e) or "other")
                             for s, e in zip(latest["status"], latest["error_message"])]
    return latest.reset_index()


def _bytes_in(shards_dir: str) -> int:
    return sum(os.path.getsize(f["tar"]) for f in shard_files(shards_dir).values() if "tar" in f)


# --------------------------------------------------------------------------- download


def _n_rows(images_path: str) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(images_path).metadata.num_rows


def _check_urls(images_path: str) -> None:
    """Adapters reject non-http(s) urls; a file: url reaching urllib would read local files."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    urls = pq.read_table(images_path, columns=["url"])["url"]
    lower = pc.utf8_lower(urls)
    ok = pc.or_(pc.starts_with(lower, "http://"), pc.starts_with(lower, "https://"))
    bad = pc.invert(pc.fill_null(ok, False))
    if pc.any(bad).as_py():
        row = pc.index(bad, True).as_py()
        raise CCRKError(f"{images_path} row {row}: url {urls[row].as_py()!r} is not http(s)")


def _run_img2dataset(url_list: str, shards_dir: str, log_path: str, incremental_mode: str,
                     total_rows: int, progress: bool, options: dict, limits: dict) -> None:
    from img2dataset import download

    with _img2dataset_extensions(options["distributor"], **limits), _output_to(log_path) as terminal, \
            _progress(shards_dir, total_rows, progress, terminal, options["number_sample_per_shard"]):
        download(url_list=url_list, output_folder=shards_dir, input_format="parquet", url_col="url",
                 save_additional_columns=["image_key"], output_format="webdataset",
                 incremental_mode=incremental_mode, encode_format=ENCODE_FORMAT,
                 oom_shard_count=OOM_SHARD_COUNT, enable_wandb=False, **options)


@contextmanager
def _progress(shards_dir: str, total_rows: int, enabled: bool, terminal, per_shard: int) -> Iterator:
    """A bar of rows done (from the stats files img2dataset writes), drawn on the real terminal."""
    if not enabled or total_rows == 0 or not terminal.isatty():
        yield
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    before = set(shard_files(shards_dir))
    stop = threading.Event()
    prog = Progress(TextColumn("[bold]downloading"), BarColumn(), MofNCompleteColumn(), TextColumn("images"),
                    TimeElapsedColumn(), TimeRemainingColumn(), console=Console(file=terminal))

    def poll(task):
        while not stop.wait(0.5):
            done = 0
            for sid, files in shard_files(shards_dir).items():
                if sid not in before and "stats" in files:
                    done += per_shard
            prog.update(task, completed=min(done, total_rows))

    with prog:
        task = prog.add_task("download", total=total_rows)
        t = threading.Thread(target=poll, args=(task,), daemon=True)
        t.start()
        try:
            yield
        finally:
            stop.set()
            t.join()
            prog.update(task, completed=total_rows)


def download_images(prepared, *, image_size: int = 256, resize_mode: str = "border",
                    resize_only_if_bigger: bool = False, processes: int = 1, thread_count: int = 16,
                    timeout: int = 10, retries: int = 0, retry_failed: bool = False,
                    max_image_area: float = DEFAULT_MAX_IMAGE_AREA, number_sample_per_shard: int = 10_000,
                    encode_quality: int = 95, user_agent_token: str | None = None,
                    fetch_deadline: int = DEFAULT_FETCH_DEADLINE, max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
                    allow_addresses: list[str] | None = None,
                    progress: bool = True, distributor: str = "multiprocessing",
                    cluster: Callable[[], ContextManager] | None = None) -> dict:
    """Download ``prepared.images_path`` into ``prepared.directory/shards`` and write ``summary.json``.

    ``prepared`` is a :class:`storage.sources.PreparedSource` (any object with ``source``, ``version``,
    ``directory``, ``images_path``, ``rows_read``, ``rejected``). Safe to call again after any
    interruption: finished shards are kept, partial ones redone.

    ``distributor``: ``multiprocessing`` (``processes`` local workers) or ``ray`` (one Ray task per
    shard on the Ray cluster initialised in this process). The shards are the same either way.
    ``cluster``: entered before the first img2dataset run, and only when there is something to
    download (e.g. the caller's ``lambda: ray_cluster(address)``, which joins or starts the Ray
    cluster for the download and leaves it after); None: the cluster is the caller's business.
    ``fetch_deadline``: seconds for one image's whole fetch (``timeout`` bounds each read);
    ``max_image_bytes``: a longer body is not read further. Both fail the image in classes of their own.
    ``allow_addresses``: exact ``HOST:PORT`` pairs fetched from though not public (beside those of
    ``CCRK_ALLOW_ADDRESSES``; :mod:`storage.addresses`); other such targets fail as blocked_address.
    """
    if distributor not in DISTRIBUTORS:
        raise CCRKError(f"unknown distributor {distributor!r}: use one of {', '.join(DISTRIBUTORS)}")

    directory = str(prepared.directory)
    shards_dir = os.path.join(directory, SHARDS)
    work_dir = os.path.join(directory, "_work")
    os.makedirs(shards_dir, exist_ok=True)
    os.makedirs(work_dir, exist_ok=True)
    log_path = os.path.join(directory, "img2dataset.log")

    record_layout(directory, number_sample_per_shard, image_size, resize_mode)

    options = dict(image_size=image_size, resize_mode=resize_mode, resize_only_if_bigger=resize_only_if_bigger,
                   processes_count=processes, thread_count=thread_count, timeout=timeout, retries=retries,
                   max_image_area=max_image_area, number_sample_per_shard=number_sample_per_shard,
                   encode_quality=encode_quality, user_agent_token=user_agent_token,
                   disallowed_header_directives=list(OPT_OUT_DIRECTIVES), distributor=distributor)
    allow = allowed(allow_addresses)
    limits = dict(fetch_deadline=fetch_deadline, max_image_bytes=max_image_bytes)

    with ExitStack() as stack:
        connected: list[bool] = []

        def run(url_list: str, mode: str, total: int) -> None:
            if cluster is not None and not connected:  # join or start a cluster only when there is work
                stack.enter_context(cluster())
                connected.append(True)
            _run_img2dataset(url_list, shards_dir, log_path, mode, total, progress, options, {**limits, "allow": allow})

        settings = {**{k: v for k, v in options.items() if k != "disallowed_header_directives"}, **limits,
                    "allow_addresses": sorted(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in allow)}
        return _download(prepared, directory, shards_dir, work_dir, number_sample_per_shard, retry_failed,
                         settings, run)


def record_layout(directory: str, number_sample_per_shard: int, image_size: int, resize_mode: str) -> None:
    """Record the settings shard boundaries and images depend on (``download.json``), or check them
    against those recorded: a resumed run, a retry or a mirror fill must use the same ones."""
    layout_params = {"number_sample_per_shard": int(number_sample_per_shard), "image_size": int(image_size),
                     "resize_mode": resize_mode, "encode_format": ENCODE_FORMAT}
    params_path = os.path.join(directory, "download.json")
    if os.path.exists(params_path):
        with open(params_path) as f:
            previous = json.load(f)
        if previous != layout_params:
            raise CCRKError(f"{os.path.join(directory, SHARDS)} was downloaded with {previous}, not {layout_params}; "
                            "use the same settings or a fresh root")
    else:
        atomic.write_json(params_path, layout_params)


def _download(prepared, directory: str, shards_dir: str, work_dir: str, number_sample_per_shard: int,
              retry_failed: bool, settings: dict, run) -> dict:
    t0 = time.perf_counter()
    images_path = str(prepared.images_path)
    n_rows = _n_rows(images_path)
    _check_urls(images_path)
    n_main = math.ceil(n_rows / number_sample_per_shard)
    redone = validate_shards(shards_dir)

    def main_done() -> set[int]:
        return {s for s, f in shard_files(shards_dir).items() if s < n_main and "stats" in f}

    todo = n_main - len(main_done())
    rows_attempted = 0
    if todo:
        rows_attempted += min(n_rows, todo * number_sample_per_shard)
        run(images_path, "incremental", rows_attempted)
        redone.update(validate_shards(shards_dir))
    incomplete = n_main - len(main_done())

    retried = 0
    if retry_failed and incomplete == 0 and n_rows:
        status = latest_status(shards_dir)
        again = status[status["error_class"].isin(RETRYABLE)][["image_key", "url"]]
        retried = len(again)
        if retried:
            retry_path = os.path.join(work_dir, "retry-input.parquet")
            atomic.write_parquet(again.reset_index(drop=True), retry_path)
            rows_attempted += retried
            run(retry_path, "extend", retried)
            redone.update(validate_shards(shards_dir))
    wall = time.perf_counter() - t0
    return write_summary(prepared, n_rows, incomplete=incomplete, redone=redone, retried=retried,
                         rows_attempted=rows_attempted, wall=wall, settings=settings)


def write_summary(prepared, n_rows: int, *, incomplete: int, redone, retried: int, rows_attempted: int, wall: float,
                  settings: dict) -> dict:
    """``download_status.parquet`` (each image's latest attempt) and ``summary.json`` of the shards
    in ``prepared.directory``, whoever wrote them (img2dataset, a mirror fill, a local folder)."""
    directory = str(prepared.directory)
    shards_dir = os.path.join(directory, SHARDS)
    status = latest_status(shards_dir)
    atomic.write_parquet(status[["image_key", "url", "shard", "key", "status", "error_class", "error_message",
                                 "attempts"]], os.path.join(directory, "download_status.parquet"))
    ok = int((status["status"] == "success").sum())
    failures = Counter(c for c in status["error_class"] if c is not None)
    summary = {
        "source": prepared.source,
        "version": prepared.version,
        "rows_read": int(prepared.rows_read),
        "rows_rejected": {k: int(v) for k, v in sorted(dict(prepared.rejected).items())},
        # kept after a fix (control characters in a caption: storage.sources.base)
        "rows_fixed": {k: int(v) for k, v in sorted(dict(getattr(prepared, "fixed", None) or {}).items())},
        "images": n_rows,
        "images_ok": ok,
        "images_failed": int(sum(failures.values())),
        "failures": {c: int(failures.get(c, 0)) for c in FAILURE_CLASSES},
        "retryable_failures": int(sum(failures.get(c, 0) for c in RETRYABLE)),
        "not_attempted": int(n_rows - len(status)),
        "retried": retried,
        "recovered_by_retry": int(((status["attempts"] > 1) & (status["status"] == "success")).sum()),
        "superseded_failures": int((status["attempts"] - 1).sum()) if len(status) else 0,
        "shards": len(shard_files(shards_dir)),
        "shards_incomplete": incomplete,
        "shards_redone": sorted(redone),
        "bytes": _bytes_in(shards_dir),
        "rows_attempted": rows_attempted,
        "wall_s": round(wall, 3),
        "images_per_s": round(rows_attempted / wall, 2) if wall > 0 and rows_attempted else 0.0,
        "settings": settings,
    }
    atomic.write_json(os.path.join(directory, "summary.json"), summary)
    return summary
