"""COCO Captions (2017): ``annotations/captions_train2017.json`` and ``captions_val2017.json``.

Each file: ``{"images": [{"id", "file_name", "coco_url", "width", "height", ...}],
"annotations": [{"id", "image_id", "caption"}], "info", "licenses"}``. Usually five captions per image.

Ids: ``source_id`` = the COCO image id; ``caption_id`` = ``coco-<annotation id>`` (``annotation_id``
is kept as an extra); ``split`` from the file name (``train2017``, ``val2017``).
"""
from __future__ import annotations

import os
import re

import pyarrow as pa

from storage.errors import CCRKError
from storage.sources.base import Rejects, SourceTables, as_int, has_invalid_text, is_int, read_json, require_type

NAME = "coco"
IMAGE_EXTRAS = {"split": pa.string(), "file_name": pa.string(), "width": pa.int64(), "height": pa.int64()}
CAPTION_EXTRAS = {"split": pa.string(), "annotation_id": pa.int64()}
MEMBER_PATTERNS = ("captions_*.json",)
_CAPTIONS_FILE = re.compile(r"^captions_(?P<split>[A-Za-z0-9_-]+)\.json$")


def detect(files: list[str]) -> list[str]:
    """The ``captions_<split>.json`` files, train before val."""
    picked = [f for f in files if _CAPTIONS_FILE.match(os.path.basename(f))]
    return sorted(picked, key=lambda f: (not os.path.basename(f).startswith("captions_train"),
                                         os.path.basename(f), f))


def split_of(path: str) -> str:
    return _CAPTIONS_FILE.match(os.path.basename(path)).group("split")


def read(files: list[str], rejects: Rejects, limit: int | None = None,
         max_caption_chars: int = 1000) -> tuple[pa.Table, pa.Table]:
    tables = SourceTables(NAME, rejects, image_extras=IMAGE_EXTRAS, caption_extras=CAPTION_EXTRAS,
                          limit=limit, max_caption_chars=max_caption_chars)
    for path in detect(files):
        split = split_of(path)
        data = require_type(read_json(path, "COCO"), dict, path, "COCO",
                            'an object with "images" and "annotations" lists')
        for field in ("images", "annotations"):
            if not isinstance(data.get(field), list):
                raise CCRKError(f'COCO metadata file {path} has the wrong structure: no "{field}" list')
        for i, im in enumerate(data["images"]):
            rejects.rows_read += 1
            at = (path, i, "image")
            if not isinstance(im, dict) or not is_int(im.get("id")) or "coco_url" not in im:
                rejects.add("malformed_row", at)
                continue
            size = [im.get("width"), im.get("height")]
            if any(v is not None and as_int(v) is None for v in size):
                rejects.add("malformed_row", at)
                continue
            file_name = im.get("file_name")
            tables.add_image(im["id"], im["coco_url"], at, split=split,
                             file_name=file_name if isinstance(file_name, str) and not has_invalid_text(file_name)
                             else None,
                             width=as_int(size[0]), height=as_int(size[1]))
        for i, ann in enumerate(data["annotations"]):
            rejects.rows_read += 1
            at = (path, i, "annotation")
            if not isinstance(ann, dict) or not is_int(ann.get("id")) or not is_int(ann.get("image_id")) \
                    or "caption" not in ann:
                rejects.add("malformed_row", at)
                continue
            tables.add_caption(tables.image_key(ann["image_id"]), f"{NAME}-{ann['id']}", ann["caption"], at,
                               split=split, annotation_id=ann["id"])
    return tables.finish()
