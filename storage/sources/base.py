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
Records an adapter leaves out by a published split, not for a fault (COCO: Karpathy's val and test,
the benchmarks): ``excluded_split`` (an image of a split not kept), ``caption_of_excluded_image``,
``not_in_split_file`` (an image the split file does not list).

Fixed, not rejected, and counted (``Rejects.fixed``): ``control_characters`` -- a caption holding
terminal escape sequences (ESC ``[``/``]`` ...) or other control characters (C0 but tab/newline,
DEL, C1: NUL among them) has each sequence or character replaced by a space, so none reaches a
shard, a report or a terminal.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from collections import Counter
from typing import Any, Iterator

import pyarrow as pa

from storage.errors import CCRKError

DEFAULT_MAX_CAPTION_CHARS = 1000
REJECT_CLASSES = ("malformed_row", "invalid_utf8", "bad_url_scheme", "blank_caption", "overlong_caption",
                  "duplicate_id", "orphan_caption", "caption_of_rejected_image", "no_caption",
                  "excluded_split", "caption_of_excluded_image", "not_in_split_file")
ALLOWED_SCHEMES = ("http", "https")
_FETCHABLE = re.compile(rf"(?:{'|'.join(ALLOWED_SCHEMES)})://[^/?#\s]", re.IGNORECASE)
_EXAMPLES_PER_CLASS = 3
FIX_CLASSES = ("control_characters",)
# A terminal escape sequence (CSI ``ESC [ ... final``, OSC ``ESC ] ... BEL|ESC \``, or ESC and one
# character), else one control character: C0 (tab, newline and carriage return too: a caption is one
# line), DEL and C1.
_CONTROL = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b.?|[\x00-\x1f\x7f-\x9f]",
                      re.DOTALL)
_UNSAFE_ID = re.compile(r"[^A-Za-z0-9_-]")


class Rejects:
    """Records read and records rejected, by class, with the first few places for the report."""

    def __init__(self) -> None:
        self.rows_read = 0
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = {}
        self.fixed: Counter[str] = Counter()  # records kept after a fix (FIX_CLASSES)

    def fix(self, cls: str, at: Any) -> None:
        """Count one record kept after a fix of class ``cls``, with its place among the examples."""
        if cls not in FIX_CLASSES:
            raise ValueError(f"unknown fix class {cls!r}")
        self.fixed[cls] += 1
        ex = self.examples.setdefault(cls, [])
        if len(ex) < _EXAMPLES_PER_CLASS:
            ex.append(where(*at) if isinstance(at, tuple) else str(at))

    def add(self, cls: str, at: Any) -> None:
        """Count one rejected record; ``at`` is a place string or a ``(path, index, unit)`` tuple."""
        if cls not in REJECT_CLASSES:
            raise ValueError(f"unknown reject class {cls!r}")
        self.counts[cls] += 1
        ex = self.examples.setdefault(cls, [])
        if len(ex) < _EXAMPLES_PER_CLASS:
            ex.append(where(*at) if isinstance(at, tuple) else str(at))

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
    # Same test as urlsplit: scheme http/https and a non-empty host part, without its cost per row.
    return None if _FETCHABLE.match(url.strip()) else "bad_url_scheme"


def without_controls(text: str) -> str:
    """``text`` with every terminal escape sequence and control character replaced by a space, and
    the whitespace runs that leaves collapsed."""
    return " ".join(_CONTROL.sub(" ", text).split())


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


_INT64 = range(-2**63, 2**63)  # what the int64 id columns hold; JSON allows integers of any size


def is_int(value: Any) -> bool:
    """An integer an int64 column holds (a larger one is no id: the row is malformed)."""
    return isinstance(value, int) and not isinstance(value, bool) and value in _INT64


def as_int(value: Any) -> int | None:
    """An integral JSON number (``12`` or ``12.0``) within int64 as int; None for anything else."""
    if is_int(value):
        return value
    if isinstance(value, float) and value.is_integer() and int(value) in _INT64:
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


_JSON_CHUNK = 1 << 20
_DECODER = json.JSONDecoder()
_WS = re.compile(r"[ \t\n\r]*")
_NUMBER_CHARS = frozenset("0123456789.eE+-")


def iter_json_array(path: str, what: str, description: str) -> Iterator[Any]:
    """The elements of a file holding one JSON array, streamed: memory holds one element and a
    read buffer (about 1 MiB), not the file (``json.load`` of Visual Genome's region file needs about
    8.7x its size). Bytes that are not UTF-8 survive as surrogates, as in :func:`read_json`. A file
    that is not a JSON array, or breaks off, is a :class:`CCRKError` naming it; ``description``
    says what it should hold (e.g. ``a list of images``)."""
    import codecs

    try:
        f = open(path, "rb")
    except OSError:
        read_bytes(path, what)  # raises the CCRKError that names the problem
        raise
    decoder = codecs.getincrementaldecoder("utf-8")(errors="surrogateescape")
    buf, pos, eof, started = "", 0, False, False

    def more() -> bool:
        nonlocal buf, pos, eof
        if eof:
            return False
        raw = f.read(_JSON_CHUNK)
        eof = not raw
        buf = buf[pos:] + decoder.decode(raw, final=eof)
        pos = 0
        return True

    def skip_ws() -> bool:
        """Advance past whitespace; False at the end of the file."""
        nonlocal pos
        while True:
            pos = _WS.match(buf, pos).end()
            if pos < len(buf) or not more():
                return pos < len(buf)

    def bad(problem: str) -> CCRKError:
        return CCRKError(f"{what} metadata file {path} has the wrong structure: expected {description} "
                         f"({problem})")

    with f:
        while not buf and more():
            pass
        if buf.startswith("\ufeff"):
            pos = 1
        if not skip_ws() or buf[pos] != "[":
            raise bad("it is not a JSON array")
        pos += 1
        while True:
            if not skip_ws():
                raise bad("the file ends inside the array")
            if buf[pos] == "]":
                return
            if started:
                if buf[pos] != ",":
                    raise bad(f"'{buf[pos]}' where ',' or ']' should be")
                pos += 1
                if not skip_ws():
                    raise bad("the file ends inside the array")
            while True:
                try:
                    element, end = _DECODER.raw_decode(buf, pos)
                    # A number cut by the buffer's end parses short ("0." as 0): read on and decode again.
                    if eof or (end < len(buf) and buf[end] not in _NUMBER_CHARS):
                        break
                except ValueError as exc:
                    if eof:
                        raise CCRKError(f"{what} metadata file {path} is not valid JSON ({exc})") from None
                if not more():
                    raise bad("the file ends inside an element")
            pos, started = end, True
            yield element


def iter_lines(path: str, what: str) -> Iterator[tuple[int, str | None]]:
    """(0-based line number, text or None when the line is not UTF-8), streamed; a final newline ends the last line."""
    try:
        f = open(path, "rb")
    except OSError:
        read_bytes(path, what)  # raises the CCRKError that names the problem
        raise
    with f:
        for i, raw in enumerate(f):
            if i == 0 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            if raw.endswith(b"\n"):
                raw = raw[:-2] if raw.endswith(b"\r\n") else raw[:-1]
            try:
                yield i, raw.decode("utf-8")
            except UnicodeDecodeError:
                yield i, None


def require_type(obj: Any, kind: type, path: str, what: str, description: str) -> Any:
    if not isinstance(obj, kind):
        raise CCRKError(f"{what} metadata file {path} has the wrong structure: expected {description}, "
                        f"found {type(obj).__name__}")
    return obj


def where(path: str, index: int | tuple[int, int], unit: str = "row") -> str:
    """A record's place for reports: ``image_data.json record 12``; a pair index reads ``entry 3 region 0``."""
    if isinstance(index, tuple):
        index = f"{index[0]} region {index[1]}"
    return f"{os.path.basename(path)} {unit} {index}"


# --------------------------------------------------------------------------- tables


class SourceTables:
    """Builds images and captions column by column: one image row per image key, however many captions.

    ``image_extras`` / ``caption_extras`` map extra column names to arrow types (missing -> null).
    ``limit`` keeps the first N images (in reading order) that end up with at least one caption.
    Places (``at``) are strings or ``(path, index, unit)`` tuples, formatted only when reported.
    """

    def __init__(self, source: str, rejects: Rejects, *, image_extras: dict[str, pa.DataType],
                 caption_extras: dict[str, pa.DataType], limit: int | None = None,
                 max_caption_chars: int = DEFAULT_MAX_CAPTION_CHARS) -> None:
        self.source = source
        self.rejects = rejects
        self.limit = limit
        self.max_caption_chars = max_caption_chars
        self.image_schema = pa.schema([("image_key", pa.string()), ("url", pa.string()), ("source", pa.string()),
                                       ("source_id", pa.string()), *image_extras.items()])
        self.caption_schema = pa.schema([("image_key", pa.string()), ("caption_id", pa.string()),
                                         ("caption", pa.string()), *caption_extras.items()])
        self._image_extras = tuple(image_extras)
        self._caption_extras = tuple(caption_extras)
        self._images: dict[str, list] = {name: [] for name in self.image_schema.names}
        self._index: dict[str, int] = {}  # image_key -> row in the image columns
        self._n_captions: list[int] = []  # per image row: captions kept
        self._n_with_caption = 0
        self._rejected_images: set[str] = set()
        self._captions: dict[str, list] = {name: [] for name in self.caption_schema.names}
        self._caption_image: list[int] = []  # per caption row: its image row
        self._caption_ids: set[str] = set()
        self._caption_texts: set[tuple[str, str]] = set()

    def image_key(self, source_id: Any) -> str:
        if isinstance(source_id, int):
            return f"{self.source}-{source_id}"
        return f"{self.source}-{safe_id(source_id)}"

    def has_image(self, image_key: str) -> bool:
        return image_key in self._index

    @property
    def full(self) -> bool:
        """True once ``limit`` images have a caption: a streaming reader may stop at the next new image."""
        return self.limit is not None and self._n_with_caption >= self.limit

    def add_image(self, source_id: Any, url: Any, at: Any, **extras: Any) -> str | None:
        """Add an image; returns its key, or None when rejected (bad url, duplicate id)."""
        key = self.image_key(source_id)
        problem = url_problem(url)
        if problem:
            self.rejects.add(problem, at)
            if key not in self._index:
                self._rejected_images.add(key)
            return None
        if key in self._index:
            self.rejects.add("duplicate_id", at)
            return None
        self._append_image(key, str(source_id), url.strip(), extras)
        return key

    def _append_image(self, key: str, source_id: str, url: str, extras: dict[str, Any]) -> None:
        self._rejected_images.discard(key)
        self._index[key] = len(self._n_captions)
        self._n_captions.append(0)
        cols = self._images
        cols["image_key"].append(key)
        cols["url"].append(url)
        cols["source"].append(self.source)
        cols["source_id"].append(source_id)
        for name in self._image_extras:
            cols[name].append(extras.get(name))

    def add_caption(self, image_key: str, caption_id: str, caption: Any, at: Any, *,
                    dedupe_text: bool = False, **extras: Any) -> bool:
        """Attach a caption to an image already added; returns whether it was kept.

        ``dedupe_text``: for sources without caption ids (CC3M, SBU), the same text for the same
        image twice is a duplicate.
        """
        caption = self.cleaned(caption, at)
        problem = caption_problem(caption, self.max_caption_chars)
        if problem:
            self.rejects.add(problem, at)
            return False
        row = self._index.get(image_key)
        if row is None:
            self.rejects.add("caption_of_rejected_image" if image_key in self._rejected_images
                             else "orphan_caption", at)
            return False
        text = caption.strip()
        if caption_id in self._caption_ids or (dedupe_text and (image_key, text) in self._caption_texts):
            self.rejects.add("duplicate_id", at)
            return False
        self._caption_ids.add(caption_id)
        if dedupe_text:
            self._caption_texts.add((image_key, text))
        if self._n_captions[row] == 0:
            self._n_with_caption += 1
        self._n_captions[row] += 1
        self._caption_image.append(row)
        cols = self._captions
        cols["image_key"].append(image_key)
        cols["caption_id"].append(caption_id)
        cols["caption"].append(text)
        for name in self._caption_extras:
            cols[name].append(extras.get(name))
        return True

    def cleaned(self, caption: Any, at: Any) -> Any:
        """``caption`` without control characters (:func:`without_controls`), counted as fixed when
        that leaves text; anything else as it is."""
        if isinstance(caption, str) and _CONTROL.search(caption):
            caption = without_controls(caption)
            if caption:
                self.rejects.fix("control_characters", at)
        return caption

    def finish(self) -> tuple[pa.Table, pa.Table]:
        """The images and captions tables: captionless images dropped (counted), then ``limit`` applied."""
        keep_image = []
        kept = 0
        for key, n in zip(self._images["image_key"], self._n_captions):
            if n == 0:
                self.rejects.add("no_caption", f"image {key}")
                keep_image.append(False)
            elif self.limit is None or kept < self.limit:
                kept += 1
                keep_image.append(True)
            else:
                keep_image.append(False)
        images = pa.Table.from_pydict(self._images, schema=self.image_schema)
        captions = pa.Table.from_pydict(self._captions, schema=self.caption_schema)
        keep_caption = [keep_image[row] for row in self._caption_image]
        return (images.filter(pa.array(keep_image, pa.bool_())),
                captions.filter(pa.array(keep_caption, pa.bool_())))


def url_id(url: str) -> str:
    """A stable id for sources that have none but the url (CC3M, SBU): sha256(url), 16 hex digits."""
    return hashlib.sha256(url.strip().encode("utf-8")).hexdigest()[:16]


def add_url_caption(tables: SourceTables, caption: Any, url: Any, caption_id: str, at: Any, *,
                    image_extras: dict[str, Any], caption_extras: dict[str, Any]) -> None:
    """One (caption, url) record of a url-keyed source: images dedupe on url, captions attach to it.

    Both fields are checked before anything is added, so a record with a bad caption adds no image.
    """
    problem = url_problem(url)
    if not problem:
        caption = tables.cleaned(caption, at)
        problem = caption_problem(caption, tables.max_caption_chars)
    if problem:
        tables.rejects.add(problem, at)
        return
    url = url.strip()
    source_id = url_id(url)
    key = f"{tables.source}-{source_id}"  # hex digits: already a safe key
    if not tables.has_image(key):
        tables._append_image(key, source_id, url, image_extras)
    tables.add_caption(key, f"{tables.source}-{caption_id}", caption, at, dedupe_text=True, **caption_extras)


