"""Evaluation images never reach pre-training: a build with benchmarks configured drops exactly their
images -- by COCO id, by Visual Genome's coco_id / flickr_id, by an SBU Flickr url, by url, by the
downloaded bytes (sha256) and as a resized, re-encoded copy (pHash) -- counts them per benchmark and
kind of match, and keeps every other picture. Sources are acquired for real (img2dataset from a
loopback server); the pictures are photo-like (1/f noise), so perceptual hashes behave as on photos."""
import base64
import glob
import io
import json
import os
import random

import duckdb
import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from ccrk.app.cli import main as ccrk
from ccrk.evaluation.exclusion import evaluation_images, ids_from_name, make_exclusion
from storage.demo.server import serve
from storage.errors import CCRKError
from storage.exclusion import (content_box, hamming, match_exclusions, normalize_urls, phash_bytes, phash_image,
                               read_exclusion_list, stored_phash, url_identities)
from storage.specs import BuildSpec

DISTANCE = BuildSpec().exclude_phash_distance


def photo(seed: int, width: int = 320, height: int = 240) -> Image.Image:
    """A photo-like picture: each channel a random field with a 1/f amplitude spectrum, as natural images have."""
    rng = np.random.default_rng(seed)
    fy, fx = np.fft.fftfreq(height)[:, None], np.fft.rfftfreq(width)[None, :]
    f = np.sqrt(fx ** 2 + fy ** 2)
    f[0, 0] = 1.0
    channels = []
    for _ in range(3):
        x = np.fft.irfft2((rng.normal(size=f.shape) + 1j * rng.normal(size=f.shape)) / f ** 1.1, s=(height, width))
        channels.append((x - x.mean()) / x.std())
    return Image.fromarray(np.clip(np.stack(channels, -1) * 45 + 128, 0, 255).astype(np.uint8), "RGB")


def jpeg(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def copy_of(data: bytes, scale: float, quality: int) -> bytes:
    """A resized, re-encoded copy of an image (as a web crawl finds one)."""
    img = Image.open(io.BytesIO(data)).convert("RGB")
    return jpeg(img.resize((int(img.width * scale), int(img.height * scale)), Image.Resampling.LANCZOS), quality)


def as_stored(data: bytes, side: int = 256) -> tuple[bytes, dict]:
    """What img2dataset's border mode stores (scaled to fit, padded to a square) and its json."""
    img = Image.open(io.BytesIO(data)).convert("RGB")
    s = side / max(img.size)
    small = img.resize((round(img.width * s), round(img.height * s)), Image.Resampling.BICUBIC)
    out = Image.new("RGB", (side, side), (0, 0, 0))
    out.paste(small, ((side - small.width) // 2, (side - small.height) // 2))
    return jpeg(out, 95), {"original_width": img.width, "original_height": img.height}


# ---------------------------------------------------------------------------- the perceptual hash


def test_phash_finds_resized_reencoded_copies_and_keeps_distinct_pictures_apart():
    originals = [jpeg(photo(seed)) for seed in range(12)]
    hashes = [phash_bytes(o) for o in originals]
    apart = [hamming(a, b) for i, a in enumerate(hashes) for b in hashes[i + 1:]]
    assert min(apart) > 2 * DISTANCE  # 66 pairs of distinct pictures: none near the threshold
    for original, h in zip(originals, hashes):
        for scale, quality in ((0.5, 60), (0.7, 80), (1.0, 40)):
            stored, meta = as_stored(copy_of(original, scale, quality))
            assert hamming(stored_phash(stored, meta), h) <= DISTANCE
    # The padding is cut off by the original size img2dataset records; hashed whole, a copy is farther.
    stored, meta = as_stored(originals[0])
    assert content_box(256, 256, 320, 240) == (0, 32, 256, 224)
    assert hamming(stored_phash(stored, meta), hashes[0]) < hamming(stored_phash(stored, {}), hashes[0])


def test_a_centre_cropped_image_is_hashed_whole():
    """Same size as a border-padded one, but no flat margins: nothing is cut off."""
    img = photo(3, 256, 256)
    assert phash_image(Image.open(io.BytesIO(jpeg(img)))) == \
        stored_phash(jpeg(img), {"original_width": 320, "original_height": 240})


def test_pigeonhole_index_finds_every_pair_within_the_distance():
    rng = random.Random(0)
    bench = [rng.getrandbits(64) for _ in range(40)]
    near = []
    for i, h in enumerate(bench):  # copies at 0 .. 10 differing bits
        bits = rng.sample(range(64), i % 11)
        near.append(h ^ sum(1 << b for b in bits))
    src = near + [rng.getrandbits(64) for _ in range(400)]
    for distance in (0, 3, 8, 12):
        con = duckdb.connect()
        con.register("ident_v", pa.table({"source": ["s"] * len(src), "image_key": [f"k{i}" for i in range(len(src))],
                                          "kind": ["phash"] * len(src), "value": [f"{h:016x}" for h in src]}))
        con.execute("CREATE TEMP TABLE ident AS SELECT * FROM ident_v")
        lists = pa.table({"benchmark": ["b"] * len(bench), "split": ["test"] * len(bench),
                          "kind": ["phash"] * len(bench), "value": [f"{h:016x}" for h in bench]})
        match_exclusions(con, lists, ["phash"], distance)
        found = {r[0] for r in con.execute("SELECT image_key FROM excluded").fetchall()}
        brute = {f"k{i}" for i, h in enumerate(src) if any(hamming(h, b) <= distance for b in bench)}
        assert found == brute and len(found) >= 40 * (min(distance, 10) + 1) // 11


# ---------------------------------------------------------------------------- urls and names


def test_ids_come_from_coco_and_flickr_urls_and_file_names():
    urls = ["http://static.flickr.com/2723/4385058960_b0f291553e.jpg",
            "https://farm4.staticflickr.com/3102/2903004286_1c1c4f3c06_z.jpg",
            "http://images.cocodataset.org/val2014/COCO_val2014_000000391895.jpg",
            "http://images.cocodataset.org/train2017/000000000042.jpg",
            "https://Example.org/a/B.jpg#x", None]
    found = url_identities(pa.array(urls, pa.string()))
    assert found["flickr_id"].to_pylist() == ["4385058960", "2903004286", None, None, None, None]
    assert found["coco_id"].to_pylist() == [None, None, "391895", "42", None, None]
    assert found["url"].to_pylist()[4] == "example.org/a/b.jpg"
    assert normalize_urls(pa.array(["http://www.x.org/p/", "HTTPS://x.org/p"])).to_pylist() == ["x.org/p", "x.org/p"]
    assert ids_from_name("COCO_val2014_000000391895.jpg") == [("coco_id", "391895")]
    assert ids_from_name("val2014/COCO_val2014_000000000042.jpg") == [("coco_id", "42")]
    assert ids_from_name("1000092795.jpg") == [("flickr_id", "1000092795")]
    assert ids_from_name("22439193117_4183a49ec2.jpg") == [("flickr_id", "22439193117")]
    assert ids_from_name("demo00412.jpg") == []


# ---------------------------------------------------------------------------- a real build


# The benchmark (xFlickr&CO layout): image file name -> how a source holds it.
BENCH = {
    "COCO_val2014_000000000042.jpg": "coco source, id 42 (another picture)",
    "COCO_val2014_000000000077.jpg": "vg coco_id 77",
    "2000000003.jpg": "vg flickr_id",
    "3000000004.jpg": "sbu Flickr url (not downloadable: matched by id)",
    "2000000001.jpg": "sbu, the same bytes under another url",
    "2000000002.jpg": "sbu, resized and re-encoded",
    "2000000005.jpg": "in no source",
}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    d = tmp_path_factory.mktemp("exclusion")
    root, web, bench, wit_dir = str(d / "data"), d / "web", d / "bench", d / "wit"
    for sub in ("images", "meta"):
        (web / sub).mkdir(parents=True)
    (bench / "flickr").mkdir(parents=True)
    (bench / "coco").mkdir()
    seeds = iter(range(100, 200))
    pictures = {}
    for name in BENCH:
        pictures[name] = jpeg(photo(next(seeds)))
        folder = bench / ("coco" if name.startswith("COCO") else "flickr")
        if name != "2000000005.jpg":  # its file is missing: listed, ids only
            (folder / name).write_bytes(pictures[name])
    for lang in ("en", "de"):
        (bench / "annotations" / lang).mkdir(parents=True)
        (bench / "annotations" / lang / "test.jsonl").write_text("".join(
            json.dumps({"sentences": [f"{lang} caption {i}"], "id": str(i), "img_path": n}) + "\n"
            for i, n in enumerate(BENCH)))

    def serve_file(name: str, data: bytes) -> str:
        (web / "images" / name).write_bytes(data)
        return name

    kept = {}  # image_key prefix -> file of a distinct picture that must stay
    for i in range(6):
        kept[f"keep{i}"] = serve_file(f"keep{i}.jpg", jpeg(photo(next(seeds), 300, 300 if i % 2 else 200)))
    serve_file("coco42.jpg", jpeg(photo(next(seeds))))
    serve_file("vg77.jpg", jpeg(photo(next(seeds))))
    serve_file("vgflickr.jpg", jpeg(photo(next(seeds))))
    serve_file("same-bytes.jpg", pictures["2000000001.jpg"])
    serve_file("resized.jpg", copy_of(pictures["2000000002.jpg"], 0.6, 70))
    serve_file("wit-page.jpg", jpeg(photo(next(seeds))))
    with serve(str(web)) as server:
        url = lambda name: f"{server.url}/images/{name}"  # noqa: E731
        meta = web / "meta"
        (meta / "annotations").mkdir()
        (meta / "annotations" / "captions_train2017.json").write_text(json.dumps({
            "images": [{"id": 42, "coco_url": url("coco42.jpg"), "file_name": "000000000042.jpg"},
                       {"id": 43, "coco_url": url(kept["keep0"]), "file_name": "000000000043.jpg"}],
            "annotations": [{"id": 1, "image_id": 42, "caption": "a coco picture"},
                            {"id": 2, "image_id": 43, "caption": "another coco picture"}]}))
        (meta / "image_data.json").write_text(json.dumps([
            {"image_id": 1, "url": url("vg77.jpg"), "width": 320, "height": 240, "coco_id": 77, "flickr_id": None},
            {"image_id": 2, "url": url("vgflickr.jpg"), "width": 320, "height": 240, "coco_id": None,
             "flickr_id": 2000000003},
            {"image_id": 3, "url": url(kept["keep1"]), "width": 300, "height": 300, "coco_id": 43, "flickr_id": 5}]))
        (meta / "region_descriptions.json").write_text(json.dumps([
            {"id": k, "regions": [{"region_id": 10 + k, "image_id": k, "phrase": f"a region of image {k}",
                                   "x": 1, "y": 1, "width": 5, "height": 5}]} for k in (1, 2, 3)]))
        wit_url = url("wit-page.jpg")
        sbu = [("an sbu picture", "http://static.flickr.com/2723/3000000004_b0f291553e.jpg"),
               ("a copy", url("same-bytes.jpg")), ("a smaller copy", url("resized.jpg")), ("a wiki picture", wit_url),
               ("another sbu picture", url(kept["keep2"])), ("one more", url(kept["keep3"])),
               ("and one", url(kept["keep4"])), ("the last", url(kept["keep5"]))]
        (meta / "sbu-captions-all.json").write_text(json.dumps({
            "image_urls": [u for _, u in sbu], "captions": [c for c, _ in sbu],
            "user_ids": [f"{i}@N0{i}" for i in range(len(sbu))]}))
        # Karpathy's split file, or the COCO source keeps nothing (42 and 43: train images)
        (meta / "dataset_coco.json").write_text(json.dumps({"images": [
            {"split": "train", "cocoid": c, "filepath": "train2014", "filename": f"COCO_train2014_{c:012d}.jpg",
             "sentences": [{"raw": "x"}]} for c in (42, 43)]}))
        files = {"coco": [meta / "annotations" / "captions_train2017.json", meta / "dataset_coco.json"],
                 "vg": [meta / "image_data.json", meta / "region_descriptions.json"],
                 "sbu": [meta / "sbu-captions-all.json"]}
        for source, paths in files.items():
            args = ["acquire", "--source", source, "--root", root, "--image-size", "64", "--timeout", "3",
                    "--allow-address", server.address]
            for p in paths:
                args += ["--metadata", str(p)]
            assert ccrk(args) == 0
    # WIT: annotations with the image's url (another scheme and case), pixels in a Kaggle-style file.
    wit_dir.mkdir()
    wit_url = wit_url.replace("http://", "HTTPS://")  # one image whatever the scheme's spelling
    (wit_dir / "test_en.jsonl").write_text(json.dumps({"image_url": wit_url, "caption_reference_description": "w"})
                                           + "\n")
    b64 = base64.b64encode((web / "images" / "wit-page.jpg").read_bytes()).decode()
    (wit_dir / "pixels.csv").write_text(f"{wit_url}\t{b64}\tx\n")
    return {"root": root, "bench": bench, "wit": wit_dir, "kept": kept}


def _manifest(path: str, sql: str):
    con = duckdb.connect(os.path.join(path, "manifest.duckdb"), read_only=True)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


@pytest.mark.slow
def test_a_build_drops_exactly_the_benchmarks_images_and_counts_them(built, capsys):
    root, bench = built["root"], built["bench"]
    wit = make_exclusion(root, {"benchmark": "wit", "data": str(built["wit"]), "images": str(built["wit"] / "pixels.csv")})
    assert (wit["n_images"], wit["missing"]) == (1, 0) and wit["by_kind"]["url"] == 1
    args = ["build", "--root", root, "--name", "clean", "--sources", "coco,vg,sbu", "--langs", "en",
            "--exclude-benchmark", "xflickrco", "--benchmark-data", str(bench), "--benchmark-images",
            str(bench / "flickr"), "--benchmark-coco-images", str(bench / "coco"), "--exclude", wit["version"]]
    assert ccrk(args) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "benchmark overlap" in out and "7 evaluation images (1 without their file" in out
    (path,) = glob.glob(os.path.join(root, "datasets", "clean", "*"))
    overlap = {(b, k): n for b, k, n in _manifest(path, "SELECT * FROM benchmark_overlap")}
    assert overlap == {("xflickrco", "coco_id"): 2, ("xflickrco", "flickr_id"): 2, ("xflickrco", "url"): 0,
                       ("xflickrco", "sha256"): 1, ("xflickrco", "phash"): 1,
                       ("wit", "coco_id"): 0, ("wit", "flickr_id"): 0, ("wit", "url"): 1, ("wit", "sha256"): 0,
                       ("wit", "phash"): 0}
    dropped = {(s, b, k) for s, _, b, k in _manifest(
        path, "SELECT source, image_key, benchmark, kind FROM benchmark_overlap_images")}
    assert dropped == {("coco", "xflickrco", "coco_id"), ("vg", "xflickrco", "coco_id"), ("vg", "xflickrco", "flickr_id"),
                       ("sbu", "xflickrco", "flickr_id"), ("sbu", "xflickrco", "sha256"), ("sbu", "xflickrco", "phash"),
                       ("sbu", "wit", "url")}
    drops = {(u, r): c for u, r, _, c in _manifest(path, "SELECT * FROM drops")}
    assert drops[("image", "benchmark_overlap")] == 7 and drops[("caption", "benchmark_overlap")] == 7
    assert ("image", "no_image") not in drops  # the SBU Flickr url failed to download: counted as overlap only
    urls = {u.rsplit("/", 1)[-1] for (u,) in _manifest(path, "SELECT url FROM samples")}
    assert urls == {f"{k}.jpg" for k in built["kept"]}  # every distinct picture kept: no false match
    from storage.manifest import summary
    s = summary(path)
    assert s["benchmark_overlap"] == {"wit": 1, "xflickrco": 6} and s["lang_counts"] == {1: 6}


@pytest.mark.slow
def test_the_exclusion_is_in_the_version_and_a_rebuild_is_a_noop(built):
    from flows.build import build_flow

    root, bench = built["root"], built["bench"]
    base = {"name": "v", "sources": ["coco", "vg", "sbu"], "langs": ["en"]}
    plain = build_flow(base, root=root)
    entry = {"benchmark": "xflickrco", "data": str(bench), "images": str(bench / "flickr"),
             "coco_images": str(bench / "coco")}
    clean = build_flow({**base, "exclude": [entry]}, root=root)
    assert plain["version"] != clean["version"] and plain["benchmark_overlap"] == {}
    assert (plain["n_samples"], clean["n_samples"]) == (12, 7)  # the SBU Flickr url never downloads
    again = build_flow({**base, "exclude": [entry]}, root=root)
    assert again["skipped"] and again["version"] == clean["version"] and again["exclusion_lists"][0]["skipped"]
    ids_only = build_flow({**base, "exclude": [entry], "exclude_kinds": ["id"]}, root=root)
    assert ids_only["benchmark_overlap"] == {"xflickrco": 4} and ids_only["n_samples"] == 9
    listed = read_exclusion_list(again["exclusion_lists"][0]["list"])
    assert set(listed.column("split").to_pylist()) == {"test"}
    images = evaluation_images("xflickrco", str(bench), str(bench / "flickr"), str(bench / "coco"))
    assert len(images) == len(BENCH)  # one per image, whatever the number of languages


def test_an_entry_or_list_that_is_not_one_is_a_clear_error(root, tmp_path):
    from storage.build_resolve import resolve_exclusions

    with pytest.raises(CCRKError, match="no exclusion list there"):
        resolve_exclusions(root, [str(tmp_path / "none.parquet")])
    with pytest.raises(CCRKError, match="'protocol' means the benchmarks"):
        resolve_exclusions(root, ["protocol"])
    bad = tmp_path / "bad.parquet"
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"benchmark": ["b"], "split": ["t"], "kind": ["md5"], "value": ["x"]}), bad)
    with pytest.raises(CCRKError, match="unknown kind 'md5'"):
        read_exclusion_list(str(bad))
    with pytest.raises(CCRKError, match="no evaluation image listed|not found"):
        evaluation_images("xflickrco", str(tmp_path))
