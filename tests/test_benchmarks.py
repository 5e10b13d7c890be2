"""Benchmark loaders on small files written in the published layouts (IGLUE jsonl, CCLM json, WIT)."""
import base64
import io
import json
import os

import pytest
from PIL import Image

from ccrk.evaluation import benchmarks as bm
from storage.errors import CCRKError


def _jpeg(path, color=(200, 10, 10)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (8, 8), color).save(path, format="JPEG")


def _jsonl(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


@pytest.fixture
def xflickrco(tmp_path):
    """Two Flickr30K images and one COCO val2014 image, in en and de, like IGLUE's xFlickrCO."""
    data = tmp_path / "xFlickrCO"
    flickr, coco = tmp_path / "flickr30k-images", tmp_path / "val2014"
    for name in ("1007129816.jpg", "1009434119.jpg"):
        _jpeg(str(flickr / name))
    _jpeg(str(coco / "COCO_val2014_000000391895.jpg"))
    rows = {
        "en": ["The man wears an orange hat.", "A dog runs in a garden.", "A man rides a moped."],
        "de": ["Der Mann trägt eine orange Mütze.", "", "Ein Mann fährt Moped."],
    }
    for lang, sents in rows.items():
        _jsonl(str(data / "annotations" / lang / "test.jsonl"), [
            {"sentences": [sents[0]], "id": "1007129816", "img_path": "1007129816.jpg"},
            {"sentences": [sents[1]], "id": "1009434119", "img_path": "1009434119.jpg"},
            {"sentences": [sents[2]], "id": 391895, "img_path": "COCO_val2014_000000391895.jpg"},
        ])
    _jsonl(str(data / "annotations" / "de" / "train_1.jsonl"),
           [{"sentences": ["Ein Hund schläft."], "id": "1009434119", "img_path": "1009434119.jpg"}])
    return data, flickr, coco


def test_xflickrco_reads_every_language_and_resolves_coco_and_flickr_images(xflickrco):
    data, flickr, coco = xflickrco
    bench = bm.load_xflickrco(str(data), flickr30k_dir=str(flickr), coco_dir=str(coco))
    assert bench.langs == ("de", "en")
    en = bench.sets["en"][0]
    assert en.image_ids == ["1007129816", "1009434119", "391895"]
    assert en.images[2].path == os.path.join(str(coco), "COCO_val2014_000000391895.jpg")
    assert en.images[0].path == os.path.join(str(flickr), "1007129816.jpg")
    assert en.texts[1] == "A dog runs in a garden."
    assert en.text_image.tolist() == [0, 1, 2]
    assert en.images[2].open().size == (8, 8)


def test_xflickrco_drops_lines_whose_captions_are_all_empty(xflickrco):
    data, flickr, coco = xflickrco
    de = bm.load_xflickrco(str(data), ["de"], str(flickr), str(coco)).sets["de"][0]
    assert de.image_ids == ["1007129816", "391895"]
    assert de.text_keys == ["1007129816#0", "391895#0"]
    assert de.text_image.tolist() == [0, 1]
    assert de.skipped_texts == 1


def test_missing_image_is_an_error_naming_it_or_a_counted_skip(xflickrco):
    data, flickr, coco = xflickrco
    os.remove(flickr / "1009434119.jpg")
    with pytest.raises(CCRKError, match="1009434119.jpg.*not found"):
        bm.load_xflickrco(str(data), ["en"], str(flickr), str(coco))
    en = bm.load_xflickrco(str(data), ["en"], str(flickr), str(coco), skip_missing=True).sets["en"][0]
    assert en.image_ids == ["1007129816", "391895"]
    assert en.skipped_images == 1
    assert len(en.texts) == 2


def test_xflickrco_few_shot_training_file(xflickrco):
    data, flickr, coco = xflickrco
    path = bm.xflickrco_train_file(str(data), "de", shots=1)
    pairs, skipped = bm.load_xflickrco_train(path, str(flickr), str(coco))
    assert [(p.caption, p.image_id) for p in pairs] == [("Ein Hund schläft.", "1009434119")]
    assert skipped == 0
    with pytest.raises(CCRKError, match="train_5.jsonl"):
        bm.xflickrco_train_file(str(data), "de", shots=5)


def test_bad_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "annotations" / "en" / "test.jsonl"
    os.makedirs(path.parent)
    path.write_text('{"sentences": ["a"], "id": 1, "img_path": "1.jpg"}\n{broken\n')
    with pytest.raises(CCRKError, match=r"test.jsonl:2: not a JSON line"):
        bm.load_xflickrco(str(tmp_path), ["en"], skip_missing=True)


def _cclm_eval(n_images, captions_per_image=2, prefix="coco/val2014/COCO_val2014_"):
    return [{"image": f"{prefix}{i:012d}.jpg", "caption": [f"caption {i}.{j}" for j in range(captions_per_image)],
             "image_id": i} for i in range(n_images)]


def test_coco_en_is_five_folds_and_zh_one_set(tmp_path):
    images = tmp_path / "images"
    for i in range(12):
        _jpeg(str(images / f"coco/val2014/COCO_val2014_{i:012d}.jpg"))
    (tmp_path / "en.test.json").write_text(json.dumps(_cclm_eval(12)))
    (tmp_path / "zh.test.json").write_text(json.dumps(_cclm_eval(3, 1)))
    bench = bm.load_coco(str(tmp_path), ["en", "zh"], str(images))
    folds = bench.sets["en"]
    # 12 // 5 = 2 per fold; the last fold takes the remainder (as the reference does).
    assert [len(f) for f in folds] == [2, 2, 2, 2, 4]
    assert folds[1].image_ids == ["2", "3"]
    assert folds[4].texts[-1] == "caption 11.1"
    assert folds[4].text_image.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert [len(s) for s in bench.sets["zh"]] == [3]
    assert bm.default_k_test("coco") == 256 and bm.default_k_test("xflickrco") == 128


def test_multi30k_test_files_and_cclm_train_file(tmp_path):
    images = tmp_path / "images"
    for i in range(2):
        _jpeg(str(images / f"flickr30k-images/{i}.jpg"))
    for lang in ("en", "de"):
        (tmp_path / f"test_2016_flickr.{lang}.json").write_text(json.dumps(
            [{"image": f"flickr30k-images/{i}.jpg", "caption": [f"{lang} text {i}"], "image_id": i} for i in range(2)]))
    (tmp_path / "train.en.json").write_text(json.dumps(
        [{"image": "flickr30k-images/0.jpg", "caption": "a train caption", "image_id": 0},
         {"image": "flickr30k-images/9.jpg", "caption": "its image is missing", "image_id": 9}]))
    bench = bm.load_benchmark("multi30k", str(tmp_path), ["en", "de"])
    assert bench.sets["de"][0].texts == ["de text 0", "de text 1"]
    assert bench.sets["en"][0].text_keys == ["0#0", "1#0"]
    with pytest.raises(CCRKError, match="9.jpg not found"):
        bm.load_cclm_train(str(tmp_path / "train.en.json"), str(images))
    pairs, skipped = bm.load_cclm_train(str(tmp_path / "train.en.json"), str(images), skip_missing=True)
    assert [p.caption for p in pairs] == ["a train caption"] and skipped == 1


def test_wit_groups_captions_by_image_url_and_decodes_base64(tmp_path):
    buf = io.BytesIO()
    Image.new("RGB", (5, 4), (0, 0, 255)).save(buf, format="PNG")
    b64 = base64.b64encode(buf.getvalue()).decode()
    _jsonl(str(tmp_path / "test_en.jsonl"), [
        {"image_url": "u1", "caption_reference_description": "first", "language": "en", "image_content": b64},
        {"image_url": "u2", "caption_reference_description": "", "language": "en", "image_content": b64},
        {"image_url": "u1", "caption_reference_description": "second", "language": "en", "image_content": b64},
        {"image_url": "u3", "caption_reference_description": "no pixels", "language": "en"},
    ])
    with pytest.raises(CCRKError, match="u3.*not found"):
        bm.load_wit(str(tmp_path), ["en"])
    s = bm.load_wit(str(tmp_path), ["en"], skip_missing=True).sets["en"][0]
    assert s.image_ids == ["u1"]
    assert s.texts == ["first", "second"] and s.text_image.tolist() == [0, 0]
    assert s.skipped_images == 1
    assert s.images[0].open().size == (5, 4)


def test_unknown_benchmark_and_missing_folder(tmp_path):
    with pytest.raises(CCRKError, match="not found"):
        bm.load_benchmark("xflickrco", str(tmp_path / "nope"))
    with pytest.raises(CCRKError, match="unknown benchmark"):
        bm.load_benchmark("flickr8k", str(tmp_path))


def test_demo_benchmark_is_the_heldout_split_in_the_xflickrco_layout(tmp_path):
    from ccrk.evaluation.demo_benchmark import write_demo_benchmark
    from storage.demo.corpus import generate_demo_corpus, load_manifest

    corpus, out = str(tmp_path / "corpus"), str(tmp_path / "bench")
    generate_demo_corpus(corpus, seed=0, n_train=12, n_heldout=6, image_px=32)
    summary = write_demo_benchmark(corpus, out)
    assert summary["n_test_images"] == 6 and summary["few_shot"]["es"] == [1, 5, 10]
    heldout = [im for im in load_manifest(corpus)["images"] if im["split"] == "heldout"]

    bench = bm.load_benchmark("demo", out)  # through the real xFlickr&CO loader
    assert bench.langs == ("en", "es", "id", "ru", "tr")
    ru = bench.sets["ru"][0]
    assert ru.image_ids == [im["id"] for im in heldout]
    assert ru.texts[:3] == [c["ru"] for c in heldout[0]["captions"]]
    # Parallel captions: the same text keys in every language, so MRV can align instances.
    assert ru.text_keys == bench.sets["en"][0].text_keys
    pairs, _ = bm.load_xflickrco_train(bm.xflickrco_train_file(out, "tr", shots=5), os.path.join(out, "images"))
    assert len(pairs) == 5 and all(p.image.open().size == (32, 32) for p in pairs)
    assert write_demo_benchmark(corpus, out)["skipped"] is True
