"""The COCO source holds Karpathy's train + restval images only: files in the official layouts
(``annotations/captions_{train,val}2017.json`` and ``dataset_coco.json``, plain and in their zips)."""
from __future__ import annotations

import io
import json
import os
import zipfile

import pyarrow.parquet as pq
import pytest
from PIL import Image

from ccrk.app.cli import main as ccrk
from storage.catalog import Catalog
from storage.demo.corpus import generate_demo_corpus, write_demo_metadata
from storage.demo.karpathy import write_karpathy_split
from storage.demo.server import serve
from storage.errors import CCRKError
from storage.sources import prepare_source, source_settings
from storage.sources.coco import KARPATHY_URL

BASE = "http://127.0.0.1:8125"
# COCO id -> (captions file, Karpathy split or None when the split file does not list it). COCO 2017
# train holds Karpathy test/val images too (the 2017 val is another 5K), so both files mix splits.
IMAGES = {1: ("train2017", "train"), 2: ("train2017", "restval"), 3: ("train2017", "test"),
          4: ("train2017", "val"), 5: ("train2017", None), 6: ("val2017", "restval"), 7: ("val2017", "test")}
KEPT = {1: "train", 2: "restval", 6: "restval"}
CAPTIONS_PER_IMAGE = 2


def _captions_file(split: str, base_url: str) -> dict:
    ids = [i for i, (f, _) in IMAGES.items() if f == split]
    images = [{"id": i, "file_name": f"{i:012d}.jpg", "coco_url": f"{base_url}/images/{i}.jpg", "width": 16,
               "height": 16, "license": 1} for i in ids]
    annotations = [{"id": 100 * i + j, "image_id": i, "caption": f"image {i} caption {j}"}
                   for i in ids for j in range(CAPTIONS_PER_IMAGE)]
    return {"info": {}, "licenses": [], "images": images, "annotations": annotations}


def _karpathy_file() -> dict:
    images = []
    listed = [(i, s) for i, (_, s) in IMAGES.items() if s] + [(8, "train")]  # 8: not in these captions files
    for imgid, (cocoid, split) in enumerate(listed):
        folder = "train2014" if split == "train" else "val2014"
        images.append({"filepath": folder, "filename": f"COCO_{folder}_{cocoid:012d}.jpg", "imgid": imgid,
                       "split": split, "cocoid": cocoid, "sentids": [imgid],
                       "sentences": [{"raw": f"image {cocoid}", "tokens": ["image", str(cocoid)], "imgid": imgid,
                                      "sentid": imgid}]})
    return {"images": images, "dataset": "coco"}


def _write(path, obj) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f)
    return str(path)


def _official(d, base_url: str = BASE) -> dict[str, list[str]]:
    """The files in their official layouts, plain and packed as published."""
    d = str(d)
    captions = [_write(os.path.join(d, "annotations", f"captions_{s}.json"), _captions_file(s, base_url))
                for s in ("train2017", "val2017")]
    karpathy = _write(os.path.join(d, "dataset_coco.json"), _karpathy_file())
    annotations_zip = os.path.join(d, "archives", "annotations_trainval2017.zip")
    splits_zip = os.path.join(d, "archives", "caption_datasets.zip")
    os.makedirs(os.path.dirname(annotations_zip))
    with zipfile.ZipFile(annotations_zip, "w") as zf:
        for path in captions:
            zf.write(path, f"annotations/{os.path.basename(path)}")
        zf.writestr("annotations/instances_train2017.json", "{}")
    with zipfile.ZipFile(splits_zip, "w") as zf:
        zf.write(karpathy, "dataset_coco.json")
        zf.writestr("dataset_flickr30k.json", '{"images": [], "dataset": "flickr30k"}')
        zf.writestr("dataset_flickr8k.json", '{"images": [], "dataset": "flickr8k"}')
    return {"files": captions + [karpathy], "archives": [annotations_zip, splits_zip]}


@pytest.fixture
def official(tmp_path):
    return _official(tmp_path / "coco")


def _tables(prepared):
    return pq.read_table(prepared.images_path).to_pylist(), pq.read_table(prepared.captions_path).to_pylist()


def test_only_karpathy_train_and_restval_images_are_kept_and_the_rest_counted(official, root):
    p = prepare_source("coco", official["files"], root)
    images, captions = _tables(p)
    assert {int(im["source_id"]): im["karpathy_split"] for im in images} == KEPT
    assert p.n_images == 3 and p.n_captions == 3 * CAPTIONS_PER_IMAGE
    assert {c["image_key"] for c in captions} == {f"coco-{i}" for i in KEPT}
    # 3, 4 and 7 are Karpathy test / val (COCO's benchmarks); 5 is in no Karpathy split.
    assert p.rejected == {"excluded_split": 3, "not_in_split_file": 1,
                          "caption_of_excluded_image": 4 * CAPTIONS_PER_IMAGE}
    assert p.params["settings"] == {"karpathy_splits": ["restval", "train"], "all_official_images": False}
    assert "dataset_coco.json" in p.metadata_sha256


def test_the_published_archives_give_the_same_source(official, root):
    plain = prepare_source("coco", official["files"], root)
    packed = prepare_source("coco", official["archives"], root)
    assert packed.version == plain.version and packed.rejected == plain.rejected
    assert _tables(packed) == _tables(plain)


def test_without_the_split_file_it_is_a_one_line_error_saying_where_to_get_it(official, root):
    with pytest.raises(CCRKError, match="dataset_coco.json is not among the metadata") as err:
        prepare_source("coco", official["files"][:2], root)
    assert KARPATHY_URL in str(err.value) and "all_official_images" in str(err.value)
    assert "\n" not in str(err.value)


def test_all_official_images_keeps_every_image_with_or_without_the_split_file(official, root):
    everything = prepare_source("coco", official["files"][:2], root, settings={"all_official_images": True})
    images, _ = _tables(everything)
    assert sorted(int(im["source_id"]) for im in images) == sorted(IMAGES) and everything.rejected == {}
    assert {im["karpathy_split"] for im in images} == {None}
    labelled = prepare_source("coco", official["files"], root, settings={"all_official_images": True})
    images, _ = _tables(labelled)
    assert {int(im["source_id"]): im["karpathy_split"] for im in images} == {i: s for i, (_, s) in IMAGES.items()}


def test_the_kept_splits_are_a_versioned_setting(official, root):
    default = prepare_source("coco", official["files"], root)
    train_only = prepare_source("coco", official["files"], root, settings={"karpathy_splits": ["train"]})
    images, _ = _tables(train_only)
    assert [int(im["source_id"]) for im in images] == [1] and train_only.version != default.version
    same = prepare_source("coco", official["files"], root, settings={"karpathy_splits": ["train", "restval"]})
    assert same.version == default.version  # the default, written out, is the same source


@pytest.mark.parametrize("settings, message", [
    ({"karpathy_split": ["train"]}, "unknown coco setting"),
    ({"karpathy_splits": ["training"]}, "karpathy_splits must be"),
    ({"all_official_images": "yes"}, "all_official_images must be true or false"),
])
def test_bad_settings_are_one_line_errors(official, root, settings, message):
    with pytest.raises(CCRKError, match=message) as err:
        prepare_source("coco", official["files"], root, settings=settings)
    assert "\n" not in str(err.value)


def test_settings_come_from_the_sources_config():
    config = {"sources": {"coco": {"settings": {"karpathy_splits": "train"}}, "vg": {}}}
    assert source_settings("coco", config) == {"karpathy_splits": ["train"], "all_official_images": False}
    assert source_settings("coco", config, {"all_official_images": True})["all_official_images"] is True
    assert source_settings("vg", config) == {}
    with pytest.raises(CCRKError, match="source vg has no settings"):
        source_settings("vg", config, {"karpathy_splits": ["train"]})


def test_demo_split_file_keeps_every_demo_coco_image(tmp_path, root):
    d = str(tmp_path / "corpus")
    generate_demo_corpus(d, n_train=40, n_heldout=4, image_px=32)
    coco = [p for p in write_demo_metadata(d, BASE)["coco"] if os.path.basename(p).startswith("captions_")]
    path = write_karpathy_split(coco)
    first = open(path, "rb").read()
    assert write_karpathy_split(coco) == path and open(path, "rb").read() == first  # byte-identical
    everything = prepare_source("coco", coco, root, settings={"all_official_images": True})
    split = prepare_source("coco", coco + [path], root)
    assert split.n_images == everything.n_images == 10 and split.rejected == {}
    images, _ = _tables(split)
    assert {im["split"]: im["karpathy_split"] for im in images} == {"train2017": "train", "val2017": "restval"}


def _jpeg(path: str, shade: int) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (shade, 40, 80)).save(buf, format="JPEG")
    with open(path, "wb") as f:
        f.write(buf.getvalue())


def test_ccrk_acquire_downloads_only_the_training_split(tmp_path):
    served = tmp_path / "served"
    for i in IMAGES:
        _jpeg(str(served / "images" / f"{i}.jpg"), 30 * i)
    root = str(tmp_path / "data")
    with serve(str(served)) as server:
        files = _official(tmp_path / "coco", server.url)["files"]
        args = ["acquire", "--source", "coco", "--root", root, "--image-size", "16", "--shard-size", "10",
                "--allow-address", server.address]
        for f in files:
            args += ["--metadata", f]
        assert ccrk(args) == 0
    art = Catalog(root).latest("source", "coco")
    images = pq.read_table(os.path.join(art.path, "images.parquet")).to_pylist()
    assert sorted(int(im["source_id"]) for im in images) == sorted(KEPT)
    assert art.stats["images_ok"] == 3 and art.stats["rejected"]["excluded_split"] == 3
    assert art.stats["rejected"]["not_in_split_file"] == 1
