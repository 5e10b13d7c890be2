"""What every source adapter shares: reject counting, row checks, safe reading, the table builder.

An adapter reads its official files record by record; a bad record is counted under one reject
class and skipped, never fatal. Missing or unreadable metadata (no such file, not JSON, wrong
top-level structure) is fatal: :class:`~storage.errors.CCRKError` naming the file.

Reject classes, checked in this order for a record:
``malformed_row`` (missing/extra columns, wrong types), ``invalid_utf8`` (a byte sequence that is
not UTF-8, detected per line / per record), ``bad_url_scheme`` (anything but http/https with a
host: ``file:``, ``ftp:``, ``javascript:``, ``data:``, no scheme), ``blank_caption``,
``overlong_caption`` (more than ``max_caption_chars`` characters), ``duplicate_id`` (an image id or
caption id seen before: the first one is kept), ``orphan_caption`` (a caption for an image id the
metadata never lists), ``caption_of_rejected_image`` (a caption whose image was rejected),
``no_caption`` (an image left with no valid caption: nothing to train on).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from collections import Counter
from typing import Any, Iterator
from urllib.parse import urlsplit

import pyarrow as pa

from storage.errors import CCRKError

DEFAULT_MAX_CAPTION_CHARS = 1000
REJECT_CLASSES = ("malformed_row", "invalid_utf8", "bad_url_scheme", "blank_caption", "overlong_caption",
                  "duplicate_id", "orphan_caption", "caption_of_rejected_image", "no_caption")
ALLOWED_SCHEMES = ("http", "https")
_EXAMPLES_PER_CLASS = 3
_UNSAFE_ID = re.compile(r"[^A-Za-z0-9_-]")


class Rejects:
    """Records read and records rejected, by class, with the first few places for the report."""

    def __init__(self) -> None:
        self.rows_read = 0
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = {}

    def add(self, cls: str, where: str) -> None:
        if cls not in REJECT_CLASSES:
            raise ValueError(f"unknown reject class {cls!r}")
        self.counts[cls] += 1
        ex = self.examples.setdefault(cls, [])
        if len(ex) < _EXAMPLES_PER_CLASS:
            ex.append(where)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def as_dict(self) -> dict[str, int]:
        return {cls: self.counts[cls] for cls in REJECT_CLASSES if self.counts[cls]}

    def __getitem__(self, cls: str) -> int:
        return self.counts[cls]


# --------------------------------------------------------------------------- checks


def safe_id(text: str) -> str:
    """``text`` with every character outside [A-Za-z0-9_-] replaced by ``_`` (keys are dot-free)."""
    return _UNSAFE_ID.sub("_", str(text))


def url_problem(url: Any) -> str | None:
    """The reject class of a url, or None when it is a fetchable http(s) url."""
    if not isinstance(url, str):
        return "malformed_row"
    if has_invalid_text(url):
        return "invalid_utf8"
    try:
        parts = urlsplit(url.strip())
    except ValueError:
        return "bad_url_scheme"
    if parts.scheme.lower() not in ALLOWED_SCHEMES or not parts.netloc:
        return "bad_url_scheme"
    return None


def caption_problem(caption: Any, max_chars: int = DEFAULT_MAX_CAPTION_CHARS) -> str | None:
    """The reject class of a caption, or None when it is usable."""
    if not isinstance(caption, str):
        return "malformed_row"
    if has_invalid_text(caption):
        return "invalid_utf8"
    text = caption.strip()
    if not text:
        return "blank_caption"
    if len(text) > max_chars:
        return "overlong_caption"
    return None


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def as_int(value: Any) -> int | None:
    """An integral JSON number (``12`` or ``12.0``) as int; None for anything else."""
    if is_int(value):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def has_invalid_text(text: str) -> bool:
    """True when ``text`` holds surrogates: bytes that were not UTF-8 (decoded with surrogateescape)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


# --------------------------------------------------------------------------- reading


def read_bytes(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise CCRKError(f"{what} metadata file not found: {path}") from None
    except IsADirectoryError:
        raise CCRKError(f"{what} metadata path is a directory, not a file: {path}") from None
    except OSError as exc:
        raise CCRKError(f"cannot read {what} metadata file {path}: {exc.strerror or exc}") from None


def read_json(path: str, what: str) -> Any:
    """Parse a JSON metadata file; bytes that are not UTF-8 survive as surrogates (see has_invalid_text)."""
    data = read_bytes(path, what)
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        return json.loads(data.decode("utf-8", errors="surrogateescape"))
    except ValueError as exc:
        raise CCRKError(f"{what} metadata file {path} is not valid JSON ({exc})") from None


def iter_lines(path: str, what: str) -> Iterator[tuple[int, str | None]]:
    """(0-based line number, text or None when the line is not UTF-8); a final newline ends the last line."""
    data = read_bytes(path, what)
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    for i, raw in enumerate(lines):
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        try:
            yield i, raw.decode("utf-8")
        except UnicodeDecodeError:
            yield i, None


def require_type(obj: Any, kind: type, path: str, what: str, description: str) -> Any:
    if not isinstance(obj, kind):
        raise CCRKError(f"{what} metadata file {path} has the wrong structure: expected {description}, "
                        f"found {type(obj).__name__}")
    return obj


def where(path: str, index: int, unit: str = "row") -> str:
    return f"{os.path.basename(path)} {unit} {index}"


# --------------------------------------------------------------------------- tables


class SourceTables:
    """Builds images and captions column by column: one image row per image key, however many captions.

    ``image_extras`` / ``caption_extras`` map extra column names to arrow types (missing -> null).
    ``limit`` keeps the first N images (in reading order) that end up with at least one caption.
    """

    def __init__(self, source: str, rejects: Rejects, *, image_extras: dict[str, pa.DataType],
                 caption_extras: dict[str, pa.DataType], limit: int | None = None,
                 max_caption_chars: int = DEFAULT_MAX_CAPTION_CHARS) -> None:
        self.source = source
        self.rejects = rejects
        self.limit = limit
        self.max_caption_chars = max_caption_chars
        self.image_extras = image_extras
        self.caption_extras = caption_extras
        self._images: dict[str, dict[str, Any]] = {}  # image_key -> row, insertion-ordered
        self._rejected_images: set[str] = set()
        self._caption_ids: set[str] = set()
        self._caption_texts: set[tuple[str, str]] = set()
        self._captions: list[dict[str, Any]] = []
        self._with_caption: set[str] = set()

    def image_key(self, source_id: Any) -> str:
        return f"{self.source}-{safe_id(source_id)}"

    def has_image(self, image_key: str) -> bool:
        return image_key in self._images

    def is_rejected_image(self, image_key: str) -> bool:
        return image_key in self._rejected_images

    @property
    def full(self) -> bool:
        """True once ``limit`` images have a caption: a streaming reader may stop at the next new image."""
        return self.limit is not None and len(self._with_caption) >= self.limit

    def add_image(self, source_id: Any, url: Any, where: str, **extras: Any) -> str | None:
        """Add an image; returns its key, or None when rejected (bad url, duplicate id)."""
        key = self.image_key(source_id)
        problem = url_problem(url)
        if problem:
            self.rejects.add(problem, where)
            if key not in self._images:
                self._rejected_images.add(key)
            return None
        if key in self._images:
            self.rejects.add("duplicate_id", where)
            return None
        self._rejected_images.discard(key)
        self._images[key] = {"image_key": key, "url": url.strip(), "source": self.source,
                             "source_id": str(source_id), **extras}
        return key

    def add_caption(self, image_key: str, caption_id: str, caption: Any, where: str, *,
                    dedupe_text: bool = False, **extras: Any) -> bool:
        """Attach a caption to an image already added; returns whether it was kept.

        ``dedupe_text``: for sources without caption ids (CC3M, SBU), the same text for the same
        image twice is a duplicate.
        """
        problem = caption_problem(caption, self.max_caption_chars)
        if problem:
            self.rejects.add(problem, where)
            return False
        if image_key not in self._images:
            self.rejects.add("caption_of_rejected_image" if image_key in self._rejected_images
                             else "orphan_caption", where)
            return False
        text = caption.strip()
        if caption_id in self._caption_ids or (dedupe_text and (image_key, text) in self._caption_texts):
            self.rejects.add("duplicate_id", where)
            return False
        self._caption_ids.add(caption_id)
        if dedupe_text:
            self._caption_texts.add((image_key, text))
        self._with_caption.add(image_key)
        self._captions.append({"image_key": image_key, "caption_id": caption_id, "caption": text, **extras})
        return True

    def finish(self) -> tuple[pa.Table, pa.Table]:
        """The images and captions tables: captionless images dropped (counted), then ``limit`` applied."""
        kept: list[dict[str, Any]] = []
        for key, row in self._images.items():
            if key not in self._with_caption:
                self.rejects.add("no_caption", f"image {key}")
                continue
            if self.limit is None or len(kept) < self.limit:
                kept.append(row)
        keys = {r["image_key"] for r in kept}
        captions = [c for c in self._captions if c["image_key"] in keys]
        images_schema = pa.schema([("image_key", pa.string()), ("url", pa.string()), ("source", pa.string()),
                                   ("source_id", pa.string()), *self.image_extras.items()])
        captions_schema = pa.schema([("image_key", pa.string()), ("caption_id", pa.string()),
                                     ("caption", pa.string()), *self.caption_extras.items()])
        return _table(kept, images_schema), _table(captions, captions_schema)


def url_id(url: str) -> str:
    """A stable id for sources that have none but the url (CC3M, SBU): sha256(url), 16 hex digits."""
    return hashlib.sha256(url.strip().encode("utf-8")).hexdigest()[:16]


def add_url_caption(tables: SourceTables, caption: Any, url: Any, caption_id: str, at: str, *,
                    image_extras: dict[str, Any], caption_extras: dict[str, Any]) -> None:
    """One (caption, url) record of a url-keyed source: images dedupe on url, captions attach to it.

    Both fields are checked before anything is added, so a record with a bad caption adds no image.
    """
    problem = url_problem(url) or caption_problem(caption, tables.max_caption_chars)
    if problem:
        tables.rejects.add(problem, at)
        return
    source_id = url_id(url)
    key = tables.image_key(source_id)
    if not tables.has_image(key):
        tables.add_image(source_id, url, at, **image_extras)
    tables.add_caption(key, f"{tables.source}-{caption_id}", caption, at, dedupe_text=True, **caption_extras)


def _table(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    return pa.Table.from_pydict({f.name: [r.get(f.name) for r in rows] for f in schema}, schema=schema)
