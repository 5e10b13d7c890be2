"""The demo corpus: deterministic synthetic images, a truthful manifest, the four official metadata formats."""
import csv
import json
import os
import shutil
import tarfile
import zipfile

import pytest
from PIL import Image

from storage.demo import grammar
from storage.demo.corpus import (MANIFEST, demo_archives, generate_demo_corpus, load_manifest,
                                 write_demo_metadata)

BASE = "http://127.0.0.1:8123"


def _build(d, seed=0, base=BASE):
    generate_demo_corpus(str(d), seed=seed, n_train=40, n_heldout=10, image_px=96)
    paths = write_demo_metadata(str(d), base)
    archives = demo_archives(str(d))
    return paths, archives


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("demo")
    paths, archives = _build(d)
    return str(d), load_manifest(str(d)), paths, archives


def _all_files(d):
    out = {}
    for dirpath, _, names in os.walk(d):
        for n in names:
            p = os.path.join(dirpath, n)
            with open(p, "rb") as f:
                out[os.path.relpath(p, d)] = f.read()
    return out


def test_same_seed_gives_byte_identical_files(tmp_path, corpus):
    _build(tmp_path / "again")
    assert _all_files(tmp_path / "again") == _all_files(corpus[0])


def test_different_seed_gives_different_images(tmp_path, corpus):
    generate_demo_corpus(str(tmp_path), seed=1, n_train=40, n_heldout=10, image_px=96)
    other = load_manifest(str(tmp_path))
    assert [im["objects"] for im in other["images"]] != [im["objects"] for im in corpus[1]["images"]]


def test_second_generation_with_same_parameters_is_skipped(tmp_path):
    first = generate_demo_corpus(str(tmp_path), n_train=8, n_heldout=2, image_px=64)
    mtime = os.stat(tmp_path / MANIFEST).st_mtime_ns
    second = generate_demo_corpus(str(tmp_path), n_train=8, n_heldout=2, image_px=64)
    assert (first["skipped"], second["skipped"]) == (False, True)
    assert os.stat(tmp_path / MANIFEST).st_mtime_ns == mtime
    third = generate_demo_corpus(str(tmp_path), n_train=12, n_heldout=2, image_px=64)
    assert third["skipped"] is False and third["n_train"] == 12


def test_train_split_is_dealt_evenly_over_the_four_sources_and_heldout_is_separate(corpus):
    images = corpus[1]["images"]
    train = [im for im in images if im["split"] == "train"]
    heldout = [im for im in images if im["split"] == "heldout"]
    assert len(train) == 40 and len(heldout) == 10
    assert {s: sum(im["source"] == s for im in train) for s in ("cc3m", "sbu", "vg", "coco")} == \
        {"cc3m": 10, "sbu": 10, "vg": 10, "coco": 10}
    assert {im["source"] for im in heldout} == {"heldout"}
    assert len({im["id"] for im in images}) == 50


def test_every_image_has_three_captions_in_all_five_languages(corpus):
    for im in corpus[1]["images"]:
        assert len(im["captions"]) == 3
        assert len({c["en"] for c in im["captions"]}) == 3
        for cap in im["captions"]:
            assert set(cap) == set(grammar.LANGS) and all(cap.values())


def test_captions_describe_the_scene_objects(corpus):
    for im in corpus[1]["images"]:
        named = {(o["color"], o["shape"]) for o in im["objects"]}
        for cap in im["captions"]:
            mentioned = {(c, s) for c in grammar.COLORS for s in grammar.SHAPES if f"{c} {s}" in cap["en"]}
            assert mentioned and mentioned <= named, (cap["en"], named)


def test_object_is_drawn_in_its_colour_inside_its_box_and_region(corpus):
    d, manifest, _, _ = corpus
    singles = [im for im in manifest["images"] if len(im["objects"]) == 1]
    assert len(singles) >= 5
    for im in singles:
        (o,) = im["objects"]
        b = o["box"]
        side = im["width"]
        assert 0 <= b["x"] and b["x"] + b["w"] <= side and 0 <= b["y"] and b["y"] + b["h"] <= side
        assert b["w"] == round({"small": 0.22, "large": 0.45}[o["size"]] * side)
        cx, cy = b["x"] + b["w"] / 2, b["y"] + b["h"] / 2
        expected_region = {"left": cx < side * 0.4, "right": cx > side * 0.6, "top": cy < side * 0.4,
                           "bottom": cy > side * 0.6,
                           "center": abs(cx - side / 2) < side * 0.1 and abs(cy - side / 2) < side * 0.1}
        assert expected_region[o["position"]], (o, b)
        pixel = Image.open(os.path.join(d, im["file"])).convert("RGB").getpixel((int(cx), int(cy + b["h"] * 0.1)))
        assert max(abs(p - q) for p, q in zip(pixel, grammar.RGB[o["color"]])) < 60, (o, pixel)


def test_images_are_jpeg_of_the_requested_size(corpus):
    d, manifest, _, _ = corpus
    sizes = set()
    for im in manifest["images"][:10]:
        with Image.open(os.path.join(d, im["file"])) as img:
            assert img.format == "JPEG" and img.size == (96, 96)
        sizes.add(os.path.getsize(os.path.join(d, im["file"])))
    assert len(sizes) > 5  # noisy backgrounds: file sizes vary like real photos


def test_cc3m_tsv_is_caption_tab_url_without_header_with_a_validation_file(corpus):
    d, manifest, paths, _ = corpus
    train, val = paths["cc3m"]
    assert os.path.basename(train) == "Train_GCC-training.tsv"
    assert os.path.basename(val) == "Validation_GCC-1.1.0-Validation.tsv"
    rows = []
    for p in (train, val):
        with open(p, encoding="utf-8", newline="") as f:
            rows += list(csv.reader(f, delimiter="\t"))
    assert all(len(r) == 2 for r in rows)
    assert len(rows) == 10 and 1 <= sum(1 for _ in open(val)) <= 2
    ids = {im["id"]: im for im in manifest["images"]}
    for caption, url in rows:
        im = ids[url.rsplit("/", 1)[1][:-4]]
        assert url == f"{BASE}/images/{im['id']}.jpg" and im["source"] == "cc3m"
        assert caption == im["captions"][0]["en"]


def test_sbu_json_and_line_aligned_txt_pair_hold_the_same_records(corpus):
    _, _, paths, _ = corpus
    js, urls_txt, caps_txt = paths["sbu"]
    data = json.load(open(js, encoding="utf-8"))
    assert set(data) == {"image_urls", "captions", "user_ids"}
    assert len(data["image_urls"]) == len(data["captions"]) == len(data["user_ids"]) == 10
    assert open(urls_txt, encoding="utf-8").read().splitlines() == data["image_urls"]
    assert open(caps_txt, encoding="utf-8").read().splitlines() == data["captions"]


def test_vg_regions_carry_each_objects_phrase_and_pixel_box(corpus):
    _, manifest, paths, _ = corpus
    image_data, regions = (json.load(open(p)) for p in paths["vg"])
    by_url = {f"{BASE}/{im['file']}": im for im in manifest["images"]}
    assert len(image_data) == 10
    assert set(image_data[0]) == {"image_id", "url", "width", "height", "coco_id", "flickr_id"}
    vg_ids = {e["image_id"]: by_url[e["url"]] for e in image_data}
    for entry in regions:
        im = vg_ids[entry["id"]]
        assert len(entry["regions"]) == len(im["objects"])
        for r, o in zip(entry["regions"], im["objects"]):
            assert (r["x"], r["y"], r["width"], r["height"]) == (o["box"]["x"], o["box"]["y"], o["box"]["w"], o["box"]["h"])
            assert f"{o['color']} {o['shape']}" in r["phrase"] and o["size"] in r["phrase"]
    region_ids = [r["region_id"] for e in regions for r in e["regions"]]
    assert len(region_ids) == len(set(region_ids))


def test_coco_captions_files_have_three_captions_per_image_and_a_val_split(corpus):
    _, _, paths, _ = corpus
    train, val = (json.load(open(p)) for p in paths["coco"][:2])
    assert [os.path.basename(p) for p in paths["coco"]] == ["captions_train2017.json", "captions_val2017.json",
                                                            "dataset_coco.json"]
    assert len(train["images"]) + len(val["images"]) == 10 and len(val["images"]) >= 1
    for split in (train, val):
        assert {"info", "licenses", "images", "annotations"} <= set(split)
        ids = [im["id"] for im in split["images"]]
        per_image = {i: sum(a["image_id"] == i for a in split["annotations"]) for i in ids}
        assert set(per_image.values()) == {3}
        assert all(im["coco_url"].startswith(BASE + "/images/") for im in split["images"])


def test_metadata_bytes_depend_only_on_the_base_url(tmp_path, corpus):
    d, _, paths, _ = corpus
    shutil.copy(os.path.join(d, MANIFEST), tmp_path / MANIFEST)
    same = write_demo_metadata(str(tmp_path), BASE)
    for source in paths:
        for mine, theirs in zip(paths[source], same[source]):
            assert open(mine, "rb").read() == open(theirs, "rb").read()
    moved = write_demo_metadata(str(tmp_path), "http://127.0.0.1:9999")
    assert open(moved["coco"][0], "rb").read() != open(paths["coco"][0], "rb").read()
    assert b"127.0.0.1:9999/images/" in open(moved["cc3m"][0], "rb").read()


def test_archives_use_the_official_member_names(corpus):
    _, _, _, archives = corpus
    with zipfile.ZipFile(archives["coco"][0]) as zf:
        assert sorted(zf.namelist()) == ["annotations/captions_train2017.json", "annotations/captions_val2017.json"]
    assert [os.path.basename(p) for p in archives["vg"]] == ["image_data.json.zip", "region_descriptions.json.zip"]
    with tarfile.open(archives["sbu"][1]) as tf:
        assert sorted(tf.getnames()) == ["dataset/SBU_captioned_photo_dataset_captions.txt",
                                         "dataset/SBU_captioned_photo_dataset_urls.txt"]
