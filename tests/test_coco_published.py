"""COCO en / ja / zh read from the published files (Karpathy's dataset_coco.json, STAIR Captions, COCO-CN),
built here in their exact layouts with real (tiny) images."""
import json
import os

import pytest
from PIL import Image

from ccrk.evaluation import coco
from ccrk.evaluation.benchmarks import CaptionCleaner
from storage.errors import CCRKError

TEST_IDS = list(range(100, 110))  # 10 test images: five folds of two
VAL_IDS = [200, 201, 202]
# (split, folder, COCO id) in file order: splits interleaved as in the real file.
KARPATHY = ([("train", "train2014", 300)] + [("test", "val2014", i) for i in TEST_IDS[:5]]
            + [("restval", "val2014", 400)] + [("test", "val2014", i) for i in TEST_IDS[5:]]
            + [("val", "val2014", i) for i in VAL_IDS] + [("train", "train2014", 301), ("restval", "val2014", 401)])


def _name(folder: str, cocoid: int) -> str:
    return f"COCO_{folder}_{cocoid:012d}"


def _en_captions(cocoid: int) -> list[str]:
    if cocoid == 100:
        return ["A Dog, running!", "?!"]  # pre_caption: "a dog running", and one it empties
    return [f"english {cocoid} first", f"english {cocoid} second"]


def _write_karpathy(path) -> None:
    images = []
    for imgid, (split, folder, cocoid) in enumerate(KARPATHY):
        sentences = [{"tokens": raw.lower().split(), "raw": raw, "imgid": imgid, "sentid": 10 * imgid + j}
                     for j, raw in enumerate(_en_captions(cocoid))]
        images.append({"filepath": folder, "sentids": [s["sentid"] for s in sentences],
                       "filename": _name(folder, cocoid) + ".jpg", "imgid": imgid, "split": split,
                       "sentences": sentences, "cocoid": cocoid})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"images": images, "dataset": "coco"}))


def _write_stair(folder, name: str, ids: list[int]) -> None:
    # Annotations interleaved across images (as in the real files), plus an image outside the Karpathy split.
    annotations = []
    for j in range(2):
        for cocoid in ids + [999]:
            annotations.append({"image_id": cocoid, "id": len(annotations) + 1, "caption": f"写真{cocoid}の{j}",
                                "tokenized_caption": f"写真 {cocoid} の {j}"})
    images = [{"id": cocoid, "file_name": f"{cocoid}.jpg"} for cocoid in ids]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(json.dumps({"images": images, "annotations": annotations}, ensure_ascii=False))


COCOCN_LISTS = {"test": [_name("val2014", 105), _name("train2014", 300)],
                "val": [_name("val2014", 201)],
                "train": [_name("train2014", 301), _name("val2014", 401)]}


def _write_cococn(folder) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for split, names in COCOCN_LISTS.items():
        (folder / f"coco-cn_{split}.txt").write_text("".join(n + "\n" for n in names))
    lines = [f"{_name('val2014', 105)}#0\t一只狗在跑", f"{_name('train2014', 301)}#0\t三个甜甜圈",
             f"{_name('train2014', 300)}#0\t一个男人", f"{_name('val2014', 105)}#1\t草地上的狗",
             f"{_name('val2014', 201)}#0\t一间卧室", f"{_name('val2014', 401)}#0\t雨天的街道"]
    (folder / "imageid.human-written-caption.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


@pytest.fixture
def published(tmp_path):
    _write_karpathy(tmp_path / "karpathy" / "dataset_coco.json")
    val_ids = [c for _, folder, c in KARPATHY if folder == "val2014"]
    _write_stair(tmp_path / "stair", "stair_captions_v1.2_val.json", val_ids)
    _write_stair(tmp_path / "stair", "stair_captions_v1.2_train.json", [300, 301])
    _write_cococn(tmp_path / "coco-cn-version1805v1.1")
    for _, folder, cocoid in KARPATHY:
        (tmp_path / "images" / folder).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (4, 4), (cocoid % 256, 0, 0)).save(tmp_path / "images" / folder / f"{_name(folder, cocoid)}.jpg")
    return tmp_path


def test_find_published_names_each_language_file(published, tmp_path_factory):
    found = coco.find_published(str(published))
    assert found == {"en": str(published / "karpathy" / "dataset_coco.json"), "ja": str(published / "stair"),
                     "zh": str(published / "coco-cn-version1805v1.1")}
    assert coco.find_published(str(tmp_path_factory.mktemp("empty"))) is None


def test_karpathy_split_and_ids(published):
    path = str(published / "karpathy" / "dataset_coco.json")
    splits = coco.karpathy_split(path)
    assert {k: [img["cocoid"] for img in v] for k, v in splits.items()} == {
        "train": [300, 301], "test": TEST_IDS, "restval": [400, 401], "val": VAL_IDS}
    assert coco.karpathy_ids(path, ("train", "restval")) == {300, 301, 400, 401}
    assert coco.karpathy_ids(path, ["val", "test"]) == set(VAL_IDS) | set(TEST_IDS)


def test_en_test_is_five_folds_of_consecutive_test_images(published):
    bench = coco.load_published(str(published), langs=["en"])
    folds = bench.sets["en"]
    assert [s.fold for s in folds] == [0, 1, 2, 3, 4]
    assert [s.image_ids for s in folds] == [[str(100 + 2 * k), str(101 + 2 * k)] for k in range(5)]
    assert folds[1].texts == ["english 102 first", "english 102 second", "english 103 first", "english 103 second"]
    assert folds[1].text_keys[:2] == ["102#0", "102#1"]
    assert list(folds[1].text_image) == [0, 0, 1, 1]
    assert folds[0].texts[0] == "A Dog, running!"
    assert folds[4].images[1].path == os.path.join(str(published / "images"), "val2014", _name("val2014", 109) + ".jpg")


def test_val_is_one_unfolded_set(published):
    bench = coco.load_published(str(published), langs=["en", "ja", "zh"], split="val")
    assert [len(bench.sets[lang]) for lang in ("en", "ja", "zh")] == [1, 1, 1]
    assert bench.sets["en"][0].fold is None
    assert bench.sets["en"][0].image_ids == ["200", "201", "202"]
    assert bench.sets["ja"][0].texts[:2] == ["写真200の0", "写真200の1"]
    assert bench.sets["zh"][0].image_ids == ["201"]


def test_ja_takes_stair_captions_by_coco_id_in_file_order(published):
    folds = coco.load_published(str(published), langs=["ja"]).sets["ja"]
    assert [s.image_ids for s in folds] == [[str(100 + 2 * k), str(101 + 2 * k)] for k in range(5)]
    assert folds[2].texts == ["写真104の0", "写真104の1", "写真105の0", "写真105の1"]
    assert folds[2].source == str(published / "stair" / "stair_captions_v1.2_val.json")


def test_ja_test_needs_only_the_val_file_and_train_names_the_train_file(published):
    os.remove(published / "stair" / "stair_captions_v1.2_train.json")
    assert len(coco.load_published(str(published), langs=["ja"]).sets["ja"]) == 5
    with pytest.raises(CCRKError, match="stair_captions_v1.2_train.json") as err:
        coco.load_published_train(str(published), "ja")
    assert "\n" not in str(err.value)


def test_zh_test_is_cococn_test_list_as_one_set(published):
    sets = coco.load_published(str(published), langs=["zh"]).sets["zh"]
    assert len(sets) == 1 and sets[0].fold is None
    zh = sets[0]
    assert zh.image_ids == ["105", "300"]
    assert zh.texts == ["一只狗在跑", "草地上的狗", "一个男人"]
    assert zh.text_keys == ["105#0", "105#1", "300#0"]
    images = str(published / "images")
    assert [ref.path for ref in zh.images] == [os.path.join(images, "val2014", _name("val2014", 105) + ".jpg"),
                                              os.path.join(images, "train2014", _name("train2014", 300) + ".jpg")]


def test_default_langs_are_those_found(published):
    assert coco.load_published(str(published)).langs == ("en", "ja", "zh")


def test_train_is_train_plus_restval_only(published):
    pairs, skipped = coco.load_published_train(str(published), "en")
    assert skipped == 0
    assert [p.image_id for p in pairs[::2]] == ["300", "400", "301", "401"]
    assert pairs[2].caption == "english 400 first"
    ja, _ = coco.load_published_train(str(published), "ja")
    assert [(p.image_id, p.caption) for p in ja[:3]] == [("300", "写真300の0"), ("300", "写真300の1"),
                                                         ("400", "写真400の0")]
    zh, _ = coco.load_published_train(str(published), "zh")
    assert [(p.image_id, p.caption) for p in zh] == [("301", "三个甜甜圈"), ("401", "雨天的街道")]
    assert zh[0].image.path.endswith(os.path.join("train2014", _name("train2014", 301) + ".jpg"))


def test_train_clean_applies_pre_caption(published):
    pairs, _ = coco.load_published_train(str(published), "en", clean=CaptionCleaner(max_words=2))
    assert pairs[0].caption == "english 300"


def test_max_words_normalises_and_counts_emptied_captions(published):
    fold0 = coco.load_published(str(published), langs=["en"], max_words=30).sets["en"][0]
    assert fold0.texts[0] == "a dog running"
    assert fold0.text_keys[:2] == ["100#0", "101#0"]
    assert fold0.rejected_texts == 1
    assert coco.load_published(str(published), langs=["en"], max_words=2).sets["en"][1].texts[0] == "english 102"


def test_missing_image_is_an_error_or_a_counted_skip(published):
    os.remove(published / "images" / "val2014" / f"{_name('val2014', 102)}.jpg")
    with pytest.raises(CCRKError, match=_name("val2014", 102)) as err:
        coco.load_published(str(published), langs=["en"])
    assert "\n" not in str(err.value)
    folds = coco.load_published(str(published), langs=["en", "ja"], skip_missing=True).sets
    assert folds["en"][1].image_ids == ["103"] and folds["en"][1].skipped_images == 1
    assert folds["ja"][1].skipped_images == 1 and folds["en"][0].skipped_images == 0
    os.remove(published / "images" / "train2014" / f"{_name('train2014', 301)}.jpg")
    with pytest.raises(CCRKError, match=_name("train2014", 301)):
        coco.load_published_train(str(published), "zh")
    pairs, skipped = coco.load_published_train(str(published), "zh", skip_missing=True)
    assert skipped == 1 and [p.image_id for p in pairs] == ["401"]


@pytest.mark.parametrize("lang, gone, expected", [
    ("en", "karpathy/dataset_coco.json", "dataset_coco.json"),
    ("ja", "stair/stair_captions_v1.2_val.json", "stair_captions_v1.2_val.json"),
    ("zh", "coco-cn-version1805v1.1/imageid.human-written-caption.txt", "imageid.human-written-caption.txt"),
    ("zh", "coco-cn-version1805v1.1/coco-cn_test.txt", "coco-cn_test.txt"),
])
def test_absent_language_file_is_a_one_line_error_naming_it(published, lang, gone, expected):
    os.remove(published / gone)
    with pytest.raises(CCRKError, match=expected) as err:
        coco.load_published(str(published), langs=[lang])
    assert "\n" not in str(err.value)


def test_malformed_inputs_are_one_line_errors(published):
    errors = []
    with pytest.raises(CCRKError) as err:
        coco.load_published(str(published), split="train")
    errors.append(err.value)
    with pytest.raises(CCRKError, match="unknown COCO language") as err:
        coco.load_published(str(published), langs=["fr"])
    errors.append(err.value)
    with open(published / "coco-cn-version1805v1.1" / "coco-cn_test.txt", "a") as f:
        f.write("000000000105.jpg\n")
    with pytest.raises(CCRKError, match="coco-cn_test.txt:3") as err:
        coco.load_published(str(published), langs=["zh"])
    errors.append(err.value)
    _write_stair(published / "stair", "stair_captions_v1.2_val.json", [100])
    with pytest.raises(CCRKError, match="no caption for COCO id 101") as err:
        coco.load_published(str(published), langs=["ja"])
    errors.append(err.value)
    assert all("\n" not in str(e) for e in errors)
