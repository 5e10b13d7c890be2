"""WIT from its published files: IGLUE's annotation lines and the Kaggle pixel files (headerless
``image_url<TAB>b64_bytes<TAB>metadata_url``, plain or gzipped, in parts), joined by image_url."""
import base64
import gzip
import io
import json
import os

import pytest
from PIL import Image

from ccrk.evaluation import benchmarks as bm
from ccrk.evaluation import wit
from storage.errors import CCRKError

COMMONS = "https://upload.wikimedia.org/wikipedia/commons"
MAP = f"{COMMONS}/6/6e/Map_of_Texas_highlighting_Concho_County.svg"
DRIVE = f"{COMMONS}/3/33/311_South_Wacker_Drive_060528.jpg"
HERRERA = f"{COMMONS}/3/38/Luis_Herrera.jpg"
UNWANTED = f"{COMMONS}/e/ec/Hovden.jpg"
LOST = f"{COMMONS}/0/00/Nowhere.jpg"
COLOURS = {MAP: (200, 10, 10), DRIVE: (10, 200, 10), HERRERA: (10, 10, 200), UNWANTED: (255, 255, 255)}


def _b64(colour) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), colour).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _row(url: str, caption: str, lang: str, idx: int) -> dict:
    """A line in IGLUE's WIT layout (datasets/wit/annotations/test_<lang>.jsonl)."""
    name = url.rsplit("/", 1)[1]
    return {"image_idx": idx, "image_url": url, "meta_url": f"http://commons.wikimedia.org/wiki/File:{name}",
            "caption_reference_description": caption, "language": lang,
            "page_url": f"https://{lang}.wikipedia.org/wiki/{name}", "wit_ix": f"wit-test_{idx}"}


def _jsonl(path, rows) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    return str(path)


def _pixel_line(url: str) -> str:
    return f"{url}\t{_b64(COLOURS[url])}\thttps://commons.wikimedia.org/wiki/File:{url.rsplit('/', 1)[1]}\n"


@pytest.fixture
def pixels(tmp_path) -> str:
    """Part 0 plain (a wanted image, a malformed line, an unwanted image), part 1 gzipped (two wanted)."""
    d = tmp_path / "image_data_test" / "image_pixels"
    d.mkdir(parents=True)
    with open(d / "test_image_pixels_part-00000.csv", "w") as f:
        f.write(_pixel_line(MAP) + "a line without any tab\n" + _pixel_line(UNWANTED))
    with gzip.open(d / "test_image_pixels_part-00001.csv.gz", "wt") as f:
        f.write(_pixel_line(DRIVE) + _pixel_line(HERRERA))
    (d / "README.txt").write_text("not a pixel file")
    return str(d)


@pytest.fixture
def wit_dir(tmp_path) -> str:
    d = tmp_path / "wit"
    _jsonl(d / "annotations" / "test_en.jsonl", [
        _row(DRIVE, "311 South Wacker Drive in Chicago", "en", 3),
        _row(MAP, "Location within the U.S. state of Texas", "en", 20),
        _row(MAP, "Concho County on the map", "en", 20)])
    _jsonl(d / "annotations" / "test_ja.jsonl", [
        _row(HERRERA, "ルイス・エレラ", "ja", 7), _row(MAP, "郡のテキサス州内の位置", "ja", 20)])
    return str(d)


def _colour(ref: bm.ImageRef):
    return ref.open().getpixel((0, 0))


def test_captions_are_grouped_per_image_and_each_image_is_its_urls(wit_dir, pixels):
    bench = wit.load_wit_joined(wit_dir, pixels)
    assert bench.langs == ("en", "ja")
    en, ja = bench.sets["en"][0], bench.sets["ja"][0]
    assert en.image_ids == [DRIVE, MAP] and ja.image_ids == [HERRERA, MAP]
    assert en.texts == ["311 South Wacker Drive in Chicago", "Location within the U.S. state of Texas",
                        "Concho County on the map"]
    assert en.text_image.tolist() == [0, 1, 1]
    assert en.images[1].key == ja.images[1].key == f"wit:{MAP}"
    assert [_colour(r) for r in en.images] == [COLOURS[DRIVE], COLOURS[MAP]]
    assert [_colour(r) for r in ja.images] == [COLOURS[HERRERA], COLOURS[MAP]]
    assert bench.skipped_images == 0


def test_an_image_content_already_in_a_line_wins_and_needs_no_pixel_file(tmp_path, pixels):
    yellow = _b64((250, 250, 0))
    _jsonl(tmp_path / "d" / "test_en.jsonl", [{**_row(MAP, "map", "en", 20), "image_content": yellow},
                                              {**_row(LOST, "lost", "en", 1), "image_content": yellow}])
    rset = wit.load_wit_joined(str(tmp_path / "d"), pixels).sets["en"][0]
    assert rset.image_ids == [MAP, LOST] and [_colour(r) for r in rset.images] == [(250, 250, 0)] * 2


def test_an_image_in_no_pixel_file_is_a_one_line_error_naming_it(wit_dir, pixels):
    _jsonl(os.path.join(wit_dir, "annotations", "test_ja.jsonl"), [_row(LOST, "どこにもない", "ja", 1),
                                                                   _row(MAP, "地図", "ja", 20)])
    with pytest.raises(CCRKError) as err:
        wit.load_wit_joined(wit_dir, pixels)
    assert LOST in str(err.value) and "1 image(s)" in str(err.value) and "\n" not in str(err.value)


def test_with_skip_missing_an_image_in_no_pixel_file_is_a_counted_skip(wit_dir, pixels):
    _jsonl(os.path.join(wit_dir, "annotations", "test_ja.jsonl"), [_row(LOST, "どこにもない", "ja", 1),
                                                                   _row(MAP, "地図", "ja", 20)])
    bench = wit.load_wit_joined(wit_dir, pixels, skip_missing=True)
    ja = bench.sets["ja"][0]
    assert ja.image_ids == [MAP] and ja.skipped_images == 1 and ja.skipped_texts == 1
    assert bench.skipped_images == 1 and len(bench.sets["en"][0]) == 2


def test_the_scan_keeps_only_wanted_urls_and_stops_once_all_are_found(pixels):
    files = wit.pixel_files(pixels)
    found, lines = wit.collect_images(files, {MAP})
    assert list(found) == [MAP] and lines == 1
    opened = []
    found, lines = wit.collect_images(files, {MAP, DRIVE}, progress=opened.append)
    assert set(found) == {MAP, DRIVE} and UNWANTED not in found
    assert lines == 4 and opened == files  # 3 lines of part 0 (one malformed) + the first of part 1


def test_the_scan_reads_every_line_when_a_url_is_nowhere(pixels):
    found, lines = wit.collect_images(wit.pixel_files(pixels), {HERRERA, LOST})
    assert list(found) == [HERRERA] and lines == 5
    assert _colour(bm.ImageRef(key="k", b64=found[HERRERA])) == COLOURS[HERRERA]


def test_pixel_files_are_a_file_or_a_folders_parts_in_order(pixels, tmp_path):
    parts = [os.path.join(pixels, "test_image_pixels_part-00000.csv"),
             os.path.join(pixels, "test_image_pixels_part-00001.csv.gz")]
    assert wit.pixel_files(pixels) == parts
    assert wit.pixel_files(os.path.dirname(pixels)) == parts  # image_data_test/ stands for its image_pixels/
    assert wit.pixel_files(parts[1]) == [parts[1]]
    for bad in (str(tmp_path / "absent"), str(tmp_path / "wit-empty")):
        os.makedirs(tmp_path / "wit-empty", exist_ok=True)
        with pytest.raises(CCRKError) as err:
            wit.pixel_files(bad)
        assert bad in str(err.value) and "\n" not in str(err.value)


def test_the_converter_writes_files_the_joined_reader_reads(wit_dir, pixels, tmp_path):
    ann = os.path.join(wit_dir, "annotations")
    en = os.path.join(ann, "test_en.jsonl")
    ja = _jsonl(os.path.join(ann, "test_ja.jsonl"), [_row(HERRERA, "ルイス・エレラ", "ja", 7),
                                                     _row(LOST, "どこにもない", "ja", 1)])
    out = tmp_path / "annotations-bs64"
    counts = wit.join_files([en, ja], pixels, str(out))
    assert counts == {"test_en.jsonl": {"lines": 3, "joined": 3, "missing": 0},
                      "test_ja.jsonl": {"lines": 2, "joined": 1, "missing": 1}}
    assert sorted(os.listdir(out)) == ["test_en.jsonl", "test_ja.jsonl"]  # no temporary left behind
    rset = bm.read_wit_file(str(out / "test_en.jsonl"), "en")
    assert rset.image_ids == [DRIVE, MAP] and [_colour(r) for r in rset.images] == [COLOURS[DRIVE], COLOURS[MAP]]
    lines = [json.loads(line) for line in (out / "test_ja.jsonl").read_text(encoding="utf-8").splitlines()]
    assert lines[1] == _row(LOST, "どこにもない", "ja", 1)  # kept as published, without image_content
    assert {k: v for k, v in lines[0].items() if k != "image_content"} == _row(HERRERA, "ルイス・エレラ", "ja", 7)
    assert bm.read_wit_file(str(out / "test_ja.jsonl"), "ja", skip_missing=True).skipped_images == 1


def test_training_pairs_take_their_images_from_the_pixel_files(tmp_path, pixels):
    rows = [_row(MAP, "A map of Texas", "en", 1), _row(DRIVE, "", "en", 2), _row(HERRERA, "Luis Herrera", "en", 3),
            _row(MAP, "Concho", "en", 4)]
    path = _jsonl(tmp_path / "train_en.jsonl", rows)
    pairs, skipped = wit.load_wit_joined_train(path, pixels)
    assert skipped == 0
    assert [(p.caption, p.image_id) for p in pairs] == [("A map of Texas", MAP), ("Luis Herrera", HERRERA),
                                                        ("Concho", MAP)]
    assert [_colour(p.image) for p in pairs] == [COLOURS[MAP], COLOURS[HERRERA], COLOURS[MAP]]
    assert pairs[0].image.key == f"wit:{MAP}"


def test_a_training_image_in_no_pixel_file_is_an_error_or_a_counted_skip(tmp_path, pixels):
    path = _jsonl(tmp_path / "val_en.jsonl", [_row(LOST, "nowhere", "en", 1), _row(MAP, "map", "en", 2)])
    with pytest.raises(CCRKError) as err:
        wit.load_wit_joined_train(path, pixels)
    assert LOST in str(err.value) and path in str(err.value) and "\n" not in str(err.value)
    pairs, skipped = wit.load_wit_joined_train(path, pixels, skip_missing=True)
    assert [p.image_id for p in pairs] == [MAP] and skipped == 1


def test_the_split_picks_the_annotation_files(tmp_path, pixels):
    _jsonl(tmp_path / "wit" / "val_en.jsonl", [_row(HERRERA, "Luis Herrera", "en", 3)])
    bench = wit.load_wit_joined(str(tmp_path / "wit"), pixels, split="val")
    assert bench.langs == ("en",) and bench.sets["en"][0].image_ids == [HERRERA]
