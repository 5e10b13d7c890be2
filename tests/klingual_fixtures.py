"""Tiny inputs for the build stage, written in the contract layout (used by tests and the benchmark).

- :func:`write_source` -- ``sources/<source>/<version>/`` with images.parquet, captions.parquet and
  an img2dataset-style image shard (``00000.tar`` of ``<key>.jpg`` + ``<key>.json`` carrying
  ``image_key``, and ``00000.parquet`` with the status of every image), recorded in the catalog.
- :func:`write_translations` -- one ``part-00000.parquet`` of the translation store.
- :func:`tiny_corpus` -- two sources and three languages with known missing / flagged rows.
"""
from __future__ import annotations

import io
import json
import os
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq


def ensure_normalize():
    """``storage.versioning.normalize`` (the one caption normalisation; kept as a function for
    the modules that call it)."""
    from storage.versioning import normalize

    return normalize


def sha(text: str) -> str:
    from storage.versioning import text_sha

    return text_sha(ensure_normalize()(text))


def make_jpeg(i: int, size: int = 24, quality: int = 85) -> bytes:
    from PIL import Image

    im = Image.new("RGB", (size, size), ((i * 37) % 256, (i * 91) % 256, (i * 13) % 256))
    for x in range(0, size, 3):
        im.putpixel((x, (x * i) % size), (255 - (i % 256), x % 256, 0))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def write_source(root: str, source: str, version: str, images: list[dict], record: bool = True,
                 jpeg=make_jpeg) -> str:
    """``images``: dicts with ``id``, ``captions`` (list of str), optional ``boxes`` (one (x, y, w, h)
    per caption), ``failed`` (not downloaded), ``truncate`` (tar cut inside this image)."""
    from storage import layout
    from storage.catalog import Artifact, Catalog

    d = layout.source_dir(root, source, version)
    os.makedirs(os.path.join(d, "shards"), exist_ok=True)
    img_rows = {"image_key": [], "url": [], "source": [], "source_id": [], "width": [], "height": []}
    cap_rows = {"image_key": [], "caption_id": [], "caption": []}
    if any("boxes" in im for im in images):
        cap_rows.update({"region_id": [], "x": [], "y": [], "w": [], "h": []})
    status = {"key": [], "status": [], "image_key": [], "url": [], "error_message": []}
    tar_path = os.path.join(d, "shards", "00000.tar")
    cut_at = None
    with tarfile.open(tar_path, "w") as tar:
        for n, im in enumerate(images):
            key, image_key = f"{n:09d}", f"{source}-{im['id']}"
            url = f"http://127.0.0.1:1/{source}/{im['id']}.jpg"
            img_rows["image_key"].append(image_key)
            img_rows["url"].append(url)
            img_rows["source"].append(source)
            img_rows["source_id"].append(str(im["id"]))
            img_rows["width"].append(24)
            img_rows["height"].append(24)
            for c, text in enumerate(im["captions"]):
                cap_rows["image_key"].append(image_key)
                cap_rows["caption_id"].append(f"{im['id']}_{c}")
                cap_rows["caption"].append(text)
                if "region_id" in cap_rows:
                    box = (im.get("boxes") or [None] * len(im["captions"]))[c]
                    cap_rows["region_id"].append(1000 + c if box else None)
                    for k, v in zip("xywh", box or (None,) * 4):
                        cap_rows[k].append(v)
            status["key"].append(key)
            status["image_key"].append(image_key)
            status["url"].append(url)
            if im.get("failed"):
                status["status"].append("failed_to_download")
                status["error_message"].append("HTTP 404")
                continue
            status["status"].append("success")
            status["error_message"].append(None)
            if im.get("truncate"):
                cut_at = tar.offset + 512 + 10
            for name, blob in ((f"{key}.jpg", jpeg(n)),
                               (f"{key}.json", json.dumps({"key": key, "url": url, "image_key": image_key,
                                                           "status": "success"}).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(blob)
                tar.addfile(info, io.BytesIO(blob))
    if cut_at is not None:
        with open(tar_path, "r+b") as f:
            f.truncate(cut_at)
    pq.write_table(pa.table(status), os.path.join(d, "shards", "00000.parquet"))
    ok = sum(1 for s in status["status"] if s == "success")
    with open(os.path.join(d, "shards", "00000_stats.json"), "w") as f:
        json.dump({"count": len(images), "successes": ok, "failed_to_download": len(images) - ok}, f)
    pq.write_table(pa.table(img_rows), os.path.join(d, "images.parquet"))
    pq.write_table(pa.table(cap_rows), os.path.join(d, "captions.parquet"))
    with open(os.path.join(d, "source.json"), "w") as f:
        json.dump({"source": source, "version": version}, f)
    if record:
        Catalog(root).record(Artifact(version, "source", source, d, params={"fixture": True}))
    return d


def write_translations(root: str, model_id: str, decode_id: str, lang: str, rows: dict[str, tuple[str, bool]],
                       part: int = 0) -> str:
    """``rows``: English text -> (translation, ok)."""
    from storage import layout

    d = layout.translation_dir(root, model_id, decode_id, lang)
    os.makedirs(d, exist_ok=True)
    n = len(rows)
    texts = list(rows)
    table = pa.table({
        "text_sha": [sha(t) for t in texts], "tgt_lang": [lang] * n,
        "src_text": [ensure_normalize()(t) for t in texts], "tgt_text": [rows[t][0] for t in texts],
        "model_id": [model_id] * n, "decode_id": [decode_id] * n,
        "uniformity": [0.9] * n, "copy_sim": [0.1] * n, "len_ratio": [1.0] * n,
        "script_ok": [True] * n, "empty": [False] * n, "truncated": [False] * n,
        "ok": [rows[t][1] for t in texts]})
    path = os.path.join(d, f"part-{part:05d}.parquet")
    pq.write_table(table, path)
    return path


MODEL, DECODE = "m2m100_demo", "greedy-d0"


def tiny_corpus(root: str) -> dict:
    """coco (3 images, 2 captions each, one image failed to download, one with no captions) and
    vg (2 images with region boxes); es and ru translations where ru misses one caption and one
    es translation is flagged (ok=False)."""
    coco = [
        {"id": 1, "captions": ["a red  circle", "a small red circle"]},
        {"id": 2, "captions": ["a blue square", "two blue squares"]},
        {"id": 3, "captions": ["a green star"], "failed": True},
        {"id": 4, "captions": []},
        {"id": 5, "captions": ["an orange triangle"]},
    ]
    vg = [
        {"id": 10, "captions": ["a yellow star", "a white circle"], "boxes": [(1, 2, 3, 4), (5, 6, 7, 8)]},
        {"id": 11, "captions": ["a black square"], "boxes": [(0, 0, 10, 10)]},
    ]
    write_source(root, "coco", "cocov1", coco)
    write_source(root, "vg", "vgv1", vg)
    texts = [c for im in coco + vg for c in im["captions"]]
    es = {t: (f"ES {ensure_normalize()(t)}", t != "two blue squares") for t in texts}
    ru = {t: (f"RU {ensure_normalize()(t)}", True) for t in texts if t != "a white circle"}
    write_translations(root, MODEL, DECODE, "es", es)
    write_translations(root, MODEL, DECODE, "ru", ru)
    return {"coco": coco, "vg": vg}
