"""Multi30K (Task 1) as a pre-training source: its English captions with their Flickr30K images
(CL2CM's setting: the targets come from ``ccrk translate``, as for any source).

Files, as a checkout of github.com/multi30k/dataset lays them out under ``data/task1/``:
``raw/<split>.en.gz`` (gzipped UTF-8, one caption a line) and ``image_splits/<split>.txt`` (one
Flickr30K file name a line): caption line ``i`` describes image line ``i``. The splits read are
``train`` and ``val``; the test splits are evaluation data and never read. Pass the checkout (or
``data/task1``) as ``--metadata``.

Images are not urls: they are the Flickr30K files (``flickr30k-images/<id>.jpg``, from its authors),
read from a local folder at acquire time (``ccrk acquire --images DIR``,
:func:`storage.local_shards.acquire_folder`). ``url`` is null and ``file`` names the image.

Ids: ``source_id`` is the Flickr30K id (the file name without extension), so ``image_key`` is
``multi30k-<flickr id>``; a caption's id is ``multi30k-<split>-<line>`` (0-based). An image listed
twice (in both splits, or twice in one) keeps its first caption line and adds the others.
"""
from __future__ import annotations

import gzip
import os

import pyarrow as pa

from storage.errors import CCRKError
from storage.sources.base import Rejects, SourceTables, caption_problem, safe_id

NAME = "multi30k"
SPLITS = ("train", "val")
IMAGE_EXTRAS = {"split": pa.string(), "file": pa.string()}
CAPTION_EXTRAS = {"split": pa.string(), "row": pa.int64()}
# Archive members worth extracting (a zip / tar.gz of the checkout).
MEMBER_PATTERNS = tuple(f"{s}.en.gz" for s in SPLITS) + tuple(f"{s}.txt" for s in SPLITS)


def _role(path: str) -> tuple[str, str] | None:
    """("captions" | "images", split) of a Multi30K file, None for any other file."""
    name, parent = os.path.basename(path), os.path.basename(os.path.dirname(path))
    for split in SPLITS:
        if parent == "raw" and name == f"{split}.en.gz":
            return "captions", split
        if parent == "image_splits" and name == f"{split}.txt":
            return "images", split
    return None


def detect(files: list[str]) -> list[str]:
    """The English caption files and image split files of train and val, train first; those under a
    ``task1`` folder when there are (a whole checkout also holds Task 2)."""
    picked = [f for f in files if _role(f)]
    task1 = [f for f in picked if "task1" in os.path.normpath(f).split(os.sep)]
    return sorted(task1 or picked, key=lambda f: (SPLITS.index(_role(f)[1]), _role(f)[0], f))


def _lines(path: str, opener) -> list[str | None]:
    """The file's lines (newline stripped; None for a line that is not UTF-8)."""
    out: list[str | None] = []
    try:
        with opener(path, "rb") as f:
            for raw in f:
                raw = raw.rstrip(b"\n").rstrip(b"\r")
                try:
                    out.append(raw.decode("utf-8"))
                except UnicodeDecodeError:
                    out.append(None)
    except (OSError, EOFError) as exc:
        raise CCRKError(f"cannot read Multi30K file {path}: {exc}") from None
    return out


def read(files: list[str], rejects: Rejects, limit: int | None = None,
         max_caption_chars: int = 1000) -> tuple[pa.Table, pa.Table]:
    tables = SourceTables(NAME, rejects, image_extras=IMAGE_EXTRAS, caption_extras=CAPTION_EXTRAS,
                          limit=limit, max_caption_chars=max_caption_chars)
    by_role: dict[tuple[str, str], str] = {}
    for f in detect(files):
        if _role(f) in by_role:
            raise CCRKError(f"two Multi30K {_role(f)[1]} {_role(f)[0]} files: {by_role[_role(f)]} and {f}; "
                            f"pass one checkout")
        by_role[_role(f)] = f
    for split in SPLITS:
        captions_path, images_path = by_role.get(("captions", split)), by_role.get(("images", split))
        if captions_path is None and images_path is None:
            continue
        if captions_path is None or images_path is None:
            have, lack = (captions_path, f"image_splits/{split}.txt") if captions_path else \
                (images_path, f"raw/{split}.en.gz")
            raise CCRKError(f"Multi30K {split}: {have} has no {lack} beside it; the two files align line by line")
        captions, names = _lines(captions_path, gzip.open), _lines(images_path, open)
        if len(captions) != len(names):
            raise CCRKError(f"{captions_path} has {len(captions)} captions but {images_path} lists {len(names)} "
                            f"images; the two files must align line by line")
        for i, (caption, name) in enumerate(zip(captions, names)):
            at = (captions_path, i + 1, "line")
            name = name.strip().split("#", 1)[0] if name is not None else None
            flickr_id = os.path.splitext(name)[0] if name else ""
            key = f"{NAME}-{safe_id(flickr_id)}"
            if tables.full and not tables.has_image(key):
                return tables.finish()  # limit reached: the next new image is not wanted
            rejects.rows_read += 1
            if caption is None or name is None:
                rejects.add("invalid_utf8", at)
                continue
            # A file name only, inside the images folder: no path, no "..", no NUL (storage.local_shards
            # opens images_dir/name).
            if not flickr_id or "/" in name or "\\" in name or "\x00" in name or name.strip(".") == "":
                rejects.add("malformed_row", (images_path, i + 1, "line"))
                continue
            problem = caption_problem(caption, max_caption_chars)
            if problem:
                rejects.add(problem, at)
                continue
            if not tables.has_image(key):
                tables._append_image(key, flickr_id, None, {"split": split, "file": name})
            tables.add_caption(key, f"{NAME}-{split}-{i}", caption, at, split=split, row=i)
    return tables.finish()
