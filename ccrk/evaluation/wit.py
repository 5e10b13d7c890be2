"""WIT (IGLUE) read from its published files: annotations and image pixels apart, joined by ``image_url``.

IGLUE publishes ``test_<lang>.jsonl`` (and ``train_en.jsonl``, zipped, and ``val_en.jsonl``) with
``image_url`` and ``caption_reference_description`` but no image bytes. The pixels come from the Kaggle
"Wikipedia - Image/Caption Matching" release: ``image_data_test/image_pixels/test_image_pixels_part-0000N.csv``
and ``image_data_train/image_pixels/train_image_pixels_part-00NNN.csv.gz``, headerless lines
``image_url<TAB>b64_bytes<TAB>metadata_url``. The authors' ``utils/wit_preproc.py`` joins them into
annotation files with an ``image_content`` field; :func:`join_files` writes the same files, and
:func:`load_wit_joined` / :func:`load_wit_joined_train` join in memory without writing them.

One streaming pass over the pixel files serves every annotation file: only the base64 of wanted URLs is
kept, the first line of a URL wins (as in the reference), and the pass stops once every URL is found.
"""
from __future__ import annotations

import gzip
import json
import logging
import os
import tempfile
from typing import Callable, Iterable, Iterator, TextIO

from ccrk.evaluation.benchmarks import (Benchmark, CaptionCleaner, ImageRef, TrainPair, _Builder, _read_jsonl,
                                        _require, _wit_file, wit_groups, wit_langs)
from storage import atomic
from storage.errors import CCRKError

log = logging.getLogger(__name__)

PIXEL_SUFFIXES = (".csv", ".csv.gz", ".tsv", ".tsv.gz")
_SHOWN = 3  # missing URLs named in an error
_GZIP_MAGIC = b"\x1f\x8b"
Pixels = str | Iterable[str]


def pixel_files(path: str) -> list[str]:
    """``path`` itself, or the pixel files of a folder sorted by name (a Kaggle ``image_data_*`` folder
    stands for its ``image_pixels/``)."""
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise CCRKError(f"WIT pixel file or folder {path} not found")
    names = sorted(n for n in os.listdir(path) if n.endswith(PIXEL_SUFFIXES) and not n.startswith("."))
    if not names and os.path.isdir(os.path.join(path, "image_pixels")):
        return pixel_files(os.path.join(path, "image_pixels"))
    if not names:
        raise CCRKError(f"{path}: no WIT pixel files ({', '.join('*' + s for s in PIXEL_SUFFIXES)})")
    return [os.path.join(path, n) for n in names]


def _expand(pixels: Pixels) -> list[str]:
    return [f for p in ([pixels] if isinstance(pixels, str) else pixels) for f in pixel_files(p)]


def _open_text(path: str) -> TextIO:
    """A pixel file as text, gunzipped when it is gzip whatever its name says."""
    with open(path, "rb") as f:
        gzipped = f.read(2) == _GZIP_MAGIC
    if gzipped:
        return gzip.open(path, "rt", encoding="utf-8", errors="replace")
    return open(path, encoding="utf-8", errors="replace")


class _PixelScan:
    """One pass over pixel files yielding ``(url, b64)`` of the wanted URLs, first occurrence only; it
    stops once all are found. ``lines`` and ``malformed`` (lines without a tab or image) count as it goes."""

    def __init__(self, paths: list[str], wanted: set[str], progress: Callable[[str], None] | None = None):
        self.paths, self.wanted, self.progress = paths, wanted, progress
        self.lines = 0
        self.malformed = 0

    def __iter__(self) -> Iterator[tuple[str, str]]:
        left = set(self.wanted)
        for path in self.paths:
            if not left:
                return
            if self.progress:
                self.progress(path)
            with _open_text(path) as f:
                for line in f:
                    self.lines += 1
                    tab = line.find("\t")
                    if tab < 0:
                        self.malformed += line.strip() != ""
                        continue
                    url = line[:tab]
                    if url not in left:
                        continue  # unwanted lines are dropped before their bytes are copied
                    b64 = line[tab + 1:].split("\t", 1)[0].strip()
                    if not b64:
                        self.malformed += 1
                        continue
                    left.discard(url)
                    yield url, b64
                    if not left:
                        return

    def report(self) -> None:
        if self.malformed:
            log.warning("%d malformed line(s) in the WIT pixel files skipped", self.malformed)


def collect_images(pixel_paths: list[str], wanted: set[str],
                   progress: Callable[[str], None] | None = None) -> tuple[dict[str, str], int]:
    """The base64 image of every URL of ``wanted`` found in ``pixel_paths`` (url -> b64), and the lines read;
    ``progress(path)`` is called as each file is opened."""
    scan = _PixelScan(list(pixel_paths), wanted, progress)
    found = dict(scan)
    scan.report()
    return found, scan.lines


def _missing_error(missing: list[str], where: str, n_files: int) -> CCRKError:
    shown = ", ".join(missing[:_SHOWN]) + (f" and {len(missing) - _SHOWN} more" if len(missing) > _SHOWN else "")
    return CCRKError(f"{where}: {len(missing)} image(s) found in none of the {n_files} WIT pixel file(s) given "
                     f"({shown}); give the image_pixels folder holding them or pass --skip-missing")


def load_wit_joined(data_dir: str, pixels: Pixels, langs=None, skip_missing: bool = False,
                    max_words: int | None = None, split: str = "test") -> Benchmark:
    """``<split>_<lang>.jsonl`` under ``data_dir`` (or ``data_dir/annotations``) with images from the pixel
    files or folders ``pixels``; an ``image_content`` already in a line wins."""
    paths = {lang: _wit_file(data_dir, f"{split}_{lang}.jsonl") for lang in (langs or wit_langs(data_dir, split))}
    groups = {lang: wit_groups(path) for lang, path in paths.items()}
    wanted = {url for g in groups.values() for url, grp in g.items() if grp["b64"] is None}
    files = _expand(pixels) if wanted else []
    found, _ = collect_images(files, wanted)
    builders: dict[str, _Builder] = {}
    missing: dict[str, None] = {}  # ordered, first miss first
    for lang, path in paths.items():
        # Misses are skipped here and raised below, once, over every language.
        b = builders[lang] = _Builder("wit", lang, path, True, max_words=max_words)
        for url, g in groups[lang].items():
            b64 = g["b64"] or found.get(url)
            before = b.skipped_images
            b.add(url, ImageRef(key=f"wit:{url}", b64=b64), g["captions"], g["where"], b64 is not None)
            if b.skipped_images > before:
                missing[url] = None
    if missing and not skip_missing:
        raise _missing_error(list(missing), data_dir, len(files))
    bench = Benchmark("wit")
    for lang, b in builders.items():
        bench.sets[lang] = [b.build()]
    return bench


def load_wit_joined_train(path: str, pixels: Pixels, skip_missing: bool = False,
                          clean: CaptionCleaner | None = None) -> tuple[list[TrainPair], int]:
    """Training pairs of ``train_en.jsonl`` (or ``val_en.jsonl``) with images from ``pixels``; (pairs,
    skipped lines). ``clean`` as for :func:`ccrk.evaluation.benchmarks.load_xflickrco_train`."""
    clean = clean or CaptionCleaner()
    rows: list[tuple[str, str, str | None]] = []
    for n, row in _read_jsonl(path):
        _require(row, ("image_url", "caption_reference_description"), f"{path}:{n}")
        caption = clean(row["caption_reference_description"])
        if caption is not None:
            rows.append((row["image_url"], caption, row.get("image_content") or None))
    wanted = {url for url, _, b64 in rows if b64 is None}
    files = _expand(pixels) if wanted else []
    found, _ = collect_images(files, wanted)
    missing = sorted(wanted - set(found))
    if missing and not skip_missing:
        raise _missing_error(missing, path, len(files))
    pairs: list[TrainPair] = []
    skipped = 0
    for url, caption, b64 in rows:
        b64 = b64 or found.get(url)
        if b64 is None:
            skipped += 1
            continue
        pairs.append(TrainPair(ImageRef(key=f"wit:{url}", b64=b64), caption, url))
    return pairs, skipped


def _spool_images(scan: _PixelScan, spool) -> dict[str, tuple[int, int]]:
    """Write the scan's images to ``spool``; url -> (offset, length), so a join holds no image in memory."""
    where: dict[str, tuple[int, int]] = {}
    for url, b64 in scan:
        data = b64.encode("ascii", errors="replace")
        where[url] = (spool.tell(), len(data))
        spool.write(data)
    return where


def _join_one(path: str, out: str, spool, where: dict[str, tuple[int, int]]) -> dict:
    counts = {"lines": 0, "joined": 0, "missing": 0}
    with atomic.atomic_path(out) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for n, row in _read_jsonl(path):
            _require(row, ("image_url",), f"{path}:{n}")
            counts["lines"] += 1
            if not row.get("image_content") and row["image_url"] in where:
                offset, length = where[row["image_url"]]
                spool.seek(offset)
                row["image_content"] = spool.read(length).decode("ascii")
            counts["joined" if row.get("image_content") else "missing"] += 1
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return counts


def join_files(annotation_paths: list[str], pixels: Pixels, out_dir: str) -> dict:
    """The reference's preprocessing: each annotation file written to ``out_dir`` (same name, same lines in
    order) with ``image_content`` added from ``pixels``; a line whose image is in no pixel file keeps its
    fields without one. Returns {file name: {lines, joined, missing}}."""
    names = [os.path.basename(p) for p in annotation_paths]
    if len(set(names)) < len(names):
        raise CCRKError(f"annotation files to join share a name: {', '.join(sorted(names))}")
    wanted = set()
    for path in annotation_paths:
        for n, row in _read_jsonl(path):
            _require(row, ("image_url",), f"{path}:{n}")
            if not row.get("image_content"):
                wanted.add(row["image_url"])
    os.makedirs(out_dir, exist_ok=True)
    scan = _PixelScan(_expand(pixels) if wanted else [], wanted)
    counts = {}
    # Images go to a spool file beside the output: a training set's images do not fit in memory.
    with tempfile.TemporaryFile(dir=out_dir) as spool:
        where = _spool_images(scan, spool)
        scan.report()
        for path, name in zip(annotation_paths, names):
            counts[name] = _join_one(path, os.path.join(out_dir, name), spool, where)
    return counts
