"""Multi30K read from its published raw layout (a checkout of github.com/multi30k/dataset).

The layout, under ``data/task1/``:

- ``raw/<split>.<lang>.gz``: gzipped UTF-8 text, one caption per line (Task 1: one caption per image);
- ``image_splits/<split>.txt``: one image file name per line, line ``n`` being the image of caption
  line ``n`` in every language of the split. Flickr30K names (``1007129816.jpg``,
  ``22439193117_4183a49ec2.jpg``); ``test_2017_mscoco`` names carry the COCO caption id after a ``#``
  (``COCO_val2014_000000398076.jpg#657409``), which is not part of the file name.

Images are read from ``image_root/<file name>``; the image id is the file name without extension, the
same in every language, so the languages of one split stay aligned for MRV. The repository holds no
images (Flickr30K's are requested from its authors).
"""
from __future__ import annotations

import gzip
import os

from ccrk.evaluation.benchmarks import (
    MULTI30K_LANGS,
    Benchmark,
    CaptionCleaner,
    ImageRef,
    TrainPair,
    _Builder,
    image_file,
    listed_lang,
)
from storage.errors import CCRKError

# The published splits and their caption languages (test_2017_* have no Czech).
RAW_LANGS: dict[str, tuple[str, ...]] = {
    "train": ("en", "de", "fr", "cs"),
    "val": ("en", "de", "fr", "cs"),
    "test_2016_flickr": ("en", "de", "fr", "cs"),
    "test_2017_flickr": ("en", "de", "fr"),
    "test_2017_mscoco": ("en", "de", "fr"),
    "test_2018_flickr": ("en", "de", "fr", "cs"),
}
RAW_SPLITS = tuple(RAW_LANGS)


def find_raw_root(data_dir: str) -> str | None:
    """The folder holding ``raw/`` (``data/task1``) when ``data_dir`` is the repository root, its ``data/``,
    ``data/task1`` itself or any folder holding ``raw/``; None when there is no raw layout."""
    for root in (os.path.join(data_dir, "data", "task1"), os.path.join(data_dir, "task1"), data_dir):
        if os.path.isdir(os.path.join(root, "raw")):
            return root
    return None


def available_langs(root: str, split: str) -> tuple[str, ...]:
    """The languages whose ``raw/<split>.<lang>.gz`` exists under ``root`` (published order first)."""
    prefix, suffix = f"{split}.", ".gz"
    found = {f[len(prefix):-len(suffix)] for f in os.listdir(os.path.join(root, "raw"))
             if f.startswith(prefix) and f.endswith(suffix) and "." not in f[len(prefix):-len(suffix)]}
    return tuple(lang for lang in MULTI30K_LANGS if lang in found) + tuple(sorted(found - set(MULTI30K_LANGS)))


def available_splits(root: str) -> tuple[str, ...]:
    """The splits with an ``image_splits/<split>.txt`` under ``root``."""
    folder = os.path.join(root, "image_splits")
    return tuple(sorted(f[:-4] for f in os.listdir(folder) if f.endswith(".txt"))) if os.path.isdir(folder) else ()


def _raw_root(data_dir: str) -> str:
    root = find_raw_root(data_dir)
    if root is None:
        raise CCRKError(f"{data_dir} holds no Multi30K raw layout: expected data/task1/raw/<split>.<lang>.gz "
                        f"(a checkout of github.com/multi30k/dataset)")
    return root


def read_image_split(root: str, split: str) -> tuple[str, list[str]]:
    """(path, image file names) of ``image_splits/<split>.txt``, a ``#<caption id>`` suffix dropped."""
    path = os.path.join(root, "image_splits", f"{split}.txt")
    if not os.path.exists(path):
        raise CCRKError(f"{path} not found: no Multi30K split {split!r}; "
                        f"available: {', '.join(available_splits(root)) or 'none'}")
    with open(path, encoding="utf-8") as f:
        names = [line.strip().split("#", 1)[0] for line in f]
    return path, names


def read_captions(root: str, split: str, lang: str) -> tuple[str, list[str]]:
    """(path, captions) of ``raw/<split>.<lang>.gz``, each line with its newline stripped and nothing else."""
    path = os.path.join(root, "raw", f"{split}.{lang}.gz")
    if not os.path.exists(path):
        available = available_langs(root, split)
        raise CCRKError(f"Multi30K {split} has no {lang!r} captions ({path} not found); "
                        f"available: {', '.join(available) or 'none'}")
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            captions = [line.rstrip("\n") for line in f]
    except (OSError, UnicodeDecodeError, EOFError) as exc:
        raise CCRKError(f"cannot read {path}: {exc}") from exc
    return path, captions


def _aligned(root: str, split: str, lang: str) -> tuple[str, str, list[tuple[str, str]]]:
    """(split file, caption file, [(image file name, caption)]), the two files checked line for line."""
    split_path, names = read_image_split(root, split)
    caption_path, captions = read_captions(root, split, lang)
    if len(captions) != len(names):
        raise CCRKError(f"{caption_path} has {len(captions)} captions but {split_path} lists {len(names)} "
                        f"images; the two files must align line by line")
    return split_path, caption_path, list(zip(names, captions))


def load_raw(data_dir: str, langs=None, image_root: str | None = None, split: str = "test_2016_flickr",
             skip_missing: bool = False, max_words: int | None = None) -> Benchmark:
    """One :class:`RetrievalSet` per language of ``split`` (every language published for it by default);
    images under ``image_root`` (default ``<data_dir>/images``); ``max_words`` as for the other loaders."""
    root = _raw_root(data_dir)
    image_root = image_root or os.path.join(data_dir, "images")
    langs = langs or tuple(listed_lang(lang, os.path.join(root, "raw", f"{split}.{lang}.gz"))
                           for lang in available_langs(root, split))
    if not langs:
        with_captions = [s for s in available_splits(root) if available_langs(root, s)]
        raise CCRKError(f"no Multi30K split {split!r} with captions in {os.path.join(root, 'raw')}; "
                        f"available: {', '.join(with_captions) or 'none'}")
    bench = Benchmark("multi30k")
    for lang in langs:
        split_path, caption_path, rows = _aligned(root, split, lang)
        b = _Builder("multi30k", lang, caption_path, skip_missing, max_words=max_words)
        for n, (name, caption) in enumerate(rows, 1):
            img = image_file(image_root, name, f"{split_path}:{n}")
            b.add(os.path.splitext(name)[0], ImageRef(key=os.path.abspath(img), path=img), [caption],
                  f"{split_path}:{n}", os.path.exists(img))
        bench.sets[lang] = [b.build()]
    return bench


def load_raw_train(data_dir: str, lang: str, image_root: str | None = None, skip_missing: bool = False,
                   clean: CaptionCleaner | None = None, split: str = "train") -> tuple[list[TrainPair], int]:
    """Training pairs of ``lang`` from ``split``; (pairs, skipped images). ``clean`` as for
    :func:`ccrk.evaluation.benchmarks.load_cclm_train` (default: stripped as published)."""
    root = _raw_root(data_dir)
    image_root = image_root or os.path.join(data_dir, "images")
    clean = clean or CaptionCleaner()
    split_path, _, rows = _aligned(root, split, lang)
    pairs: list[TrainPair] = []
    skipped = 0
    for n, (name, caption) in enumerate(rows, 1):
        img = image_file(image_root, name, f"{split_path}:{n}")
        if not os.path.exists(img):
            if not skip_missing:
                raise CCRKError(f"{split_path}:{n}: image {img} not found; pass --skip-missing to skip it")
            skipped += 1
            continue
        text = clean(caption)
        if text is not None:
            pairs.append(TrainPair(ImageRef(key=os.path.abspath(img), path=img), text, os.path.splitext(name)[0]))
    return pairs, skipped
