"""Karpathy's split file for the demo's COCO metadata: ``dataset_coco.json`` beside ``annotations/``.

The COCO source keeps Karpathy's train + restval images (:mod:`storage.sources.coco`), so the demo's
COCO metadata needs the split file too. Every demo COCO image is a training image (the demo's
benchmark images are held out of every source), so the file marks the ``captions_train2017.json``
images ``train`` (folder train2014) and the ``captions_val2017.json`` ones ``restval`` (val2014), as
Karpathy's restval comes from COCO 2014 val; nothing the demo trained on before is dropped.
Same captions files -> byte-identical split file.
"""
from __future__ import annotations

import json
import os

from storage import atomic
from storage.sources.coco import KARPATHY_FILE

# Captions file split -> (Karpathy split, COCO 2014 folder).
_SPLIT = {"train2017": ("train", "train2014"), "val2017": ("restval", "val2014")}


def _read(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def karpathy_images(coco_paths: list[str]) -> list[dict]:
    """The ``images`` entries of ``dataset_coco.json`` for the demo's captions files, in their order."""
    images: list[dict] = []
    sentid = 0
    for path in coco_paths:
        split_name = os.path.basename(path)[len("captions_"):-len(".json")]
        if split_name not in _SPLIT:
            continue
        split, folder = _SPLIT[split_name]
        data = _read(path)
        captions: dict[int, list[str]] = {}
        for ann in data["annotations"]:
            captions.setdefault(ann["image_id"], []).append(ann["caption"])
        for im in data["images"]:
            imgid = len(images)
            sentences = []
            for raw in captions.get(im["id"], []):
                sentences.append({"raw": raw, "tokens": raw.lower().split(), "imgid": imgid, "sentid": sentid})
                sentid += 1
            images.append({"filepath": folder, "filename": f"COCO_{folder}_{im['id']:012d}.jpg", "imgid": imgid,
                           "split": split, "cocoid": im["id"], "sentids": [s["sentid"] for s in sentences],
                           "sentences": sentences})
    return images


def write_karpathy_split(coco_paths: list[str]) -> str:
    """Write ``dataset_coco.json`` for the demo's ``annotations/captions_*.json`` files, in the folder
    that holds ``annotations/``; returns its path (add it to the coco metadata)."""
    captions = [p for p in coco_paths if os.path.basename(p).startswith("captions_")]
    if not captions:
        raise ValueError("no captions_*.json among the demo's COCO files")
    out = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(captions[0]))), KARPATHY_FILE)
    body = {"images": karpathy_images(captions), "dataset": "coco"}
    atomic.write_text(out, json.dumps(body, sort_keys=True, ensure_ascii=False, separators=(",", ":")))
    return out
