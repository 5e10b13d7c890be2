"""Visual Genome (1.2): ``image_data.json`` + ``region_descriptions.json``; captions are region phrases.

- ``image_data.json``: a list of ``{"image_id", "url", "width", "height", "coco_id", "flickr_id"}``
  (VG 1.0 spells the id ``id``; both are read).
- ``region_descriptions.json``: a list of ``{"id": image_id, "regions": [{"region_id", "image_id",
  "phrase", "x", "y", "width", "height"}, ...]}``.

Ids: ``source_id`` = the VG image id; ``caption_id`` = ``vg-<region_id>``. Each caption keeps its
box as extras ``region_id, x, y, w, h`` (pixels of the original image).
"""
from __future__ import annotations

import os

import pyarrow as pa

from storage.errors import CCRKError
from storage.sources.base import Rejects, SourceTables, as_int, is_int, iter_json_array

NAME = "vg"
IMAGE_FILE = "image_data.json"
REGIONS_FILE = "region_descriptions.json"
IMAGE_EXTRAS = {"width": pa.int64(), "height": pa.int64(), "coco_id": pa.int64(), "flickr_id": pa.int64()}
CAPTION_EXTRAS = {"region_id": pa.int64(), "x": pa.int64(), "y": pa.int64(), "w": pa.int64(), "h": pa.int64()}
MEMBER_PATTERNS = (IMAGE_FILE, REGIONS_FILE)


def detect(files: list[str]) -> list[str]:
    """``[image_data.json, region_descriptions.json]``; both are required."""
    by_name = {}
    for f in sorted(files):
        by_name.setdefault(os.path.basename(f), f)
    if IMAGE_FILE not in by_name and REGIONS_FILE not in by_name:
        return []
    missing = [n for n in (IMAGE_FILE, REGIONS_FILE) if n not in by_name]
    if missing:
        raise CCRKError(f"Visual Genome needs both {IMAGE_FILE} and {REGIONS_FILE}; {missing[0]} is missing "
                        f"from the metadata given ({', '.join(os.path.basename(f) for f in files)})")
    return [by_name[IMAGE_FILE], by_name[REGIONS_FILE]]


def _optional_int(value):
    """An optional integer field: (ok, value)."""
    if value is None:
        return True, None
    v = as_int(value)
    return v is not None, v


def read(files: list[str], rejects: Rejects, limit: int | None = None,
         max_caption_chars: int = 1000) -> tuple[pa.Table, pa.Table]:
    picked = detect(files)
    if not picked:
        raise CCRKError(f"no Visual Genome metadata among {', '.join(files) or 'no files'}: "
                        f"expected {IMAGE_FILE} and {REGIONS_FILE}")
    image_path, regions_path = picked
    tables = SourceTables(NAME, rejects, image_extras=IMAGE_EXTRAS, caption_extras=CAPTION_EXTRAS,
                          limit=limit, max_caption_chars=max_caption_chars)
    # Both files are streamed element by element (the official region file is about 700 MB).
    for i, im in enumerate(iter_json_array(image_path, "Visual Genome", "a list of images")):
        rejects.rows_read += 1
        at = (image_path, i, "record")
        if not isinstance(im, dict):
            rejects.add("malformed_row", at)
            continue
        image_id = im.get("image_id", im.get("id"))
        fields = [_optional_int(im.get(k)) for k in ("width", "height", "coco_id", "flickr_id")]
        if not is_int(image_id) or "url" not in im or not all(ok for ok, _ in fields):
            rejects.add("malformed_row", at)
            continue
        width, height, coco_id, flickr_id = (v for _, v in fields)
        tables.add_image(image_id, im["url"], at, width=width, height=height, coco_id=coco_id,
                         flickr_id=flickr_id)

    entries = iter_json_array(regions_path, "Visual Genome", "a list of {id, regions} objects")
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("regions"), list):
            rejects.rows_read += 1
            rejects.add("malformed_row", (regions_path, i, "entry"))
            continue
        for j, region in enumerate(entry["regions"]):
            rejects.rows_read += 1
            at = (regions_path, (i, j), "entry")
            if not isinstance(region, dict):
                rejects.add("malformed_row", at)
                continue
            image_id = entry.get("id", region.get("image_id"))
            box = [as_int(region.get(k)) for k in ("x", "y", "width", "height")]
            region_id = region.get("region_id")
            if not is_int(image_id) or not is_int(region_id) or "phrase" not in region or None in box:
                rejects.add("malformed_row", at)
                continue
            x, y, w, h = box
            tables.add_caption(tables.image_key(image_id), f"{NAME}-{region_id}", region["phrase"], at,
                               region_id=region_id, x=x, y=y, w=w, h=h)
    return tables.finish()
