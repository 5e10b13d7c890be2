"""Which reader a benchmark folder needs: the published layouts first, then CCLM's re-formatted json.

- Multi30K: a checkout of github.com/multi30k/dataset (``data/task1/raw`` + ``image_splits``) is read
  as published (:mod:`ccrk.evaluation.multi30k`), else CCLM's ``<split>.<lang>.json``;
- COCO: Karpathy's ``dataset_coco.json`` with STAIR Captions (ja) and COCO-CN (zh)
  (:mod:`ccrk.evaluation.coco`), else CCLM's ``<lang>.<split>.json``;
- WIT: IGLUE's annotations joined with WIT's image-pixel files given as ``images``
  (:mod:`ccrk.evaluation.wit`), else files already carrying ``image_content``;
- xFlickr&CO (and the demo): IGLUE's layout (:mod:`ccrk.evaluation.benchmarks`).

:func:`load_benchmark` reads a test or validation split, :func:`training_pairs` a training set, and
:func:`training_sources` names the files a training set is read from (what a fine-tune's id hashes).
"""
from __future__ import annotations

import os

from ccrk.evaluation import benchmarks as bm
from ccrk.evaluation import coco, multi30k, wit
from storage.errors import CCRKError


def load_benchmark(name: str, data_dir: str, langs=None, images: str | None = None, coco_images: str | None = None,
                   skip_missing: bool = False, max_words: int | None = None, split: str = "test") -> bm.Benchmark:
    """The ``split`` (test or val) of benchmark ``name`` from ``data_dir``, whichever layout it holds."""
    if os.path.isdir(data_dir) and split in ("test", "val"):
        if name == "multi30k" and multi30k.find_raw_root(data_dir):
            return multi30k.load_raw(data_dir, langs, images, "test_2016_flickr" if split == "test" else "val",
                                     skip_missing, max_words)
        if name == "coco" and coco.find_published(data_dir) is not None:
            return coco.load_published(data_dir, langs, images, split, skip_missing, max_words)
        if name == "wit" and images:
            return wit.load_wit_joined(data_dir, images, langs, skip_missing, max_words, split)
    return bm.load_benchmark(name, data_dir, langs, images, coco_images, skip_missing, max_words, split)


def _cclm_training_file(benchmark: str, data_dir: str, lang: str) -> str:
    name = {"multi30k": f"train.{lang}.json", "coco": f"{lang}.train.json", "wit": f"train_{lang}.jsonl"}[benchmark]
    for d in (data_dir, os.path.join(data_dir, "annotations")):
        if os.path.exists(os.path.join(d, name)):
            return os.path.join(d, name)
    raise CCRKError(f"training file {name} not found in {data_dir}")


def training_sources(benchmark: str, data_dir: str, lang: str, shots: int | None = None) -> list[str]:
    """The published file(s) the ``lang`` training set (``shots``: the few-shot file) is read from."""
    if benchmark in ("xflickrco", "demo"):
        return [bm.xflickrco_train_file(data_dir, lang, shots)]
    if shots is not None:
        raise CCRKError(f"few-shot files exist for xFlickr&CO only, not {benchmark}")
    root = multi30k.find_raw_root(data_dir) if benchmark == "multi30k" else None
    if root:
        sources = [os.path.join(root, "image_splits", "train.txt"), os.path.join(root, "raw", f"train.{lang}.gz")]
    elif benchmark == "coco" and coco.find_published(data_dir) is not None:
        sources = coco.train_sources(data_dir, lang)
    else:
        return [_cclm_training_file(benchmark, data_dir, lang)]
    missing = [path for path in sources if not os.path.exists(path)]
    if missing:
        raise CCRKError(f"{benchmark} {lang} training file {missing[0]} not found")
    return sources


def training_pairs(benchmark: str, data_dir: str, lang: str, shots: int | None = None, images: str | None = None,
                   coco_images: str | None = None, skip_missing: bool = False,
                   clean: bm.CaptionCleaner | None = None) -> tuple[list[bm.TrainPair], int]:
    """(pairs, skipped images) of the ``lang`` training set (``shots``: the few-shot file)."""
    images_dir = images or os.path.join(data_dir, "images")
    if benchmark in ("xflickrco", "demo"):
        return bm.load_xflickrco_train(bm.xflickrco_train_file(data_dir, lang, shots), images_dir,
                                       coco_images or images_dir, skip_missing, clean)
    if benchmark == "multi30k" and multi30k.find_raw_root(data_dir):
        return multi30k.load_raw_train(data_dir, lang, images, skip_missing, clean)
    if benchmark == "coco" and coco.find_published(data_dir) is not None:
        return coco.load_published_train(data_dir, lang, images, skip_missing, clean)
    path = _cclm_training_file(benchmark, data_dir, lang)
    if benchmark == "wit":
        if images:
            return wit.load_wit_joined_train(path, images, skip_missing, clean)
        return bm.load_wit_train(path, skip_missing, clean)
    return bm.load_cclm_train(path, images_dir, skip_missing, clean)
