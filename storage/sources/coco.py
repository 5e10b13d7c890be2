"""COCO Captions (2017): ``annotations/captions_train2017.json`` and ``captions_val2017.json``, kept to
Karpathy's training split (``dataset_coco.json``).

Each captions file: ``{"images": [{"id", "file_name", "coco_url", "width", "height", ...}],
"annotations": [{"id", "image_id", "caption"}], "info", "licenses"}``. Usually five captions per image.

Karpathy's split file (``dataset_coco.json``, in ``caption_datasets.zip``): ``{"images": [{"filepath":
"val2014", "filename": "COCO_val2014_000000391895.jpg", "cocoid": 391895, "split": "train" | "restval" |
"val" | "test", "sentences": [...], ...}], "dataset": "coco"}``. COCO 2017 train + val are COCO 2014's
images, so every official image has a Karpathy split; val and test (5,000 each) are the COCO retrieval
benchmarks (and hold xFlickr&CO's COCO images), train + restval (113,287) the pre-training data of
CCLM and CCRk. Only the images of the ``karpathy_splits`` setting are kept (default train + restval);
the others are counted as ``excluded_split`` (their captions as ``caption_of_excluded_image``), an
official image the split file does not list as ``not_in_split_file``. Setting ``all_official_images``
keeps every image of the captions files and needs no split file.

Ids: ``source_id`` = the COCO image id; ``caption_id`` = ``coco-<annotation id>`` (``annotation_id``
is kept as an extra); ``split`` from the file name (``train2017``, ``val2017``); ``karpathy_split``
from the split file (null with ``all_official_images`` and no split file). An image or annotation
id, width or height beyond a 64-bit integer (JSON allows any) is a ``malformed_row``.
"""
from __future__ import annotations

import os
import re
from typing import Any

import pyarrow as pa

from storage.errors import CCRKError
from storage.sources.base import Rejects, SourceTables, as_int, has_invalid_text, is_int, read_json, require_type

NAME = "coco"
KARPATHY_FILE = "dataset_coco.json"
KARPATHY_URL = "https://cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip"
KARPATHY_SPLITS = ("train", "restval", "val", "test")
# The source's settings (configs/sources.yaml ``sources.coco.settings``), with their defaults.
SETTINGS = {"karpathy_splits": ("restval", "train"), "all_official_images": False}
IMAGE_EXTRAS = {"split": pa.string(), "karpathy_split": pa.string(), "file_name": pa.string(),
                "width": pa.int64(), "height": pa.int64()}
CAPTION_EXTRAS = {"split": pa.string(), "annotation_id": pa.int64()}
MEMBER_PATTERNS = ("captions_*.json", KARPATHY_FILE)
_CAPTIONS_FILE = re.compile(r"^captions_(?P<split>[A-Za-z0-9_-]+)\.json$")


def detect(files: list[str]) -> list[str]:
    """The ``captions_<split>.json`` files, train before val, then Karpathy's split file if given
    (none without a captions file)."""
    picked = [f for f in files if _CAPTIONS_FILE.match(os.path.basename(f))]
    picked.sort(key=lambda f: (not os.path.basename(f).startswith("captions_train"), os.path.basename(f), f))
    split_files = [f for f in files if os.path.basename(f) == KARPATHY_FILE]
    return picked + split_files[:1] if picked else []


def split_of(path: str) -> str:
    return _CAPTIONS_FILE.match(os.path.basename(path)).group("split")


def check_settings(given: dict[str, Any]) -> dict[str, Any]:
    """The source's settings: ``given`` over :data:`SETTINGS`, checked, splits sorted (they are versioned)."""
    unknown = sorted(set(given) - set(SETTINGS))
    if unknown:
        raise CCRKError(f"unknown coco setting(s) {', '.join(unknown)}; known: {', '.join(SETTINGS)}")
    settings = {**SETTINGS, **given}
    splits, everything = settings["karpathy_splits"], settings["all_official_images"]
    if not isinstance(everything, bool):
        raise CCRKError(f"coco setting all_official_images must be true or false, not {everything!r}")
    if isinstance(splits, str):
        splits = [splits]
    if not isinstance(splits, (list, tuple)) or not splits or any(s not in KARPATHY_SPLITS for s in splits):
        raise CCRKError(f"coco setting karpathy_splits must be a non-empty list of {', '.join(KARPATHY_SPLITS)}, "
                        f"not {splits!r}")
    return {"karpathy_splits": sorted(set(splits)), "all_official_images": everything}


def karpathy_images(path: str) -> list[dict]:
    """Every image of Karpathy's ``dataset_coco.json``, in file order, with split, cocoid, filepath and
    filename checked (the one reader of the file: the COCO benchmark loader uses it too)."""
    data = read_json(path, "Karpathy split")
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, list):
        raise CCRKError(f"{path}: expected {{\"images\": [...]}} as in Karpathy's dataset_coco.json")
    for i, img in enumerate(images):
        if not isinstance(img, dict):
            raise CCRKError(f"{path} image {i}: expected an object")
        missing = [k for k in ("split", "cocoid", "filepath", "filename") if k not in img]
        if missing:
            raise CCRKError(f"{path} image {i}: missing field(s) {', '.join(missing)}")
        if not is_int(img["cocoid"]):
            raise CCRKError(f"{path} image {i}: cocoid must be an integer, not {img['cocoid']!r}")
    return images


def karpathy_split_of(path: str) -> dict[int, str]:
    """COCO id -> its Karpathy split (train, restval, val, test)."""
    return {img["cocoid"]: str(img["split"]) for img in karpathy_images(path)}


def _split_lookup(files: list[str], settings: dict) -> dict[int, str] | None:
    """COCO id -> Karpathy split from the split file among ``files``; None when every official image is kept
    and no split file was given. No split file otherwise: a one-line error saying where to get it."""
    path = next((f for f in files if os.path.basename(f) == KARPATHY_FILE), None)
    if path is None:
        if settings["all_official_images"]:
            return None
        raise CCRKError(f"COCO's pre-training split is Karpathy's, but {KARPATHY_FILE} is not among the metadata: "
                        f"add {KARPATHY_URL} (it holds {KARPATHY_FILE}) to the coco metadata, or set "
                        f"sources.coco.settings.all_official_images: true in configs/sources.yaml to keep every "
                        f"official image, COCO's val and test benchmarks included")
    return karpathy_split_of(path)


def read(files: list[str], rejects: Rejects, limit: int | None = None, max_caption_chars: int = 1000,
         **given: Any) -> tuple[pa.Table, pa.Table]:
    """Images and captions of the captions files, kept to the ``karpathy_splits`` of the split file
    (settings: :func:`check_settings`)."""
    settings = check_settings(given)
    split_by_id = _split_lookup(files, settings)
    keep = None if settings["all_official_images"] else set(settings["karpathy_splits"])
    tables = SourceTables(NAME, rejects, image_extras=IMAGE_EXTRAS, caption_extras=CAPTION_EXTRAS,
                          limit=limit, max_caption_chars=max_caption_chars)
    excluded: set[int] = set()  # ids left out by the split: their captions are counted with them
    for path in (f for f in files if _CAPTIONS_FILE.match(os.path.basename(f))):
        split = split_of(path)
        data = require_type(read_json(path, "COCO"), dict, path, "COCO",
                            'an object with "images" and "annotations" lists')
        for field in ("images", "annotations"):
            if not isinstance(data.get(field), list):
                raise CCRKError(f'COCO metadata file {path} has the wrong structure: no "{field}" list')
        excluded |= _read_images(tables, rejects, path, data["images"], split, split_by_id, keep)
        _read_annotations(tables, rejects, path, data["annotations"], split, excluded)
    return tables.finish()


def _read_images(tables: SourceTables, rejects: Rejects, path: str, images: list, split: str,
                 split_by_id: dict[int, str] | None, keep: set[str] | None) -> set[int]:
    """Add the images of one captions file; returns the ids left out by the Karpathy split."""
    excluded: set[int] = set()
    for i, im in enumerate(images):
        rejects.rows_read += 1
        at = (path, i, "image")
        if not isinstance(im, dict) or not is_int(im.get("id")) or "coco_url" not in im:
            rejects.add("malformed_row", at)
            continue
        size = [im.get("width"), im.get("height")]
        if any(v is not None and as_int(v) is None for v in size):
            rejects.add("malformed_row", at)
            continue
        karpathy = split_by_id.get(im["id"]) if split_by_id is not None else None
        if keep is not None and karpathy not in keep:
            rejects.add("not_in_split_file" if karpathy is None else "excluded_split", at)
            excluded.add(im["id"])
            continue
        file_name = im.get("file_name")
        tables.add_image(im["id"], im["coco_url"], at, split=split, karpathy_split=karpathy,
                         file_name=file_name if isinstance(file_name, str) and not has_invalid_text(file_name)
                         else None,
                         width=as_int(size[0]), height=as_int(size[1]))
    return excluded


def _read_annotations(tables: SourceTables, rejects: Rejects, path: str, annotations: list, split: str,
                      excluded: set[int]) -> None:
    for i, ann in enumerate(annotations):
        rejects.rows_read += 1
        at = (path, i, "annotation")
        if not isinstance(ann, dict) or not is_int(ann.get("id")) or not is_int(ann.get("image_id")) \
                or "caption" not in ann:
            rejects.add("malformed_row", at)
            continue
        if ann["image_id"] in excluded:
            rejects.add("caption_of_excluded_image", at)
            continue
        tables.add_caption(tables.image_key(ann["image_id"]), f"{NAME}-{ann['id']}", ann["caption"], at,
                           split=split, annotation_id=ann["id"])
