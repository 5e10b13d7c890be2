"""The demo corpus in Multi30K's published layout, for the Multi30K source (:mod:`storage.sources.multi30k`)
and CL2CM's setting on the demo.

:func:`write_multi30k_layout` reads a generated corpus (:func:`storage.demo.corpus.generate_demo_corpus`)
and writes, under ``out_dir``, what a checkout of github.com/multi30k/dataset plus the Flickr30K
images look like: ``data/task1/raw/<split>.<lang>.gz`` aligned line by line with
``data/task1/image_splits/<split>.txt``, and ``flickr30k-images/<id>.jpg``. The corpus's train images
make ``train`` (every tenth one ``val``), English only -- the other languages come from ``ccrk
translate``, as in CL2CM; its held-out images make ``test_2016_flickr`` in every demo language (an
evaluation split, which the source never reads). Ids are Flickr-like numbers (``1000000000 + corpus
index``). A pure function of the corpus: byte-identical files (gzip without timestamps).
"""
from __future__ import annotations

import gzip
import os

from storage import atomic
from storage.demo.corpus import load_manifest
from storage.demo.grammar import LANGS

TASK1 = os.path.join("data", "task1")
IMAGES = "flickr30k-images"
TEST_SPLIT = "test_2016_flickr"


def flickr_id(image: dict) -> str:
    return str(1_000_000_000 + image["index"])


def _split_of(k: int) -> str:
    return "val" if k % 10 == 9 else "train"


def write_multi30k_layout(corpus_dir: str, out_dir: str) -> dict:
    """Write the layout; returns {"metadata": the checkout folder (``--metadata``), "images": the
    image folder (``--images``), "splits": {split: number of images}}."""
    manifest = load_manifest(corpus_dir)
    splits: dict[str, list[dict]] = {"train": [], "val": [], TEST_SPLIT: []}
    k = 0
    for im in manifest["images"]:
        if im["split"] == "train":
            splits[_split_of(k)].append(im)
            k += 1
        else:
            splits[TEST_SPLIT].append(im)
    task1 = os.path.join(out_dir, TASK1)
    for split, images in splits.items():
        names = "".join(f"{flickr_id(im)}.jpg\n" for im in images)
        atomic.write_text(os.path.join(task1, "image_splits", f"{split}.txt"), names)
        for lang in LANGS if split == TEST_SPLIT else ("en",):
            text = "".join(im["captions"][0][lang] + "\n" for im in images)
            atomic.write_bytes(os.path.join(task1, "raw", f"{split}.{lang}.gz"),
                               gzip.compress(text.encode("utf-8"), mtime=0))
        for im in images:
            with open(os.path.join(corpus_dir, im["file"]), "rb") as f:
                atomic.write_bytes(os.path.join(out_dir, IMAGES, f"{flickr_id(im)}.jpg"), f.read())
    return {"metadata": out_dir, "images": os.path.join(out_dir, IMAGES),
            "splits": {s: len(v) for s, v in splits.items()}}
