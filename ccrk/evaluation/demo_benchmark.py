"""The demo benchmark: the demo corpus's held-out split written in the xFlickr&CO (IGLUE) layout.

So the demo model is evaluated through the same loader as the real benchmark:
``annotations/<lang>/test.jsonl`` (held-out images, every caption in that language),
``annotations/<lang>/train_ann.jsonl`` (the training set, from the train split: English for the
zero-shot fine-tune, each language for a single-language one, which IGLUE does not ship),
``annotations/<lang>/valid_ann.jsonl`` (the validation split the fine-tune's checkpoint
is selected on: the last tenth of the train-split images, left out of train_ann.jsonl, as Flickr30K's
valid_ann.jsonl is disjoint from its train_ann.jsonl; none under 10 train images),
``annotations/<lang>/train_<N>.jsonl`` (few-shot files, one caption per image, from the training
images, as IGLUE's) and ``images/`` holding every referenced image.
"""
from __future__ import annotations

import json
import os
import random
import shutil

from storage import atomic
from storage.demo import grammar
from storage.errors import CCRKError

MARKER = "benchmark.json"
FEW_SHOTS = (1, 5, 10, 25, 50, 100)
VAL_FRACTION = 10  # one train-split image in 10 is the validation split's


def _line(image: dict, sentences: list[str]) -> str:
    img_path = os.path.basename(image["file"])
    return json.dumps({"sentences": sentences, "id": image["id"], "img_path": img_path}, ensure_ascii=False) + "\n"


def _place_image(src: str, dst: str) -> None:
    """Hard-link when possible (same file system), else copy; atomic either way."""
    if os.path.exists(dst):
        return
    if not os.path.exists(src):
        raise CCRKError(f"demo corpus image {src} not found; regenerate the demo corpus")
    with atomic.atomic_path(dst) as tmp:
        os.unlink(tmp)
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)


def write_demo_benchmark(corpus_dir: str, out_dir: str, langs=grammar.LANGS, seed: int = 0) -> dict:
    """Write the demo benchmark from ``<corpus_dir>/demo_manifest.json``; returns a summary.

    Idempotent: with the same manifest and parameters an existing benchmark is kept.
    """
    manifest_path = os.path.join(corpus_dir, "demo_manifest.json")
    if not os.path.exists(manifest_path):
        raise CCRKError(f"{manifest_path} not found; generate the demo corpus first")
    with open(manifest_path, encoding="utf-8") as f:
        manifest = json.load(f)
    params = {"manifest_params": manifest.get("params"), "langs": list(langs), "seed": seed,
              "few_shots": list(FEW_SHOTS), "layout": "xflickrco", "val": VAL_FRACTION,
              "train_langs": "all"}
    marker = os.path.join(out_dir, MARKER)
    if os.path.exists(marker):
        with open(marker, encoding="utf-8") as f:
            existing = json.load(f)
        if existing.get("params") == params:
            return {**existing, "skipped": True}

    heldout = [im for im in manifest["images"] if im["split"] == "heldout"]
    train = [im for im in manifest["images"] if im["split"] == "train"]
    if not heldout:
        raise CCRKError(f"{manifest_path} has no held-out images")
    for im in heldout + train:
        missing = [lang for lang in langs if any(lang not in c for c in im["captions"])]
        if missing:
            raise CCRKError(f"{manifest_path}: image {im['id']} has no {', '.join(missing)} caption")

    n_val = len(train) // VAL_FRACTION
    train, val = train[:len(train) - n_val], train[len(train) - n_val:]
    ann = os.path.join(out_dir, "annotations")
    for lang in langs:
        atomic.write_text(os.path.join(ann, lang, "test.jsonl"),
                          "".join(_line(im, [c[lang] for c in im["captions"]]) for im in heldout))
        atomic.write_text(os.path.join(ann, lang, "train_ann.jsonl"),
                          "".join(_line(im, [c[lang] for c in im["captions"]]) for im in train))
        if val:
            atomic.write_text(os.path.join(ann, lang, "valid_ann.jsonl"),
                              "".join(_line(im, [c[lang] for c in im["captions"]]) for im in val))
    few_shot = {}
    for lang in langs:
        if lang == "en":
            continue
        order = list(train)
        random.Random(f"demo-few-shot/{seed}/{lang}").shuffle(order)
        for n in FEW_SHOTS:
            if n > len(order):
                break
            atomic.write_text(os.path.join(ann, lang, f"train_{n}.jsonl"),
                              "".join(_line(im, [im["captions"][0][lang]]) for im in order[:n]))
            few_shot.setdefault(lang, []).append(n)
    for im in heldout + train + val:
        _place_image(os.path.join(corpus_dir, im["file"]), os.path.join(out_dir, "images", os.path.basename(im["file"])))

    summary = {"params": params, "out_dir": out_dir, "langs": list(langs), "n_test_images": len(heldout),
               "n_test_texts_per_lang": sum(len(im["captions"]) for im in heldout),
               "n_train_images": len(train), "n_val_images": len(val), "few_shot": few_shot}
    atomic.write_json(marker, summary)  # last: its presence marks a complete benchmark
    return {**summary, "skipped": False}
