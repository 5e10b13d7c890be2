"""Conceptual Captions (CC3M): Google's tsv files, ``caption<TAB>url`` per line, no header.

Files: ``Train_GCC-training.tsv`` / ``GCC-training.tsv`` (split ``train``) and
``Validation_GCC-1.1.0-Validation.tsv`` (split ``validation``: any name containing "valid").
One caption per line.

Ids: an image's ``source_id`` is sha256(url)[:16] (:func:`~storage.sources.base.url_id`), so the
same url twice is one image whatever the row order or ``limit``; a caption's id is
``cc3m-<split>-<line number>`` (0-based), unique within the source.
"""
from __future__ import annotations

import os

import pyarrow as pa

from storage.sources.base import Rejects, SourceTables, add_url_caption, iter_lines, url_id

NAME = "cc3m"
IMAGE_EXTRAS = {"split": pa.string()}
CAPTION_EXTRAS = {"split": pa.string(), "row": pa.int64()}
# Archive members worth extracting.
MEMBER_PATTERNS = ("*.tsv",)


def split_of(path: str) -> str:
    return "validation" if "valid" in os.path.basename(path).lower() else "train"


def detect(files: list[str]) -> list[str]:
    """The tsv files, train before validation."""
    tsv = [f for f in files if f.lower().endswith(".tsv")]
    return sorted(tsv, key=lambda f: (split_of(f) != "train", os.path.basename(f), f))


def read(files: list[str], rejects: Rejects, limit: int | None = None,
         max_caption_chars: int = 1000) -> tuple[pa.Table, pa.Table]:
    tables = SourceTables(NAME, rejects, image_extras=IMAGE_EXTRAS, caption_extras=CAPTION_EXTRAS,
                          limit=limit, max_caption_chars=max_caption_chars)
    for path in detect(files):
        split = split_of(path)
        image_extras = {"split": split}
        for lineno, line in iter_lines(path, "CC3M"):
            fields = line.split("\t") if line is not None else None
            if tables.full and fields and len(fields) == 2 and \
                    not tables.has_image(f"{NAME}-{url_id(fields[1])}"):
                return tables.finish()  # limit reached: the next new image is not wanted
            rejects.rows_read += 1
            at = (path, lineno + 1, "line")
            if fields is None:
                rejects.add("invalid_utf8", at)
            elif len(fields) != 2:
                rejects.add("malformed_row", at)
            else:
                add_url_caption(tables, fields[0], fields[1], f"{split}-{lineno}", at,
                                image_extras=image_extras, caption_extras={"split": split, "row": lineno})
    return tables.finish()
