"""SBU Captioned Photo Dataset: both official layouts.

- ``sbu-captions-all.json``: ``{"image_urls": [...], "captions": [...], "user_ids": [...]}``,
  parallel lists (``user_ids`` optional); record i is (image_urls[i], captions[i], user_ids[i]).
- ``SBU_captioned_photo_dataset_urls.txt`` + ``SBU_captioned_photo_dataset_captions.txt``:
  line-aligned files, line i of one belongs to line i of the other.

One caption per record. Ids: ``source_id`` = sha256(url)[:16], so a url listed twice (or in both
layouts) is one image; caption id ``sbu-json-<i>`` / ``sbu-txt-<i>``. A record present in only one
of two parallel lists (unequal lengths) is a ``malformed_row``.
"""
from __future__ import annotations

import os
from itertools import zip_longest

import pyarrow as pa

from storage.errors import CCRKError
from storage.sources.base import (Rejects, SourceTables, add_url_caption, has_invalid_text, iter_lines,
                                  read_json, require_type, url_id)

NAME = "sbu"
IMAGE_EXTRAS = {"user_id": pa.string()}
CAPTION_EXTRAS = {"row": pa.int64()}
MEMBER_PATTERNS = ("*.json", "*urls*.txt", "*captions*.txt")
_MISSING = object()


def _is_json(f: str) -> bool:
    return f.lower().endswith(".json")


def _is_urls(f: str) -> bool:
    name = os.path.basename(f).lower()
    return name.endswith(".txt") and "urls" in name


def _captions_for(urls_file: str, files: list[str]) -> str | None:
    """The captions file paired with a urls file: same name with ``urls`` -> ``captions``."""
    d, name = os.path.split(urls_file)
    lower = name.lower()
    i = lower.rfind("urls")
    wanted = (lower[:i] + "captions" + lower[i + 4:])
    for f in files:
        if os.path.dirname(f) == d and os.path.basename(f).lower() == wanted:
            return f
    return None


def detect(files: list[str]) -> list[str]:
    """The json files and each urls/captions pair (urls file first), in that order."""
    out = sorted(f for f in files if _is_json(f))
    for u in sorted(f for f in files if _is_urls(f)):
        c = _captions_for(u, files)
        if c is None:
            raise CCRKError(f"SBU urls file {u} has no line-aligned captions file beside it "
                            f"(expected {os.path.basename(u).replace('urls', 'captions')})")
        out += [u, c]
    return out


def read(files: list[str], rejects: Rejects, limit: int | None = None,
         max_caption_chars: int = 1000) -> tuple[pa.Table, pa.Table]:
    tables = SourceTables(NAME, rejects, image_extras=IMAGE_EXTRAS, caption_extras=CAPTION_EXTRAS,
                          limit=limit, max_caption_chars=max_caption_chars)
    picked = detect(files)
    for path in [f for f in picked if _is_json(f)]:
        if not _read_json(path, tables, rejects):
            return tables.finish()
    pairs = [f for f in picked if not _is_json(f)]
    for urls_path, captions_path in zip(pairs[::2], pairs[1::2]):
        if not _read_pair(urls_path, captions_path, tables, rejects):
            return tables.finish()
    return tables.finish()


def _stop(tables: SourceTables, url) -> bool:
    return tables.full and not (isinstance(url, str) and tables.has_image(tables.image_key(url_id(url))))


def _read_json(path: str, tables: SourceTables, rejects: Rejects) -> bool:
    """Read one sbu-captions-all.json; False when ``limit`` stopped the read."""
    data = require_type(read_json(path, "SBU"), dict, path, "SBU",
                        'an object with "image_urls" and "captions" lists')
    for field in ("image_urls", "captions"):
        if not isinstance(data.get(field), list):
            raise CCRKError(f'SBU metadata file {path} has the wrong structure: no "{field}" list')
    users = data.get("user_ids")
    if not isinstance(users, list):
        users = None
    columns = [data["image_urls"], data["captions"]] + ([users] if users is not None else [])
    for i, record in enumerate(zip_longest(*columns, fillvalue=_MISSING)):
        url, caption = record[0], record[1]
        if _stop(tables, url):
            return False
        rejects.rows_read += 1
        at = (path, i, "record")
        user = record[2] if users is not None else None
        if _MISSING in record or (user is not None and not isinstance(user, str)):
            rejects.add("malformed_row", at)
            continue
        if user is not None and has_invalid_text(user):
            rejects.add("invalid_utf8", at)
            continue
        add_url_caption(tables, caption, url, f"json-{i}", at,
                        image_extras={"user_id": user}, caption_extras={"row": i})
    return True


def _read_pair(urls_path: str, captions_path: str, tables: SourceTables, rejects: Rejects) -> bool:
    """Read one line-aligned urls/captions pair; False when ``limit`` stopped the read."""
    urls = iter_lines(urls_path, "SBU")
    captions = iter_lines(captions_path, "SBU")
    for (ui, url), (ci, caption) in zip_longest(urls, captions, fillvalue=(None, _MISSING)):
        i = ui if ui is not None else ci
        if url is not _MISSING and _stop(tables, url):
            return False
        rejects.rows_read += 1
        at = (urls_path, i + 1, "line")
        if url is _MISSING or caption is _MISSING:
            rejects.add("malformed_row", at)
        elif url is None or caption is None:
            rejects.add("invalid_utf8", at)
        else:
            add_url_caption(tables, caption, url, f"txt-{i}", at,
                            image_extras={"user_id": None}, caption_extras={"row": i})
    return True
