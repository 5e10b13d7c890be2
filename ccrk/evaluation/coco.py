"""COCO retrieval (en / ja / zh) read from the files its authors publish, beside CCLM's re-formatted json.

Layout of ``--data DIR`` (each language's files are optional; English's split file is what marks the layout):

- en: Karpathy's split file ``dataset_coco.json`` (from ``caption_datasets.zip``), in ``DIR/`` or
  ``DIR/karpathy/``: ``{"images": [{"filepath": "val2014", "filename": "COCO_val2014_....jpg", "cocoid": int,
  "split": "train" | "restval" | "val" | "test", "sentences": [{"raw": str, ...}], ...}], ...}``.
  test = the 5,000 test images as five 1K folds (consecutive slices in file order), val = the 5,000 val images,
  train = train + restval (113,287 images).
- ja: STAIR Captions ``stair_captions_v1.2_train.json`` and ``stair_captions_v1.2_val.json`` (unpacked from
  ``stair_captions_v1.2.tar.gz``), in ``DIR/stair/`` or ``DIR/``: COCO-captions json whose ``annotations`` are
  ``{"image_id", "id", "caption", ...}``. The Karpathy images of a split take their STAIR captions by COCO id,
  a train2014 image from the ``_train`` file, a val2014 one from ``_val``; folded as en.
- zh: COCO-CN's release folder ``coco-cn-version1805v1.1/`` in ``DIR/`` (or its files in ``DIR/coco-cn/`` or
  ``DIR/``): ``coco-cn_train.txt`` / ``coco-cn_val.txt`` / ``coco-cn_test.txt``, one image id a line
  (``COCO_val2014_000000217153``), and ``imageid.human-written-caption.txt``, one caption a line
  (``COCO_val2014_000000217153#0<TAB>caption``). The test list is one 1K set, not folded.

Images: ``image_root`` (default ``DIR/images``) holds COCO 2014's ``train2014/`` and ``val2014/``; a COCO-CN id
names its folder (``COCO_<folder>_<12-digit COCO id>``). Every image id is the COCO id as a string, so that the
three languages' instances match (MRV); captions keep their order in the file.
"""
from __future__ import annotations

import os
import re
from typing import Iterable, NamedTuple

from ccrk.evaluation.benchmarks import (
    COCO_FOLDED,
    COCO_LANGS,
    Benchmark,
    CaptionCleaner,
    ImageRef,
    RetrievalSet,
    TrainPair,
    _Builder,
    image_file,
    read_json,
)
from storage.errors import CCRKError
from storage.sources.coco import KARPATHY_FILE, karpathy_images

KARPATHY_DIRS = ("", "karpathy")
# STAIR ships one file per COCO 2014 image folder.
STAIR_FILES = {"train2014": "stair_captions_v1.2_train.json", "val2014": "stair_captions_v1.2_val.json"}
STAIR_DIRS = ("stair", "")
COCOCN_CAPTIONS = "imageid.human-written-caption.txt"
COCOCN_DIRS = ("coco-cn-version1805v1.1", "coco-cn", "")
# The Karpathy splits each benchmark split reads (restval is training data).
KARPATHY_SPLITS = {"test": ("test",), "val": ("val",), "train": ("train", "restval")}
N_FOLDS = 5
_COCOCN_ID = re.compile(r"COCO_(train2014|val2014)_(\d+)")


class PublishedImage(NamedTuple):
    """One image of a split: its COCO id, its path under image_root, its captions, where it was read."""
    cocoid: int
    image: str
    captions: list[str]
    where: str


def _first_existing(data_dir: str, dirs: tuple[str, ...], name: str) -> str | None:
    for d in dirs:
        path = os.path.join(data_dir, d, name)
        if os.path.exists(path):
            return path
    return None


def _not_found(what: str, data_dir: str, dirs: tuple[str, ...], name: str) -> CCRKError:
    tried = ", ".join(os.path.join(data_dir, d, name) for d in dirs)
    return CCRKError(f"{what} file {name} not found (looked for {tried})")


def _stair_dir(data_dir: str) -> str | None:
    for d in STAIR_DIRS:
        folder = os.path.join(data_dir, d)
        if any(os.path.exists(os.path.join(folder, name)) for name in STAIR_FILES.values()):
            return os.path.normpath(folder)
    return None


def _cococn_dir(data_dir: str) -> str | None:
    path = _first_existing(data_dir, COCOCN_DIRS, COCOCN_CAPTIONS)
    return os.path.dirname(path) if path else None


def find_published(data_dir: str) -> dict[str, str] | None:
    """The published files under ``data_dir``: en -> dataset_coco.json, ja -> the folder of the STAIR files,
    zh -> the folder of the COCO-CN files (languages absent are left out); None without dataset_coco.json."""
    karpathy = _first_existing(data_dir, KARPATHY_DIRS, KARPATHY_FILE)
    if karpathy is None:
        return None
    found = {"en": karpathy}
    stair, cococn = _stair_dir(data_dir), _cococn_dir(data_dir)
    if stair:
        found["ja"] = stair
    if cococn:
        found["zh"] = cococn
    return found


def _read_json_object(path: str) -> dict:
    return read_json(path, dict, "a JSON object")


def train_sources(data_dir: str, lang: str) -> list[str]:
    """The files the ``lang`` training set is read from (what a fine-tune's id hashes), found without
    reading them: dataset_coco.json (the split), then STAIR's two files (train + restval span
    train2014 and val2014) or COCO-CN's train list and captions."""
    found = find_published(data_dir) or {}
    if lang not in found:
        raise CCRKError(f"no published COCO {lang} files under {data_dir}")
    if lang == "ja":
        return [found["en"], *(os.path.join(found["ja"], name) for name in STAIR_FILES.values())]
    if lang == "zh":
        return [os.path.join(found["zh"], "coco-cn_train.txt"), os.path.join(found["zh"], COCOCN_CAPTIONS)]
    return [found["en"]]


def karpathy_split(path: str) -> dict[str, list[dict]]:
    """The images of Karpathy's ``dataset_coco.json`` per split (train, restval, val, test), in file order."""
    splits: dict[str, list[dict]] = {}
    for img in karpathy_images(path):
        splits.setdefault(str(img["split"]), []).append(img)
    return splits


def karpathy_ids(path: str, splits: Iterable[str]) -> set[int]:
    """The COCO ids of the images in ``splits`` (e.g. ("val", "test"): the images evaluation reads)."""
    wanted = {splits} if isinstance(splits, str) else set(splits)
    return {int(img["cocoid"]) for img in karpathy_images(path) if img["split"] in wanted}


def _karpathy_split_images(data_dir: str, split: str) -> tuple[str, list[tuple[int, dict]]]:
    """(path of dataset_coco.json, [(index in the file, image)] of the benchmark split, in file order)."""
    path = _first_existing(data_dir, KARPATHY_DIRS, KARPATHY_FILE)
    if path is None:
        raise _not_found("Karpathy split", data_dir, KARPATHY_DIRS, KARPATHY_FILE)
    wanted = KARPATHY_SPLITS[split]
    return path, [(i, img) for i, img in enumerate(karpathy_images(path)) if img["split"] in wanted]


def _en_entries(data_dir: str, split: str) -> tuple[str, list[PublishedImage]]:
    path, images = _karpathy_split_images(data_dir, split)
    entries = []
    for i, img in images:
        where = f"{path} image {i}"
        sentences = img.get("sentences")
        if not isinstance(sentences, list) or not all(isinstance(s, dict) and "raw" in s for s in sentences):
            raise CCRKError(f"{where}: expected sentences as a list of {{\"raw\": ...}}")
        image = os.path.join(str(img["filepath"]), str(img["filename"]))
        entries.append(PublishedImage(int(img["cocoid"]), image, [s["raw"] for s in sentences], where))
    return path, entries


def _stair_captions(path: str) -> dict[int, list[str]]:
    """COCO id -> its STAIR captions, in file order."""
    annotations = _read_json_object(path).get("annotations")
    if not isinstance(annotations, list):
        raise CCRKError(f"{path}: expected {{\"annotations\": [...]}} as in STAIR Captions")
    captions: dict[int, list[str]] = {}
    for n, ann in enumerate(annotations):
        if not isinstance(ann, dict) or "image_id" not in ann or "caption" not in ann:
            raise CCRKError(f"{path} annotation {n}: expected an object with image_id and caption")
        captions.setdefault(int(ann["image_id"]), []).append(ann["caption"])
    return captions


def _ja_entries(data_dir: str, split: str) -> tuple[str, list[PublishedImage]]:
    _, images = _karpathy_split_images(data_dir, split)
    folders = sorted({str(img["filepath"]) for _, img in images})
    unknown = [f for f in folders if f not in STAIR_FILES]
    if unknown:
        raise CCRKError(f"STAIR Captions cover train2014 and val2014 only, not {', '.join(unknown)}")
    files: dict[str, str] = {}
    captions: dict[str, dict[int, list[str]]] = {}
    for folder in folders:
        path = _first_existing(data_dir, STAIR_DIRS, STAIR_FILES[folder])
        if path is None:
            raise _not_found("STAIR Captions", data_dir, STAIR_DIRS, STAIR_FILES[folder])
        files[folder], captions[folder] = path, _stair_captions(path)
    entries = []
    for _, img in images:
        folder, cocoid = str(img["filepath"]), int(img["cocoid"])
        if cocoid not in captions[folder]:
            raise CCRKError(f"{files[folder]}: no caption for COCO id {cocoid} ({img['filename']})")
        image = os.path.join(folder, str(img["filename"]))
        entries.append(PublishedImage(cocoid, image, captions[folder][cocoid], f"{files[folder]} (COCO id {cocoid})"))
    return ",".join(files[f] for f in folders), entries


def _cococn_image(name: str, where: str) -> tuple[int, str]:
    """A COCO-CN image id -> (COCO id, path under image_root)."""
    match = _COCOCN_ID.fullmatch(name)
    if match is None:
        raise CCRKError(f"{where}: {name!r} is not a COCO-CN image id (COCO_train2014_<id> or COCO_val2014_<id>)")
    return int(match.group(2)), os.path.join(match.group(1), f"{name}.jpg")


def _cococn_captions(path: str) -> dict[str, list[str]]:
    """COCO-CN image id -> its human-written captions, in file order (lines ``<id>#<n><TAB><caption>``)."""
    captions: dict[str, list[str]] = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            key, tab, caption = line.rstrip("\r\n").partition("\t")
            if not tab or "#" not in key:
                raise CCRKError(f"{path}:{n}: expected <image id>#<n><TAB><caption>")
            captions.setdefault(key.split("#", 1)[0].strip(), []).append(caption)
    return captions


def _zh_entries(data_dir: str, split: str) -> tuple[str, list[PublishedImage]]:
    folder = _cococn_dir(data_dir)
    if folder is None:
        raise _not_found("COCO-CN", data_dir, COCOCN_DIRS, COCOCN_CAPTIONS)
    list_file = os.path.join(folder, f"coco-cn_{split}.txt")
    if not os.path.exists(list_file):
        raise CCRKError(f"COCO-CN file {list_file} not found (the {split} image list of the release)")
    captions = _cococn_captions(os.path.join(folder, COCOCN_CAPTIONS))
    entries = []
    with open(list_file, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            name = line.strip()
            if not name:
                continue
            where = f"{list_file}:{n}"
            cocoid, image = _cococn_image(name, where)
            if name not in captions:
                raise CCRKError(f"{where}: image {name} has no caption in {COCOCN_CAPTIONS}")
            entries.append(PublishedImage(cocoid, image, captions[name], where))
    return list_file, entries


_ENTRIES = {"en": _en_entries, "ja": _ja_entries, "zh": _zh_entries}


def published_entries(data_dir: str, lang: str, split: str) -> tuple[str, list[PublishedImage]]:
    """(source file(s), the images of ``split`` with their ``lang`` captions) from the published files."""
    if lang not in _ENTRIES:
        raise CCRKError(f"unknown COCO language {lang!r}; choose one of {', '.join(COCO_LANGS)}")
    return _ENTRIES[lang](data_dir, split)


def _fold_bounds(n: int, fold: int) -> tuple[int, int]:
    """Consecutive slices, the last taking the remainder (as read_cclm_eval splits COCO 5K)."""
    size = n // N_FOLDS
    return fold * size, (n if fold == N_FOLDS - 1 else (fold + 1) * size)


def _retrieval_set(entries: list[PublishedImage], lang: str, source: str, image_root: str, skip_missing: bool,
                   max_words: int | None, fold: int | None) -> RetrievalSet:
    b = _Builder("coco", lang, source, skip_missing, fold=fold, max_words=max_words)
    for e in entries:
        img = image_file(image_root, e.image, e.where)
        b.add(str(e.cocoid), ImageRef(key=os.path.abspath(img), path=img), e.captions, e.where, os.path.exists(img))
    return b.build()


def load_published(data_dir: str, langs=None, image_root: str | None = None, split: str = "test",
                   skip_missing: bool = False, max_words: int | None = None) -> Benchmark:
    """COCO test (en/ja: five 1K folds; zh: COCO-CN's 1K) or val (one set each) from the published files;
    ``langs`` None reads every language found (see :func:`find_published`)."""
    if split not in ("test", "val"):
        raise CCRKError(f"unknown split {split!r}; choose test or val")
    image_root = image_root or os.path.join(data_dir, "images")
    if not langs:
        found = find_published(data_dir)
        if found is None:
            raise _not_found("Karpathy split", data_dir, KARPATHY_DIRS, KARPATHY_FILE)
        langs = list(found)
    bench = Benchmark("coco")
    for lang in langs:
        source, entries = published_entries(data_dir, lang, split)
        if lang in COCO_FOLDED and split == "test":
            folds = [_fold_bounds(len(entries), k) for k in range(N_FOLDS)]
            bench.sets[lang] = [_retrieval_set(entries[begin:end], lang, source, image_root, skip_missing,
                                               max_words, k) for k, (begin, end) in enumerate(folds)]
        else:
            bench.sets[lang] = [_retrieval_set(entries, lang, source, image_root, skip_missing, max_words, None)]
    return bench


def load_published_train(data_dir: str, lang: str, image_root: str | None = None, skip_missing: bool = False,
                         clean: CaptionCleaner | None = None) -> tuple[list[TrainPair], int]:
    """Training pairs of ``lang`` (en/ja: Karpathy train + restval; zh: COCO-CN's train list), one per caption;
    (pairs, skipped images). ``clean`` as for :func:`ccrk.evaluation.benchmarks.load_xflickrco_train`."""
    image_root = image_root or os.path.join(data_dir, "images")
    clean = clean or CaptionCleaner()
    _, entries = published_entries(data_dir, lang, "train")
    pairs: list[TrainPair] = []
    skipped = 0
    for e in entries:
        img = image_file(image_root, e.image, e.where)
        if not os.path.exists(img):
            if not skip_missing:
                raise CCRKError(f"{e.where}: image {img} (id {e.cocoid}) not found; pass --skip-missing to skip it")
            skipped += 1
            continue
        ref = ImageRef(key=os.path.abspath(img), path=img)
        texts = (clean(c) for c in e.captions)
        pairs += [TrainPair(ref, text, str(e.cocoid)) for text in texts if text is not None]
    return pairs, skipped
