"""The embedded demo corpus: synthetic shape images with captions, in the four official metadata formats.

:func:`generate_demo_corpus` draws a few hundred scenes of the demo grammar (coloured shapes of two
sizes at five positions) as JPEGs and writes ``demo_manifest.json``, the ground truth of every image
(objects, pixel boxes, captions in all five languages, train or held-out split).
:func:`write_demo_metadata` then publishes the train images the way CC3M, SBU, Visual Genome and
COCO publish theirs, with urls under a base url (the loopback server), so the real source adapters
read them; :func:`demo_archives` packs those files the way they ship (zip / tar.gz).

The corpus also plants copies of held-out (benchmark) images, drawn from a random stream of their
own after every other image (:func:`plant_copies`): the same bytes under another url, one per
source, listed in the metadata only with ``write_demo_metadata(plant=True)`` -- for a build that
excludes the demo benchmark to find (``ccrk reproduce`` plants them when it does). Each copy takes
the captions of an earlier image of its source, so the corpus's set of English texts, every other
image and every other caption stay as they are.

Everything is a pure function of the seed (and of ``base_url`` for the metadata): same arguments,
byte-identical files.
"""
from __future__ import annotations

import gzip
import io
import json
import math
import os
import random
import stat
import tarfile
import zipfile

import numpy as np
from PIL import Image, ImageDraw

from storage import atomic
from storage.demo import grammar
from storage.demo.karpathy import write_karpathy_split

MANIFEST = "demo_manifest.json"
CORPUS_VERSION = "2"  # 2: planted copies of held-out images
TRAIN_SOURCES = ("cc3m", "sbu", "vg", "coco")
SIZE_FRACTION = {"small": 0.22, "large": 0.45}
# Centre of each position region, as a fraction of the side (x, y).
REGION_CENTER = {"left": (0.25, 0.5), "right": (0.75, 0.5), "top": (0.5, 0.25),
                 "bottom": (0.5, 0.75), "center": (0.5, 0.5)}
# A fixed timestamp for archive members, so archives are byte-identical run to run.
_EPOCH = (2020, 1, 1, 0, 0, 0)
_EPOCH_SECONDS = 1577836800


# --------------------------------------------------------------------------- images


def _background(rng: random.Random, side: int) -> Image.Image:
    """A light neutral colour with a slight tint and mild pixel noise (so JPEG sizes vary)."""
    gray = rng.randint(185, 225)
    tint = [rng.randint(-10, 10) for _ in range(3)]
    base = np.array([gray + t for t in tint], dtype=np.int16)
    noise = np.random.default_rng(rng.getrandbits(32)).integers(-6, 7, size=(side, side, 3), dtype=np.int16)
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB")


def _box(obj: grammar.Obj, rng: random.Random, side: int) -> tuple[int, int, int, int]:
    """Pixel box (x, y, w, h) of an object: its size class, centred in its region with a little jitter."""
    s = max(4, round(SIZE_FRACTION[obj.size] * side))
    fx, fy = REGION_CENTER[obj.position]
    jitter = side * 0.04
    cx = fx * side + rng.uniform(-jitter, jitter)
    cy = fy * side + rng.uniform(-jitter, jitter)
    x = int(min(max(round(cx - s / 2), 0), side - s))
    y = int(min(max(round(cy - s / 2), 0), side - s))
    return x, y, s, s


def _star(x: int, y: int, w: int, h: int) -> list[tuple[float, float]]:
    cx, cy, r_out = x + w / 2, y + h / 2, w / 2
    r_in = r_out * 0.45
    points = []
    for k in range(10):
        r = r_out if k % 2 == 0 else r_in
        a = -math.pi / 2 + k * math.pi / 5
        points.append((cx + r * math.cos(a), cy + r * math.sin(a)))
    return points


def _heart(x: int, y: int, w: int, h: int) -> list[tuple[float, float]]:
    """The classic parametric heart curve, scaled into the box."""
    pts = []
    for k in range(60):
        t = 2 * math.pi * k / 60
        px = 16 * math.sin(t) ** 3
        py = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
        pts.append((px, -py))
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    x0, y0, sx, sy = min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)
    return [(x + (px - x0) / sx * (w - 1), y + (py - y0) / sy * (h - 1)) for px, py in pts]


def _draw(draw: ImageDraw.ImageDraw, obj: grammar.Obj, box: tuple[int, int, int, int]) -> None:
    x, y, w, h = box
    fill = grammar.RGB[obj.color]
    if obj.shape == "circle":
        draw.ellipse([x, y, x + w - 1, y + h - 1], fill=fill)
    elif obj.shape == "square":
        draw.rectangle([x, y, x + w - 1, y + h - 1], fill=fill)
    elif obj.shape == "triangle":
        draw.polygon([(x + w / 2, y), (x + w - 1, y + h - 1), (x, y + h - 1)], fill=fill)
    elif obj.shape == "star":
        draw.polygon(_star(x, y, w, h), fill=fill)
    elif obj.shape == "heart":
        draw.polygon(_heart(x, y, w, h), fill=fill)
    else:
        raise ValueError(f"unknown demo shape {obj.shape!r}")


def render_scene(scene: tuple[grammar.Obj, ...], rng: random.Random, side: int) -> tuple[bytes, list[dict]]:
    """JPEG bytes of a scene and its objects with pixel boxes (large objects drawn first)."""
    img = _background(rng, side)
    draw = ImageDraw.Draw(img)
    objects = []
    for obj in scene:
        x, y, w, h = _box(obj, rng, side)
        objects.append({"shape": obj.shape, "color": obj.color, "size": obj.size,
                        "position": obj.position, "box": {"x": x, "y": y, "w": w, "h": h}})
    # Small objects on top, so a small object next to a large one stays visible.
    for o in sorted(objects, key=lambda o: o["size"] != "large"):
        _draw(draw, grammar.Obj(o["shape"], o["color"], o["size"], o["position"]),
              (o["box"]["x"], o["box"]["y"], o["box"]["w"], o["box"]["h"]))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue(), objects


# --------------------------------------------------------------------------- corpus


def _distinct_scene(rng: random.Random) -> tuple[grammar.Obj, ...]:
    """A grammar scene whose objects differ in shape or colour, so every caption names one object."""
    while True:
        scene = grammar.sample_scene(rng)
        if len({(o.shape, o.color) for o in scene}) == len(scene):
            return scene


def _params(seed: int, n_train: int, n_heldout: int, image_px: int) -> dict:
    return {"seed": seed, "n_train": n_train, "n_heldout": n_heldout, "image_px": image_px,
            "corpus_version": CORPUS_VERSION}


def load_manifest(out_dir: str) -> dict:
    with open(os.path.join(out_dir, MANIFEST), encoding="utf-8") as f:
        return json.load(f)


def _summary(manifest: dict, out_dir: str, skipped: bool) -> dict:
    images = manifest["images"]
    by_source: dict[str, int] = {}
    for im in images:
        by_source[im["source"]] = by_source.get(im["source"], 0) + 1
    return {"out_dir": out_dir, "manifest": os.path.join(out_dir, MANIFEST), "n_images": len(images),
            "n_train": sum(im["split"] == "train" for im in images),
            "n_heldout": sum(im["split"] == "heldout" for im in images),
            "n_planted": len(manifest.get("planted", [])),
            "by_source": dict(sorted(by_source.items())), "skipped": skipped, **manifest["params"]}


def generate_demo_corpus(out_dir: str, seed: int = 0, n_train: int = 400, n_heldout: int = 100,
                         image_px: int = 128) -> dict:
    """Draw the demo corpus into ``out_dir`` (images/ + demo_manifest.json); returns a summary.

    Train images are dealt round-robin over cc3m, sbu, vg, coco; held-out images have source
    ``heldout``. Idempotent: an existing manifest with the same parameters (and its images) is kept.
    """
    if n_train < 0 or n_heldout < 0 or image_px < 32:
        raise ValueError("demo corpus needs n_train >= 0, n_heldout >= 0 and image_px >= 32")
    params = _params(seed, n_train, n_heldout, image_px)
    manifest_path = os.path.join(out_dir, MANIFEST)
    if os.path.exists(manifest_path):
        try:
            existing = load_manifest(out_dir)
        except (OSError, ValueError):
            existing = None
        if existing and existing.get("params") == params and all(
                os.path.exists(os.path.join(out_dir, im["file"])) for im in existing["images"]):
            return _summary(existing, out_dir, skipped=True)

    images = []
    for i in range(n_train + n_heldout):
        # One generator per image, so image i is the same whatever n_train / n_heldout are.
        rng = random.Random(f"ccrk-demo/{seed}/{i}")
        split = "train" if i < n_train else "heldout"
        image_id = f"demo{i:05d}"
        scene = _distinct_scene(rng)
        phrases = grammar.scene_phrases(scene, rng, n=3)
        jpeg, objects = render_scene(scene, rng, image_px)
        rel = f"images/{image_id}.jpg"
        atomic.write_bytes(os.path.join(out_dir, rel), jpeg)
        images.append({
            "id": image_id, "index": i, "split": split,
            "source": TRAIN_SOURCES[i % len(TRAIN_SOURCES)] if split == "train" else "heldout",
            "file": rel, "width": image_px, "height": image_px, "objects": objects,
            "captions": [grammar.render_all(p) for p in phrases],
        })
    manifest = {"params": params, "images": images, "planted": plant_copies(out_dir, images, seed)}
    atomic.write_json(manifest_path, manifest)  # last: its presence marks a complete corpus
    return _summary(manifest, out_dir, skipped=False)


def plant_copies(out_dir: str, images: list[dict], seed: int) -> list[dict]:
    """Copies of held-out images to plant in the training metadata, one per source: the held-out
    image's very bytes under another name (``images/planted-<source>.jpg``: another url), drawn
    from their own random stream so that no other image changes. Each takes the captions (and, for
    Visual Genome, the regions) of the first train image of its source. Only exact copies: the
    demo's scenes are too alike for a perceptual hash (README, Benchmark exclusion)."""
    heldout = [im for im in images if im["split"] == "heldout"]
    rng = random.Random(f"ccrk-demo-plant/{seed}")
    planted = []
    for k, source in enumerate(TRAIN_SOURCES):
        donor = next((im for im in images if im["split"] == "train" and im["source"] == source), None)
        if not heldout or donor is None:
            break
        original = rng.choice(heldout)
        rel = f"images/planted-{source}.jpg"
        with open(os.path.join(out_dir, original["file"]), "rb") as f:
            atomic.write_bytes(os.path.join(out_dir, rel), f.read())
        planted.append({"id": f"planted-{source}", "index": 1_000_000 + k, "source": source, "file": rel,
                        "copy_of": original["id"], "how": "same bytes, another url", "width": original["width"],
                        "height": original["height"], "objects": donor["objects"], "captions": donor["captions"]})
    return planted


# --------------------------------------------------------------------------- official metadata


def _dumps(obj) -> str:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def _train_images(manifest: dict, source: str) -> list[dict]:
    return [im for im in manifest["images"] if im["split"] == "train" and im["source"] == source]


def _planted(manifest: dict, source: str, plant: bool) -> list[dict]:
    return [im for im in manifest.get("planted", []) if im["source"] == source] if plant else []


def _is_validation(k: int) -> bool:
    """Every tenth image of a source goes to the validation file (CC3M, COCO)."""
    return k % 10 == 9


def _url(base_url: str, im: dict) -> str:
    return f"{base_url.rstrip('/')}/{im['file']}"


def _numeric_id(im: dict) -> int:
    """VG / COCO ids are integers: the image's corpus index + 1."""
    return im["index"] + 1


def _object_phrase(o: dict) -> str:
    return grammar.render(grammar.Phrase("size", (grammar.Obj(o["shape"], o["color"], o["size"], o["position"]),)), "en")


def _write_cc3m(manifest, base_url, d, plant=False) -> list[str]:
    train, val = [], []
    for k, im in enumerate(_train_images(manifest, "cc3m")):
        (val if _is_validation(k) else train).append(f"{im['captions'][0]['en']}\t{_url(base_url, im)}\n")
    train += [f"{im['captions'][0]['en']}\t{_url(base_url, im)}\n" for im in _planted(manifest, "cc3m", plant)]
    paths = [os.path.join(d, "Train_GCC-training.tsv"), os.path.join(d, "Validation_GCC-1.1.0-Validation.tsv")]
    for path, lines in zip(paths, (train, val)):
        atomic.write_text(path, "".join(lines))
    return paths


def _write_sbu(manifest, base_url, d, plant=False) -> list[str]:
    ims = _train_images(manifest, "sbu") + _planted(manifest, "sbu", plant)
    urls = [_url(base_url, im) for im in ims]
    caps = [im["captions"][0]["en"] for im in ims]
    users = [f"{10000000 + im['index']}@N0{im['index'] % 10}" for im in ims]
    paths = [os.path.join(d, "sbu-captions-all.json"),
             os.path.join(d, "SBU_captioned_photo_dataset_urls.txt"),
             os.path.join(d, "SBU_captioned_photo_dataset_captions.txt")]
    atomic.write_text(paths[0], _dumps({"image_urls": urls, "captions": caps, "user_ids": users}))
    atomic.write_text(paths[1], "".join(u + "\n" for u in urls))
    atomic.write_text(paths[2], "".join(c + "\n" for c in caps))
    return paths


def _write_vg(manifest, base_url, d, plant=False) -> list[str]:
    image_data, regions = [], []
    region_id = 0
    for im in _train_images(manifest, "vg") + _planted(manifest, "vg", plant):
        vid = _numeric_id(im)
        image_data.append({"image_id": vid, "url": _url(base_url, im), "width": im["width"],
                           "height": im["height"], "coco_id": None, "flickr_id": None})
        rs = []
        for o in im["objects"]:
            region_id += 1
            b = o["box"]
            rs.append({"region_id": region_id, "image_id": vid, "phrase": _object_phrase(o),
                       "x": b["x"], "y": b["y"], "width": b["w"], "height": b["h"]})
        regions.append({"regions": rs, "id": vid})
    paths = [os.path.join(d, "image_data.json"), os.path.join(d, "region_descriptions.json")]
    atomic.write_text(paths[0], _dumps(image_data))
    atomic.write_text(paths[1], _dumps(regions))
    return paths


def _write_coco(manifest, base_url, d, plant=False) -> list[str]:
    info = {"description": "ccrk demo corpus in COCO 2017 captions format", "version": "1.0",
            "year": 2017, "contributor": "ccrk", "date_created": "2017/09/01", "url": base_url}
    licenses = [{"id": 1, "name": "CC0 1.0", "url": "https://creativecommons.org/publicdomain/zero/1.0/"}]
    splits = {"train2017": ([], []), "val2017": ([], [])}
    ann_id = 0
    planted = _planted(manifest, "coco", plant)
    for k, im in enumerate(_train_images(manifest, "coco") + planted):
        split = "val2017" if _is_validation(k) and im not in planted else "train2017"
        cid = _numeric_id(im)
        images, anns = splits[split]
        images.append({"id": cid, "file_name": f"{cid:012d}.jpg", "coco_url": _url(base_url, im),
                       "flickr_url": _url(base_url, im), "width": im["width"], "height": im["height"],
                       "license": 1, "date_captured": "2013-11-14 16:28:13"})
        for cap in im["captions"]:
            ann_id += 1
            anns.append({"id": ann_id, "image_id": cid, "caption": cap["en"]})
    paths = []
    for split, (images, anns) in splits.items():
        path = os.path.join(d, "annotations", f"captions_{split}.json")
        atomic.write_text(path, _dumps({"info": info, "licenses": licenses, "images": images,
                                        "annotations": anns}))
        paths.append(path)
    return paths + [write_karpathy_split(paths)]  # the COCO source keeps Karpathy's train + restval


_WRITERS = {"cc3m": _write_cc3m, "sbu": _write_sbu, "vg": _write_vg, "coco": _write_coco}


def write_demo_metadata(out_dir: str, base_url: str, plant: bool = False) -> dict[str, list[str]]:
    """Write each source's train images in its official metadata format under ``out_dir/metadata/<source>/``;
    ``plant``: the planted copies of held-out images too, after the train images (:func:`plant_copies`).

    Urls are ``{base_url}/images/<id>.jpg``. Returns ``{source: [paths]}``:
    cc3m: the train and validation tsv; sbu: ``sbu-captions-all.json`` then the urls/captions txt
    pair; vg: ``image_data.json``, ``region_descriptions.json``; coco: captions train2017, val2017 and
    Karpathy's ``dataset_coco.json`` (:mod:`storage.demo.karpathy`).
    """
    manifest = load_manifest(out_dir)
    return {source: _WRITERS[source](manifest, base_url, os.path.join(out_dir, "metadata", source), plant)
            for source in TRAIN_SOURCES}


def _zip(path: str, members: list[tuple[str, str]]) -> str:
    """A deterministic zip of (archive name, file path) pairs."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, src in members:
            info = zipfile.ZipInfo(name, date_time=_EPOCH)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = (stat.S_IFREG | 0o644) << 16
            with open(src, "rb") as f:
                zf.writestr(info, f.read())
    atomic.write_bytes(path, buf.getvalue())
    return path


def _tar_gz(path: str, members: list[tuple[str, str]]) -> str:
    """A deterministic tar.gz of (archive name, file path) pairs."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for name, src in members:
            with open(src, "rb") as f:
                data = f.read()
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), _EPOCH_SECONDS, 0o644
            tf.addfile(info, io.BytesIO(data))
    atomic.write_bytes(path, gzip.compress(raw.getvalue(), mtime=0))
    return path


def demo_archives(out_dir: str) -> dict[str, list[str]]:
    """Pack the demo metadata the way each source ships it, under ``out_dir/archives/<source>/``.

    coco: ``annotations_trainval2017.zip`` (members ``annotations/captions_*.json``) and Karpathy's
    ``caption_datasets.zip`` (member ``dataset_coco.json``);
    vg: ``image_data.json.zip`` and ``region_descriptions.json.zip``;
    sbu: ``sbu-captions-all.tar.gz`` (the json) and ``SBUCaptionedPhotoDataset.tar.gz`` (``dataset/`` txt pair);
    cc3m: ``GCC.zip`` with both tsv files (Google publishes them bare; this exercises zip for tsv).
    Call after :func:`write_demo_metadata`.
    """
    meta = os.path.join(out_dir, "metadata")
    arch = os.path.join(out_dir, "archives")

    def m(source: str, name: str) -> str:
        return os.path.join(meta, source, name)

    coco = [("annotations/captions_train2017.json", m("coco", "annotations/captions_train2017.json")),
            ("annotations/captions_val2017.json", m("coco", "annotations/captions_val2017.json"))]
    return {
        "cc3m": [_zip(os.path.join(arch, "cc3m", "GCC.zip"),
                      [(n, m("cc3m", n)) for n in ("Train_GCC-training.tsv", "Validation_GCC-1.1.0-Validation.tsv")])],
        "sbu": [_tar_gz(os.path.join(arch, "sbu", "sbu-captions-all.tar.gz"),
                        [("sbu-captions-all.json", m("sbu", "sbu-captions-all.json"))]),
                _tar_gz(os.path.join(arch, "sbu", "SBUCaptionedPhotoDataset.tar.gz"),
                        [(f"dataset/{n}", m("sbu", n)) for n in ("SBU_captioned_photo_dataset_urls.txt",
                                                                 "SBU_captioned_photo_dataset_captions.txt")])],
        "vg": [_zip(os.path.join(arch, "vg", f"{n}.zip"), [(n, m("vg", n))])
               for n in ("image_data.json", "region_descriptions.json")],
        "coco": [_zip(os.path.join(arch, "coco", "annotations_trainval2017.zip"), coco),
                 _zip(os.path.join(arch, "coco", "caption_datasets.zip"),
                      [("dataset_coco.json", m("coco", "dataset_coco.json"))])],
    }
