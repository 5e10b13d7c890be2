"""Loaders for the retrieval benchmarks, reading the files exactly as they are published.

- xFlickr&CO (IGLUE): ``annotations/{lang}/test.jsonl``, one image per line
  ``{"sentences": [...], "id": ..., "img_path": ...}``; few-shot ``train_{N}.jsonl`` alike.
  Images: ``img_path`` containing "COCO" lives in the COCO val2014 folder, else in Flickr30K's.
- Multi30K and COCO in the CCLM json layout: eval files are lists of
  ``{"image": rel_path, "caption": [...], "image_id": ...}``, train files one caption per entry.
  COCO en/ja test sets (Karpathy 5K) are five 1K folds; zh (COCO-CN) is one 1K set.
- WIT (IGLUE): ``test_{lang}.jsonl`` lines with ``image_url``, ``caption_reference_description`` and
  the base64 ``image_content`` added by the reference's preprocessing.

Every loader returns a :class:`Benchmark`: per language, one or more :class:`RetrievalSet` (folds).
A missing image is a :class:`CCRKError` naming it, or with ``skip_missing=True`` a counted skip.

A benchmark folder is input too: the image paths its files give must lie inside the image folder
(:func:`image_file`: no absolute path, no ``..`` leading out), and a language found by listing the
folder (``annotations/<lang>/``, ``test_<lang>.jsonl``) must be a language code
(:func:`listed_lang`), else a one-line error naming the file.

Captions are read as published (stripped), or with ``max_words`` through the authors' normalisation
(:func:`ccrk.captions.pre_caption`) at the benchmark's own word limit (:data:`MAX_WORDS`); a caption it
leaves empty is a counted skip (``rejected_texts``), never an error.
"""
from __future__ import annotations

import base64
import io
import json
import os
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from ccrk.captions import EmptyCaptionError, pre_caption
from storage.errors import CCRKError, shown
from storage.languages import LANG_RULE, normalise_lang

XFLICKRCO_LANGS = ("de", "en", "es", "id", "ja", "ru", "tr", "zh")
MULTI30K_LANGS = ("en", "de", "fr", "cs")
COCO_LANGS = ("en", "ja", "zh")
COCO_FOLDED = ("en", "ja")  # Karpathy 5K test: five 1K folds, averaged
WIT_LANGS = ("ar", "bg", "da", "el", "en", "et", "id", "ja", "ko", "tr", "vi")
BENCHMARKS = ("xflickrco", "multi30k", "coco", "wit", "demo")
# Re-ranking depth per benchmark (the reference's k_test).
DEFAULT_K_TEST = {"coco": 256}
# The languages of the paper's MRV (Table 1): xFlickrCO.py's analysis_ranks uses the first four of its
# list; Multi30K's four are the benchmark's. Other benchmarks take every evaluated language.
PAPER_MRV_LANGS = {"xflickrco": ("en", "de", "ja", "zh"), "multi30k": ("en", "de", "fr", "cs")}


# pre_caption word limit per benchmark: the reference datasets' own defaults, since its create_dataset
# passes none and configs/cclm-base-ft/*.yaml set none (xflickrco_dataset.py and wit_dataset.py: 80;
# retrieval_dataset.py, used by Retrieval.py for Multi30K and COCO: 30). The demo has xFlickr&CO's layout.
MAX_WORDS = {"xflickrco": 80, "demo": 80, "wit": 80, "multi30k": 30, "coco": 30}


def default_k_test(benchmark: str) -> int:
    return DEFAULT_K_TEST.get(benchmark, 128)


def _unknown_benchmark(name: str) -> CCRKError:
    return CCRKError(f"unknown benchmark {name!r}; choose one of {', '.join(BENCHMARKS)}")


def default_max_words(benchmark: str) -> int:
    """The reference's pre_caption word limit for ``benchmark`` (evaluation and fine-tuning)."""
    if benchmark not in MAX_WORDS:
        raise _unknown_benchmark(benchmark)
    return MAX_WORDS[benchmark]


class CaptionCleaner:
    """A published caption -> the text the model reads, or None (empty, or emptied by pre_caption: counted).

    ``max_words`` None keeps the caption as published, stripped; otherwise pre_caption applies to the raw text.
    """

    def __init__(self, max_words: int | None = None):
        self.max_words = max_words
        self.rejected = 0

    def __call__(self, raw) -> str | None:
        if not isinstance(raw, str) or not raw.strip():
            return None
        if self.max_words is None:
            return raw.strip()
        try:
            return pre_caption(raw, self.max_words)
        except EmptyCaptionError:
            self.rejected += 1
            return None


@dataclass(frozen=True)
class ImageRef:
    """An image on disk (``path``) or inline (``b64``, WIT); ``key`` identifies it across languages."""
    key: str
    path: str | None = None
    b64: str | None = None

    def open(self):
        from PIL import Image

        try:
            if self.b64 is not None:
                img = Image.open(io.BytesIO(base64.b64decode(self.b64)))
            else:
                img = Image.open(self.path)
            return img.convert("RGB")
        except (OSError, ValueError) as exc:
            raise CCRKError(f"cannot read image {self.path or self.key}: {exc}") from exc


@dataclass
class RetrievalSet:
    """One language (or fold) of a benchmark: images, texts and which image each text describes.

    ``text_keys`` name each text as ``<image id>#<caption index>`` so that the same instance can be
    matched across languages (for MRV) even when some captions are empty or images were skipped.
    """
    benchmark: str
    lang: str
    image_ids: list[str]
    images: list[ImageRef]
    texts: list[str]
    text_image: np.ndarray
    text_keys: list[str]
    fold: int | None = None
    source: str = ""
    skipped_images: int = 0
    skipped_texts: int = 0
    rejected_texts: int = 0  # of skipped_texts: captions pre_caption left empty

    @property
    def name(self) -> str:
        return self.lang if self.fold is None else f"{self.lang}/fold{self.fold}"

    def __len__(self) -> int:
        return len(self.images)


@dataclass
class Benchmark:
    name: str
    sets: dict[str, list[RetrievalSet]] = field(default_factory=dict)

    @property
    def langs(self) -> tuple[str, ...]:
        return tuple(self.sets)

    @property
    def skipped_images(self) -> int:
        return sum(s.skipped_images for sets in self.sets.values() for s in sets)

    @property
    def rejected_texts(self) -> int:
        return sum(s.rejected_texts for sets in self.sets.values() for s in sets)


@dataclass(frozen=True)
class TrainPair:
    """One training caption with its image and an image id (ITC positives share the id)."""
    image: ImageRef
    caption: str
    image_id: str


class _Builder:
    """Accumulates images and their texts, applying the missing-image policy and the caption cleaning."""

    def __init__(self, benchmark, lang, source, skip_missing, fold=None, max_words: int | None = None):
        self.benchmark, self.lang, self.source, self.skip_missing, self.fold = benchmark, lang, source, skip_missing, fold
        self.clean = CaptionCleaner(max_words)
        self.image_ids: list[str] = []
        self.images: list[ImageRef] = []
        self.texts: list[str] = []
        self.text_image: list[int] = []
        self.text_keys: list[str] = []
        self.skipped_images = 0
        self.skipped_texts = 0
        self._seen: dict[str, int] = {}

    def add(self, image_id: str, ref: ImageRef, captions: list[str], where: str, present: bool) -> None:
        texts = [(j, self.clean(c)) for j, c in enumerate(captions)]
        kept = [(j, text) for j, text in texts if text is not None]
        self.skipped_texts += len(captions) - len(kept)
        if not kept:
            return  # the reference drops lines whose captions are all empty
        if not present:
            if not self.skip_missing:
                raise CCRKError(f"{where}: image {ref.path or ref.key} (id {image_id}) not found; "
                                f"give the right image folder or pass --skip-missing")
            self.skipped_images += 1
            self.skipped_texts += len(kept)
            return
        # A repeated id gets a suffix so text keys stay unique (published files have none).
        n = self._seen.get(image_id, 0)
        self._seen[image_id] = n + 1
        uid = image_id if n == 0 else f"{image_id}~{n}"
        idx = len(self.images)
        self.image_ids.append(uid)
        self.images.append(ref)
        for j, caption in kept:
            self.texts.append(caption)
            self.text_image.append(idx)
            self.text_keys.append(f"{uid}#{j}")

    def build(self) -> RetrievalSet:
        if not self.images:
            raise CCRKError(f"{self.source}: no usable image-text pairs for {self.lang}")
        return RetrievalSet(self.benchmark, self.lang, self.image_ids, self.images, self.texts,
                            np.asarray(self.text_image, dtype=np.int64), self.text_keys, fold=self.fold,
                            source=self.source, skipped_images=self.skipped_images,
                            skipped_texts=self.skipped_texts, rejected_texts=self.clean.rejected)


def _read_jsonl(path: str) -> Iterator[tuple[int, dict]]:
    if not os.path.exists(path):
        raise CCRKError(f"annotation file {path} not found")
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise CCRKError(f"{path}:{n}: not a JSON line ({exc.msg})") from exc
            if not isinstance(row, dict):
                raise CCRKError(f"{path}:{n}: expected a JSON object")
            yield n, row


def read_json(path: str, kind: type, expected: str):
    """A whole JSON file that must be a ``kind`` (list, dict); one-line errors naming ``expected``."""
    if not os.path.exists(path):
        raise CCRKError(f"annotation file {path} not found")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as exc:
        raise CCRKError(f"{path}: not a JSON file ({exc.msg} at line {exc.lineno})") from exc
    if not isinstance(data, kind):
        raise CCRKError(f"{path}: expected {expected}")
    return data


def _read_json_list(path: str) -> list:
    return read_json(path, list, "a JSON list of {image, caption, image_id} entries")


def first_existing(candidates: list[str], error: str) -> str:
    """The first of ``candidates`` that exists, else a CCRKError: ``error`` and the places looked."""
    for path in candidates:
        if os.path.exists(path):
            return path
    raise CCRKError(f"{error} (looked for {', '.join(candidates)})")


def image_file(folder: str, name, where: str) -> str:
    """``folder/name`` for an image ``name`` a benchmark file lists; a CCRKError of one line naming
    ``where`` when ``name`` is empty, absolute or leads out of ``folder`` (``../x``): a benchmark's
    files name images inside its image folders only, never any other file (``/etc/passwd``, ``/dev/zero``)."""
    text = str(name)
    rel = os.path.normpath(text) if text else ""
    if (not text or "\x00" in text or os.path.isabs(text) or rel in (os.curdir, os.pardir)
            or rel.startswith(os.pardir + os.sep)):
        raise CCRKError(f"{where}: image path {shown(text, 80)} is not a relative path inside the image folder {folder}: "
                        "refused (a damaged or crafted benchmark file)")
    return os.path.join(folder, text)


def listed_lang(name: str, where: str) -> str:
    """``name``, a language found by listing a benchmark folder, if it is a language code as written;
    else a CCRKError of one line naming ``where`` (the file it names)."""
    if normalise_lang(name) != name:
        raise CCRKError(f"{where}: {name!r} is not a language code ({LANG_RULE}); choose the languages "
                        "with --langs")
    return name


def _require(row: dict, keys: tuple[str, ...], where: str) -> None:
    missing = [k for k in keys if k not in row]
    if missing:
        raise CCRKError(f"{where}: missing field(s) {', '.join(missing)}")


# --------------------------------------------------------------------------- xFlickr&CO (IGLUE)


def xflickrco_image_path(img_path: str, flickr30k_dir: str, coco_dir: str, where: str = "xFlickrCO") -> str:
    """COCO images (names containing "COCO") come from val2014, the rest from Flickr30K (inside it:
    :func:`image_file`)."""
    return image_file(coco_dir if "COCO" in img_path else flickr30k_dir, img_path, where)


def _image_dirs(data_dir: str, flickr30k_dir: str | None, coco_dir: str | None) -> tuple[str, str]:
    default = os.path.join(data_dir, "images")
    return flickr30k_dir or default, coco_dir or flickr30k_dir or default


def read_xflickrco_file(path: str, lang: str, flickr30k_dir: str, coco_dir: str, skip_missing: bool = False,
                        benchmark: str = "xflickrco", max_words: int | None = None) -> RetrievalSet:
    b = _Builder(benchmark, lang, path, skip_missing, max_words=max_words)
    for n, row in _read_jsonl(path):
        where = f"{path}:{n}"
        _require(row, ("sentences", "id", "img_path"), where)
        sentences = row["sentences"] if isinstance(row["sentences"], list) else [row["sentences"]]
        img = xflickrco_image_path(str(row["img_path"]), flickr30k_dir, coco_dir, where)
        b.add(str(row["id"]), ImageRef(key=os.path.abspath(img), path=img), sentences, where, os.path.exists(img))
    return b.build()


def load_xflickrco(data_dir: str, langs=None, flickr30k_dir: str | None = None, coco_dir: str | None = None,
                   skip_missing: bool = False, name: str = "xflickrco", max_words: int | None = None) -> Benchmark:
    """The test sets ``<data_dir>/annotations/<lang>/test.jsonl`` (every language present by default)."""
    ann = os.path.join(data_dir, "annotations")
    if not os.path.isdir(ann):
        raise CCRKError(f"{ann} not found: --data must be the xFlickrCO folder holding annotations/<lang>/test.jsonl")
    if not langs:
        langs = sorted(listed_lang(d, os.path.join(ann, d, "test.jsonl")) for d in os.listdir(ann)
                       if os.path.exists(os.path.join(ann, d, "test.jsonl")))
    flickr, coco = _image_dirs(data_dir, flickr30k_dir, coco_dir)
    bench = Benchmark(name)
    for lang in langs:
        bench.sets[lang] = [read_xflickrco_file(os.path.join(ann, lang, "test.jsonl"), lang, flickr, coco,
                                                skip_missing, benchmark=name, max_words=max_words)]
    return bench


def _xflickrco_candidates(data_dir: str, lang: str, split: str) -> list[str]:
    """``annotations/<lang>/{split}_ann.jsonl`` or ``{split}.jsonl``; for English also IGLUE's Flickr30K
    ``flickr30k/annotations/{split}_ann.jsonl`` inside or next to ``data_dir`` (xFlickrCO/)."""
    ann = os.path.join(data_dir, "annotations", lang)
    candidates = [os.path.join(ann, f"{split}_ann.jsonl"), os.path.join(ann, f"{split}.jsonl")]
    if lang == "en":
        candidates += [os.path.join(d, "flickr30k", "annotations", f"{split}_ann.jsonl")
                       for d in (data_dir, os.path.dirname(os.path.abspath(data_dir)))]
    return candidates


def xflickrco_train_file(data_dir: str, lang: str = "en", shots: int | None = None) -> str:
    """The few-shot file ``annotations/<lang>/train_<N>.jsonl``, or the full training file of ``lang``."""
    if shots is not None:
        return first_existing([os.path.join(data_dir, "annotations", lang, f"train_{shots}.jsonl")],
                              f"no {lang} training file with {shots} shots found")
    return first_existing(_xflickrco_candidates(data_dir, lang, "train"), f"no {lang} training file found")


def xflickrco_val_file(data_dir: str, lang: str = "en") -> str:
    """The validation file of ``lang`` (``valid``: for English the authors' val_file of the zero-shot fine-tune)."""
    return first_existing(_xflickrco_candidates(data_dir, lang, "valid"),
                          f"no {lang} validation file found; choose --select last or test")


def load_xflickrco_train(path: str, flickr30k_dir: str, coco_dir: str | None = None, skip_missing: bool = False,
                         clean: CaptionCleaner | None = None) -> tuple[list[TrainPair], int]:
    """Training pairs from an IGLUE jsonl (every sentence of a line is one pair); (pairs, skipped images).
    ``clean`` turns captions into training text and counts the ones it rejects (default: stripped as published)."""
    coco_dir = coco_dir or flickr30k_dir
    clean = clean or CaptionCleaner()
    pairs: list[TrainPair] = []
    skipped = 0
    for n, row in _read_jsonl(path):
        where = f"{path}:{n}"
        _require(row, ("sentences", "id", "img_path"), where)
        img = xflickrco_image_path(str(row["img_path"]), flickr30k_dir, coco_dir, where)
        if not os.path.exists(img):
            if not skip_missing:
                raise CCRKError(f"{where}: image {img} (id {row['id']}) not found; pass --skip-missing to skip it")
            skipped += 1
            continue
        ref = ImageRef(key=os.path.abspath(img), path=img)
        texts = (clean(s) for s in row["sentences"])
        pairs += [TrainPair(ref, text, str(row["id"])) for text in texts if text is not None]
    return pairs, skipped


# --------------------------------------------------------------------------- CCLM json (Multi30K, COCO)


def read_cclm_eval(path: str, lang: str, image_root: str, fold: int | None = None, n_folds: int = 5,
                   skip_missing: bool = False, benchmark: str = "cclm", max_words: int | None = None) -> RetrievalSet:
    """A CCLM eval file (list of {image, caption: [...], image_id}); ``fold`` picks one of ``n_folds``
    consecutive slices (the last takes the remainder), as the reference splits COCO 5K."""
    data = _read_json_list(path)
    begin, end = 0, len(data)
    if fold is not None:
        size = len(data) // n_folds
        begin, end = fold * size, (len(data) if fold == n_folds - 1 else (fold + 1) * size)
    b = _Builder(benchmark, lang, path, skip_missing, fold=fold, max_words=max_words)
    for i in range(begin, end):
        row = data[i]
        where = f"{path} entry {i}"
        if not isinstance(row, dict):
            raise CCRKError(f"{where}: expected an object with image, caption, image_id")
        _require(row, ("image", "caption"), where)
        captions = row["caption"] if isinstance(row["caption"], list) else [row["caption"]]
        img = image_file(image_root, row["image"], where)
        image_id = str(row.get("image_id", row["image"]))
        b.add(image_id, ImageRef(key=os.path.abspath(img), path=img), captions, where, os.path.exists(img))
    return b.build()


def load_cclm_train(paths, image_root: str, skip_missing: bool = False,
                    clean: CaptionCleaner | None = None) -> tuple[list[TrainPair], int]:
    """CCLM train files: one {image, caption, image_id} per caption; (pairs, skipped entries).
    ``clean`` as for :func:`load_xflickrco_train`."""
    clean = clean or CaptionCleaner()
    pairs: list[TrainPair] = []
    skipped = 0
    for path in ([paths] if isinstance(paths, str) else paths):
        for i, row in enumerate(_read_json_list(path)):
            where = f"{path} entry {i}"
            _require(row, ("image", "caption"), where)
            img = image_file(image_root, row["image"], where)
            if not os.path.exists(img):
                if not skip_missing:
                    raise CCRKError(f"{where}: image {img} not found; pass --skip-missing to skip it")
                skipped += 1
                continue
            captions = row["caption"] if isinstance(row["caption"], list) else [row["caption"]]
            ref = ImageRef(key=os.path.abspath(img), path=img)
            image_id = str(row.get("image_id", row["image"]))
            texts = (clean(c) for c in captions)
            pairs += [TrainPair(ref, text, image_id) for text in texts if text is not None]
    return pairs, skipped


def load_multi30k(data_dir: str, langs=None, image_root: str | None = None, split: str = "test_2016_flickr",
                  skip_missing: bool = False, max_words: int | None = None) -> Benchmark:
    """``<data_dir>/<split>.<lang>.json`` for en/de/fr/cs (the CCLM file names)."""
    image_root = image_root or os.path.join(data_dir, "images")
    bench = Benchmark("multi30k")
    for lang in langs or MULTI30K_LANGS:
        bench.sets[lang] = [read_cclm_eval(os.path.join(data_dir, f"{split}.{lang}.json"), lang, image_root,
                                           skip_missing=skip_missing, benchmark="multi30k", max_words=max_words)]
    return bench


def load_coco(data_dir: str, langs=None, image_root: str | None = None, split: str = "test",
              skip_missing: bool = False, max_words: int | None = None) -> Benchmark:
    """``<data_dir>/<lang>.<split>.json``: en/ja Karpathy 5K as five 1K folds, zh COCO-CN 1K as one set."""
    image_root = image_root or os.path.join(data_dir, "images")
    bench = Benchmark("coco")
    for lang in langs or COCO_LANGS:
        path = os.path.join(data_dir, f"{lang}.{split}.json")
        if lang in COCO_FOLDED and split == "test":
            bench.sets[lang] = [read_cclm_eval(path, lang, image_root, fold=k, skip_missing=skip_missing,
                                               benchmark="coco", max_words=max_words) for k in range(5)]
        else:
            bench.sets[lang] = [read_cclm_eval(path, lang, image_root, skip_missing=skip_missing, benchmark="coco",
                                               max_words=max_words)]
    return bench


# --------------------------------------------------------------------------- WIT (IGLUE)


def _wit_file(data_dir: str, name: str) -> str:
    for d in (data_dir, os.path.join(data_dir, "annotations")):
        if os.path.exists(os.path.join(d, name)):
            return os.path.join(d, name)
    return os.path.join(data_dir, name)


def wit_groups(path: str) -> dict[str, dict]:
    """A WIT annotation file's lines by ``image_url``: captions in order, the inline ``image_content``
    (None without one), the first line's place."""
    groups: dict[str, dict] = {}
    for n, row in _read_jsonl(path):
        where = f"{path}:{n}"
        _require(row, ("image_url", "caption_reference_description"), where)
        g = groups.setdefault(row["image_url"], {"captions": [], "b64": None, "where": where})
        g["captions"].append(row["caption_reference_description"] or "")
        if row.get("image_content") and g["b64"] is None:
            g["b64"] = row["image_content"]
    return groups


def wit_langs(data_dir: str, split: str = "test") -> list[str]:
    """The languages of the ``<split>_<lang>.jsonl`` files under ``data_dir`` (or its annotations/)."""
    found: set[str] = set()
    for d in (data_dir, os.path.join(data_dir, "annotations")):
        if os.path.isdir(d):
            found |= {listed_lang(f[len(split) + 1:-6], os.path.join(d, f)) for f in os.listdir(d)
                      if f.startswith(f"{split}_") and f.endswith(".jsonl")}
    return sorted(found) or list(WIT_LANGS)


def read_wit_file(path: str, lang: str, skip_missing: bool = False, max_words: int | None = None) -> RetrievalSet:
    """Lines grouped by ``image_url`` (one image, several captions), image bytes from ``image_content``."""
    b = _Builder("wit", lang, path, skip_missing, max_words=max_words)
    for url, g in wit_groups(path).items():
        ref = ImageRef(key=f"wit:{url}", b64=g["b64"])
        b.add(url, ref, g["captions"], g["where"] + " (no image_content; run the WIT image preprocessing)",
              g["b64"] is not None)
    return b.build()


def load_wit(data_dir: str, langs=None, skip_missing: bool = False, max_words: int | None = None,
             split: str = "test") -> Benchmark:
    """``<split>_<lang>.jsonl`` under ``data_dir`` (or ``data_dir/annotations``), every language present by default."""
    bench = Benchmark("wit")
    for lang in langs or wit_langs(data_dir, split):
        bench.sets[lang] = [read_wit_file(_wit_file(data_dir, f"{split}_{lang}.jsonl"), lang, skip_missing,
                                          max_words)]
    return bench


def load_wit_train(path: str, skip_missing: bool = False,
                   clean: CaptionCleaner | None = None) -> tuple[list[TrainPair], int]:
    """WIT training lines with a caption and inline image; (pairs, skipped images). ``clean`` as for
    :func:`load_xflickrco_train`."""
    clean = clean or CaptionCleaner()
    pairs: list[TrainPair] = []
    skipped = 0
    for n, row in _read_jsonl(path):
        _require(row, ("image_url", "caption_reference_description"), f"{path}:{n}")
        caption = clean(row["caption_reference_description"])
        if caption is None:
            continue
        if not row.get("image_content"):
            if not skip_missing:
                raise CCRKError(f"{path}:{n}: image {row['image_url']} has no image_content; pass --skip-missing")
            skipped += 1
            continue
        pairs.append(TrainPair(ImageRef(key=f"wit:{row['image_url']}", b64=row["image_content"]), caption,
                               row["image_url"]))
    return pairs, skipped


# --------------------------------------------------------------------------- dispatch


def load_benchmark(name: str, data_dir: str, langs=None, images: str | None = None, coco_images: str | None = None,
                   skip_missing: bool = False, max_words: int | None = None, split: str = "test") -> Benchmark:
    """Any benchmark by name; ``images`` is the image folder (Flickr30K for xFlickrCO, the CCLM image root);
    ``max_words`` normalises captions with pre_caption (see :func:`default_max_words`); ``split``: test
    or val (the checkpoint selection's)."""
    if not os.path.isdir(data_dir):
        raise CCRKError(f"benchmark folder {data_dir} not found")
    if split not in ("test", "val"):
        raise CCRKError(f"unknown split {split!r}; choose test or val")
    if name in ("xflickrco", "demo"):
        if split == "val":
            return _xflickrco_val(name, data_dir, langs or ["en"], images, coco_images, skip_missing, max_words)
        return load_xflickrco(data_dir, langs, images, coco_images, skip_missing, name=name, max_words=max_words)
    if name == "multi30k":
        return load_multi30k(data_dir, langs, images, split="test_2016_flickr" if split == "test" else "val",
                             skip_missing=skip_missing, max_words=max_words)
    if name == "coco":
        return load_coco(data_dir, langs, images, split=split, skip_missing=skip_missing, max_words=max_words)
    if name == "wit":
        return load_wit(data_dir, langs, skip_missing, max_words, split)
    raise _unknown_benchmark(name)


def _xflickrco_val(name: str, data_dir: str, langs, images, coco_images, skip_missing, max_words) -> Benchmark:
    flickr, coco = _image_dirs(data_dir, images, coco_images)
    bench = Benchmark(name)
    for lang in langs:
        bench.sets[lang] = [read_xflickrco_file(xflickrco_val_file(data_dir, lang), lang, flickr, coco, skip_missing,
                                                benchmark=name, max_words=max_words)]
    return bench
