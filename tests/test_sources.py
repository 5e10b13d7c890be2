"""Source adapters: the official formats read into images + captions tables; bad records counted, never fatal."""
import json
import os

import pyarrow.parquet as pq
import pytest

from storage.catalog import Catalog
from storage.demo.corpus import demo_archives, generate_demo_corpus, load_manifest, write_demo_metadata
from storage.errors import CCRKError
from storage.sources import DEFAULT_SOURCES, catalog_fields, default_metadata, prepare_source
from storage.stage import Outcome, StagePlan, run_stage

BASE = "http://127.0.0.1:8124"


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("demo"))
    generate_demo_corpus(d, n_train=40, n_heldout=10, image_px=64)
    return {"dir": d, "manifest": load_manifest(d), "paths": write_demo_metadata(d, BASE),
            "archives": demo_archives(d)}


def _tables(prepared):
    return pq.read_table(prepared.images_path).to_pylist(), pq.read_table(prepared.captions_path).to_pylist()


def _manifest_by_url(demo):
    return {f"{BASE}/{im['file']}": im for im in demo["manifest"]["images"]}


def _write(path, data: bytes | str):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
    return str(path)


# --------------------------------------------------------------------------- each official format


def test_cc3m_reads_train_and_validation_tsv_with_one_caption_per_image(demo, root):
    p = prepare_source("cc3m", demo["paths"]["cc3m"], root)
    images, captions = _tables(p)
    truth = _manifest_by_url(demo)
    assert p.n_images == len(images) == 10 and p.n_captions == 10 and p.rejected == {}
    assert {im["split"] for im in images} == {"train", "validation"}
    by_key = {im["image_key"]: im for im in images}
    for c in captions:
        assert c["caption"] == truth[by_key[c["image_key"]]["url"]]["captions"][0]["en"]
    assert all(im["image_key"] == f"cc3m-{im['source_id']}" and im["source"] == "cc3m" for im in images)


@pytest.mark.parametrize("variant", ["json", "txt"])
def test_sbu_reads_either_official_layout(demo, root, variant):
    files = demo["paths"]["sbu"][:1] if variant == "json" else demo["paths"]["sbu"][1:]
    p = prepare_source("sbu", files, root)
    images, captions = _tables(p)
    truth = _manifest_by_url(demo)
    assert p.n_images == 10 and p.n_captions == 10 and p.rejected == {}
    by_key = {im["image_key"]: im for im in images}
    assert all(c["caption"] == truth[by_key[c["image_key"]]["url"]]["captions"][0]["en"] for c in captions)
    assert all((im["user_id"] is not None) == (variant == "json") for im in images)


def test_sbu_layouts_give_the_same_image_keys(demo, root):
    a, _ = _tables(prepare_source("sbu", demo["paths"]["sbu"][:1], root))
    b, _ = _tables(prepare_source("sbu", demo["paths"]["sbu"][1:], root))
    assert [im["image_key"] for im in a] == [im["image_key"] for im in b]


def test_vg_captions_are_region_phrases_with_their_boxes(demo, root):
    p = prepare_source("vg", demo["paths"]["vg"], root)
    images, captions = _tables(p)
    truth = _manifest_by_url(demo)
    assert p.n_images == 10 and p.rejected == {}
    assert p.n_captions == sum(len(truth[im["url"]]["objects"]) for im in images)
    by_key = {im["image_key"]: im for im in images}
    for c in captions:
        boxes = [(o["box"]["x"], o["box"]["y"], o["box"]["w"], o["box"]["h"])
                 for o in truth[by_key[c["image_key"]]["url"]]["objects"]]
        assert (c["x"], c["y"], c["w"], c["h"]) in boxes
        assert c["caption_id"] == f"vg-{c['region_id']}"
    assert all(im["width"] == 64 and im["height"] == 64 for im in images)


def test_coco_image_appears_once_with_all_its_captions(demo, root):
    p = prepare_source("coco", demo["paths"]["coco"], root)
    images, captions = _tables(p)
    assert p.n_images == len(images) == 10 and p.n_captions == 30 and p.rejected == {}
    assert len({im["image_key"] for im in images}) == 10
    per_image = {}
    for c in captions:
        per_image[c["image_key"]] = per_image.get(c["image_key"], 0) + 1
    assert set(per_image.values()) == {3}
    assert {im["split"] for im in images} == {"train2017", "val2017"}
    assert all(c["caption_id"] == f"coco-{c['annotation_id']}" for c in captions)


@pytest.mark.parametrize("source,variant", [("cc3m", 0), ("sbu", 0), ("sbu", 1), ("vg", 0), ("coco", 0)])
def test_official_archive_gives_the_same_version_as_the_plain_files(demo, root, source, variant):
    files = demo["paths"][source]
    archives = demo["archives"][source]
    if source == "sbu":  # archive 0 ships the json, archive 1 the urls/captions txt pair
        files, archives = (files[:1], archives[:1]) if variant == 0 else (files[1:], archives[1:])
    plain = prepare_source(source, files, root)
    packed = prepare_source(source, archives, root)
    assert packed.version == plain.version and packed.n_images == plain.n_images == 10


def test_image_keys_are_dot_free_and_safe(demo, root):
    for source in DEFAULT_SOURCES:  # the ones the demo corpus publishes
        files = demo["paths"][source][:1] if source == "sbu" else demo["paths"][source]
        images, captions = _tables(prepare_source(source, files, root))
        for key in [im["image_key"] for im in images] + [c["caption_id"] for c in captions]:
            assert key.replace("-", "").replace("_", "").isalnum(), key


# --------------------------------------------------------------------------- versioning and the catalog


def test_prepare_is_idempotent_and_does_not_reparse(demo, root):
    first = prepare_source("coco", demo["paths"]["coco"], root)
    stamp = os.stat(first.images_path).st_mtime_ns
    again = prepare_source("coco", demo["paths"]["coco"], root)
    assert again == first and os.stat(first.images_path).st_mtime_ns == stamp


def test_partial_version_directory_is_redone(demo, root):
    first = prepare_source("coco", demo["paths"]["coco"], root)
    os.unlink(os.path.join(first.directory, "source.json"))  # killed before the commit marker
    again = prepare_source("coco", demo["paths"]["coco"], root)
    assert again.n_images == 10 and os.path.exists(os.path.join(first.directory, "source.json"))


def test_version_follows_content_limit_and_download_params(demo, root, tmp_path):
    base = prepare_source("cc3m", demo["paths"]["cc3m"], root).version
    assert prepare_source("cc3m", demo["paths"]["cc3m"], root, limit=3).version != base
    assert prepare_source("cc3m", demo["paths"]["cc3m"], root, download_params={"image_size": 64}).version != base
    copies = [_write(tmp_path / os.path.basename(f), open(f, "rb").read()) for f in demo["paths"]["cc3m"]]
    assert prepare_source("cc3m", copies, root).version == base  # paths do not matter, bytes do
    with open(copies[0], "a", encoding="utf-8") as f:
        f.write(f"one more caption\t{BASE}/images/extra.jpg\n")
    assert prepare_source("cc3m", copies, root).version != base


def test_limit_keeps_the_first_n_images_with_all_their_captions(demo, root):
    full_images, full_captions = _tables(prepare_source("coco", demo["paths"]["coco"], root))
    p = prepare_source("coco", demo["paths"]["coco"], root, limit=4)
    images, captions = _tables(p)
    assert [im["image_key"] for im in images] == [im["image_key"] for im in full_images[:4]]
    assert len(captions) == 12 and {c["image_key"] for c in captions} == {im["image_key"] for im in images}


def test_limit_applies_to_region_sources_too(demo, root):
    p = prepare_source("vg", demo["paths"]["vg"], root, limit=3)
    images, captions = _tables(p)
    assert p.n_images == 3 and {c["image_key"] for c in captions} == {im["image_key"] for im in images}


def test_limit_stops_reading_a_long_tsv_early(demo, root):
    p = prepare_source("cc3m", demo["paths"]["cc3m"], root, limit=2)
    assert p.n_images == 2 and p.rows_read == 2


class _SourceStage:
    """The acquire stage's catalog entry without its download: what run_stage records of a source."""

    def __init__(self, prepared, stats):
        self.prepared, self.stats = prepared, stats

    def plan(self):
        params, _ = catalog_fields(self.prepared)
        return StagePlan("source", self.prepared.source, self.prepared.version, self.prepared.directory, params)

    def completed(self, plan):
        return None

    def execute(self, plan):
        return Outcome({}, catalog_fields(self.prepared, self.stats)[1])

    def publish(self, plan, summary):
        pass


def test_the_source_enters_the_catalog_through_run_stage(demo, root):
    p = prepare_source("vg", demo["paths"]["vg"], root)
    run_stage(_SourceStage(p, {"images_ok": 9}), root)
    art = Catalog(root).latest("source", "vg")
    assert art.version == p.version and art.path == p.directory
    assert art.stats["images_ok"] == 9 and art.stats["n_images"] == 10
    assert art.params["metadata_sha256"] == p.metadata_sha256


def test_source_json_describes_the_version(demo, root):
    p = prepare_source("sbu", demo["paths"]["sbu"][:1], root)
    meta = json.load(open(os.path.join(p.directory, "source.json")))
    assert meta["version"] == p.version and meta["metadata_sha256"] == p.metadata_sha256
    assert meta["n_images"] == 10 and meta["rows_read"] == 10


def test_default_metadata_are_the_official_urls():
    expected_hosts = {"cc3m": {"storage.googleapis.com"}, "sbu": {"www.cs.rice.edu"},
                      "vg": {"homes.cs.washington.edu"}, "coco": {"images.cocodataset.org", "cs.stanford.edu"}}
    for source, hosts in expected_hosts.items():
        urls = default_metadata(source)
        assert urls and {u.split("/")[2] for u in urls} == hosts
    assert [u.rsplit("/", 1)[1] for u in default_metadata("coco")] == ["annotations_trainval2017.zip",
                                                                       "caption_datasets.zip"]


# --------------------------------------------------------------------------- bad records: counted, skipped


def _cc3m(tmp_path, root, body: bytes | str, **kw):
    return prepare_source("cc3m", [_write(tmp_path / "Train_GCC-training.tsv", body)], root, **kw)


def test_cc3m_row_with_missing_or_extra_columns_is_malformed(tmp_path, root):
    p = _cc3m(tmp_path, root, f"good one\t{BASE}/a.jpg\nno url column\nthree\tcolumns\there\n\n"
                              f"fine again\t{BASE}/b.jpg\n")
    assert p.rejected == {"malformed_row": 3} and p.n_images == 2 and p.rows_read == 5


def test_blank_caption_is_rejected(tmp_path, root):
    p = _cc3m(tmp_path, root, f"   \t{BASE}/a.jpg\n\t{BASE}/b.jpg\nok\t{BASE}/c.jpg\n")
    assert p.rejected == {"blank_caption": 2} and p.n_images == 1


def test_control_characters_in_captions_are_replaced_and_counted(tmp_path, root):
    """NUL, a colour escape and a terminal-title sequence in CC3M captions: each caption is kept with
    the sequences replaced by spaces (counted as control_characters, with its place); one that is
    nothing but control characters is blank."""
    import pandas as pd

    p = _cc3m(tmp_path, root, f"a red\x00 circle\t{BASE}/a.jpg\n\x1b[31ma blue\x1b[0m square\t{BASE}/b.jpg\n"
                              f"\x1b]0;owned\x07two stars\t{BASE}/c.jpg\n\x1b[2J\x07\t{BASE}/d.jpg\nplain\t{BASE}/e.jpg\n")
    captions = pd.read_parquet(p.captions_path)["caption"].tolist()
    assert captions == ["a red circle", "a blue square", "two stars", "plain"]
    assert p.fixed == {"control_characters": 3} and p.rejected == {"blank_caption": 1}
    assert p.rejected_examples["control_characters"] == [f"Train_GCC-training.tsv line {n}" for n in (1, 2, 3)]


def test_invalid_utf8_line_is_rejected_and_the_rest_of_the_file_is_read(tmp_path, root):
    body = f"before\t{BASE}/a.jpg\n".encode() + b"caf\xe9 latin-1\t" + f"{BASE}/b.jpg\n".encode() + \
        "after, with ünïcödé\t".encode() + f"{BASE}/c.jpg\n".encode()
    p = _cc3m(tmp_path, root, body)
    _, captions = _tables(p)
    assert p.rejected == {"invalid_utf8": 1}
    assert [c["caption"] for c in captions] == ["before", "after, with ünïcödé"]


def test_overlong_caption_is_rejected_and_the_limit_is_configurable(tmp_path, root):
    body = f"{'x' * 1001}\t{BASE}/a.jpg\n{'y' * 1000}\t{BASE}/b.jpg\n{'z' * 30}\t{BASE}/c.jpg\n"
    assert _cc3m(tmp_path, root, body).rejected == {"overlong_caption": 1}
    assert _cc3m(tmp_path, root, body, max_caption_chars=20).rejected == {"overlong_caption": 3}


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://example.com/a.jpg", "javascript:alert(1)",
                                 "data:image/png;base64,AAAA", "example.com/a.jpg", "//example.com/a.jpg",
                                 "http:///no-host.jpg", "gopher://example.com/a"])
def test_url_whose_scheme_is_not_http_or_https_is_rejected(tmp_path, root, url):
    p = _cc3m(tmp_path, root, f"bad\t{url}\ngood\thttps://example.com/ok.jpg\n")
    images, _ = _tables(p)
    assert p.rejected == {"bad_url_scheme": 1}
    assert [im["url"] for im in images] == ["https://example.com/ok.jpg"]


def test_same_url_twice_is_one_image_with_both_captions(tmp_path, root):
    p = _cc3m(tmp_path, root, f"first caption\t{BASE}/a.jpg\nsecond caption\t{BASE}/a.jpg\n")
    images, captions = _tables(p)
    assert len(images) == 1 and [c["caption"] for c in captions] == ["first caption", "second caption"]
    assert {c["image_key"] for c in captions} == {images[0]["image_key"]}


def test_same_url_and_caption_twice_is_a_duplicate(tmp_path, root):
    p = _cc3m(tmp_path, root, f"same\t{BASE}/a.jpg\nsame\t{BASE}/a.jpg\n")
    assert p.rejected == {"duplicate_id": 1} and p.n_captions == 1


def test_sbu_unequal_parallel_lists_make_the_unpaired_records_malformed(tmp_path, root):
    js = _write(tmp_path / "sbu-captions-all.json", json.dumps(
        {"image_urls": [f"{BASE}/a.jpg", f"{BASE}/b.jpg", f"{BASE}/c.jpg"], "captions": ["a", "b"],
         "user_ids": ["u1", "u2", "u3"]}))
    p = prepare_source("sbu", [js], root)
    assert p.rejected == {"malformed_row": 1} and p.n_images == 2


def test_sbu_txt_pair_with_a_missing_caption_line_is_malformed(tmp_path, root):
    u = _write(tmp_path / "SBU_captioned_photo_dataset_urls.txt", f"{BASE}/a.jpg\n{BASE}/b.jpg\n")
    c = _write(tmp_path / "SBU_captioned_photo_dataset_captions.txt", "only one\n")
    p = prepare_source("sbu", [u, c], root)
    assert p.rejected == {"malformed_row": 1} and p.n_images == 1


def test_sbu_txt_line_with_invalid_utf8_is_rejected_alone(tmp_path, root):
    u = _write(tmp_path / "SBU_captioned_photo_dataset_urls.txt", f"{BASE}/a.jpg\n{BASE}/b.jpg\n{BASE}/c.jpg\n")
    c = _write(tmp_path / "SBU_captioned_photo_dataset_captions.txt", b"one\n\xc3\x28 broken\nthree\n")
    p = prepare_source("sbu", [u, c], root)
    _, captions = _tables(p)
    assert p.rejected == {"invalid_utf8": 1} and [c["caption"] for c in captions] == ["one", "three"]


def test_rejected_records_are_reported_with_file_and_line(tmp_path, root):
    p = _cc3m(tmp_path, root, f"ok\t{BASE}/a.jpg\nbroken line\n")
    assert p.rejected_examples == {"malformed_row": ["Train_GCC-training.tsv line 2"]}


def test_sbu_json_record_with_invalid_utf8_is_rejected_alone(tmp_path, root):
    body = b'{"image_urls": ["' + BASE.encode() + b'/a.jpg", "' + BASE.encode() + b'/b.jpg"], ' \
           b'"captions": ["bad \xff byte", "good"], "user_ids": ["u1", "u2"]}'
    p = prepare_source("sbu", [_write(tmp_path / "sbu-captions-all.json", body)], root)
    _, captions = _tables(p)
    assert p.rejected == {"invalid_utf8": 1} and [c["caption"] for c in captions] == ["good"]


def _coco(tmp_path, root, images, annotations, name="captions_train2017.json"):
    path = _write(tmp_path / "annotations" / name,
                  json.dumps({"info": {}, "licenses": [], "images": images, "annotations": annotations}))
    return prepare_source("coco", [path], root, settings={"all_official_images": True})  # no split file here


def _im(i, url=None):
    return {"id": i, "file_name": f"{i:012d}.jpg", "coco_url": url or f"{BASE}/{i}.jpg", "width": 8, "height": 8}


def test_coco_duplicate_image_id_keeps_the_first(tmp_path, root):
    p = _coco(tmp_path, root, [_im(1), _im(1, f"{BASE}/other.jpg")],
              [{"id": 10, "image_id": 1, "caption": "a cat"}])
    images, _ = _tables(p)
    assert p.rejected == {"duplicate_id": 1} and [im["url"] for im in images] == [f"{BASE}/1.jpg"]


def test_coco_duplicate_annotation_id_keeps_the_first(tmp_path, root):
    p = _coco(tmp_path, root, [_im(1)], [{"id": 10, "image_id": 1, "caption": "a cat"},
                                         {"id": 10, "image_id": 1, "caption": "a dog"}])
    _, captions = _tables(p)
    assert p.rejected == {"duplicate_id": 1} and [c["caption"] for c in captions] == ["a cat"]


def test_coco_records_with_wrong_types_are_malformed(tmp_path, root):
    p = _coco(tmp_path, root, [_im(1), {"id": "2", "coco_url": f"{BASE}/2.jpg"}, {"id": 3}, "not an object"],
              [{"id": 10, "image_id": 1, "caption": "ok"}, {"id": 11, "image_id": 1, "caption": 5},
               {"id": 12, "image_id": 1}, {"id": "13", "image_id": 1, "caption": "x"}])
    assert p.rejected == {"malformed_row": 6} and p.n_images == 1 and p.n_captions == 1


def test_coco_caption_for_an_unknown_image_is_an_orphan(tmp_path, root):
    p = _coco(tmp_path, root, [_im(1)], [{"id": 10, "image_id": 1, "caption": "ok"},
                                         {"id": 11, "image_id": 99, "caption": "whose?"}])
    assert p.rejected == {"orphan_caption": 1}


def test_captions_of_a_rejected_image_are_counted_with_it(tmp_path, root):
    p = _coco(tmp_path, root, [_im(1), _im(2, "javascript:alert(1)")],
              [{"id": 10, "image_id": 1, "caption": "ok"}, {"id": 11, "image_id": 2, "caption": "lost"}])
    assert p.rejected == {"bad_url_scheme": 1, "caption_of_rejected_image": 1} and p.n_images == 1


def test_image_without_any_valid_caption_is_dropped_and_counted(tmp_path, root):
    p = _coco(tmp_path, root, [_im(1), _im(2)], [{"id": 10, "image_id": 1, "caption": "ok"},
                                                 {"id": 11, "image_id": 2, "caption": "  "}])
    assert p.rejected == {"blank_caption": 1, "no_caption": 1} and p.n_images == 1


def test_vg_duplicate_region_id_and_malformed_regions(tmp_path, root):
    image_data = _write(tmp_path / "image_data.json", json.dumps(
        [{"image_id": 1, "url": f"{BASE}/1.jpg", "width": 10, "height": 10, "coco_id": None, "flickr_id": None},
         {"id": 2, "url": f"{BASE}/2.jpg", "width": 10, "height": 10}]))
    region = {"region_id": 5, "image_id": 1, "phrase": "a red ball", "x": 1, "y": 2, "width": 3, "height": 4}
    regions = _write(tmp_path / "region_descriptions.json", json.dumps(
        [{"id": 1, "regions": [region, dict(region, phrase="again"), dict(region, region_id=6, x="left"),
                               dict(region, region_id=7, phrase=None)]},
         {"id": 2, "regions": [dict(region, region_id=8, image_id=2, x=1.0)]},
         {"id": 3}]))
    p = prepare_source("vg", [image_data, regions], root)
    images, captions = _tables(p)
    assert p.rejected == {"duplicate_id": 1, "malformed_row": 3}
    assert [(c["caption_id"], c["x"]) for c in captions] == [("vg-5", 1), ("vg-8", 1)]
    assert [im["image_key"] for im in images] == ["vg-1", "vg-2"]


# --------------------------------------------------------------------------- unreadable metadata: fatal


def test_missing_metadata_file_is_a_clear_error(tmp_path, root):
    with pytest.raises(CCRKError, match="not found.*captions_train2017.json"):
        prepare_source("coco", [str(tmp_path / "captions_train2017.json")], root)


def test_metadata_that_is_not_json_is_a_clear_error(tmp_path, root):
    path = _write(tmp_path / "captions_train2017.json", "<html>not json</html>")
    with pytest.raises(CCRKError, match="captions_train2017.json is not valid JSON"):
        prepare_source("coco", [path], root, settings={"all_official_images": True})


@pytest.mark.parametrize("source,name,body", [
    ("coco", "captions_train2017.json", "[]"),
    ("coco", "captions_val2017.json", '{"images": []}'),
    ("vg", "image_data.json", '{"images": []}'),
    ("sbu", "sbu-captions-all.json", '{"captions": []}'),
])
def test_metadata_with_the_wrong_top_level_structure_is_a_clear_error(tmp_path, root, source, name, body):
    files = [_write(tmp_path / name, body)]
    if source == "vg":
        files.append(_write(tmp_path / "region_descriptions.json", "[]"))
    with pytest.raises(CCRKError, match=f"{name} has the wrong structure"):
        prepare_source(source, files, root, settings={"all_official_images": True} if source == "coco" else None)


def test_empty_metadata_is_a_clear_error(tmp_path, root):
    with pytest.raises(CCRKError, match="cc3m metadata holds no records: .*Train_GCC-training.tsv"):
        _cc3m(tmp_path, root, b"")


def test_files_of_another_format_are_a_clear_error(demo, root):
    with pytest.raises(CCRKError, match="no coco metadata"):
        prepare_source("coco", demo["paths"]["cc3m"], root)


def test_vg_needs_both_files(demo, root):
    with pytest.raises(CCRKError, match="region_descriptions.json is missing"):
        prepare_source("vg", demo["paths"]["vg"][:1], root)


def test_sbu_urls_file_without_its_captions_file_is_a_clear_error(demo, root):
    with pytest.raises(CCRKError, match="no line-aligned captions file"):
        prepare_source("sbu", demo["paths"]["sbu"][1:2], root)


def test_unknown_source_is_a_clear_error(root):
    with pytest.raises(CCRKError, match="unknown source 'flickr'"):
        prepare_source("flickr", [], root)


# --------------------------------------------------------------------------- streamed JSON arrays


@pytest.mark.parametrize("chunk", [1, 7, 1 << 20])
def test_a_json_array_streams_to_what_json_load_reads(tmp_path, monkeypatch, chunk):
    """Element by element, whatever the read size cuts through (numbers, strings, escapes, nesting),
    with a BOM, odd whitespace and bytes that are not UTF-8 kept as surrogates as read_json keeps them."""
    from storage.sources import base

    data = [{"id": 12345, "regions": [{"phrase": "a \"red\" ☃ circle\n", "x": -1.5e3}]}, 7, 123456789,
            "text", [], {}, None, True, [1, [2, [3]]], 0.25]
    body = b"\xef\xbb\xbf \n[ " + b" ,\n ".join(json.dumps(d).encode() for d in data) + b" ,\"caf\xe9\" ]\n"
    path = _write(tmp_path / "a.json", body)
    monkeypatch.setattr(base, "_JSON_CHUNK", chunk)
    assert list(base.iter_json_array(path, "X", "a list")) == base.read_json(path, "X")


@pytest.mark.parametrize("body, problem", [(b'{"a": 1}', "it is not a JSON array"), (b"", "it is not a JSON array"),
                                           (b'[{"a": 1}, {"b"', "not valid JSON"), (b'[1, 2', "ends inside"),
                                           (b'[1 2]', "',' or ']'"), (b'[1, oops]', "not valid JSON")])
def test_a_file_that_is_no_json_array_is_one_line_naming_it(tmp_path, body, problem):
    from storage.sources.base import iter_json_array

    path = _write(tmp_path / "image_data.json", body)
    with pytest.raises(CCRKError, match=problem) as err:
        list(iter_json_array(path, "Visual Genome", "a list of images"))
    assert "image_data.json" in str(err.value) and "\n" not in str(err.value)


def test_visual_genome_is_read_in_bounded_memory(tmp_path):
    """A 25 MB region file: json.load would hold several times that; streamed, the reader's peak is
    about its buffer and one entry (tracemalloc, Python allocations)."""
    import tracemalloc

    from storage.sources.base import iter_json_array

    entry = {"id": 1, "regions": [{"region_id": r, "image_id": 1, "phrase": "a red circle on the left",
                                   "x": 1, "y": 2, "width": 3, "height": 4} for r in range(100)]}
    path = tmp_path / "region_descriptions.json"
    with open(path, "w") as f:
        f.write("[" + ",".join(json.dumps({**entry, "id": i}) for i in range(2500)) + "]")
    size = os.path.getsize(path)
    assert size > 20_000_000
    tracemalloc.start()
    n = sum(len(e["regions"]) for e in iter_json_array(str(path), "Visual Genome", "a list"))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert n == 250_000 and peak < size / 4, (peak, size)
