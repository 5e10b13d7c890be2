"""Multi30K read from a small copy of github.com/multi30k/dataset's published layout:
data/task1/raw/<split>.<lang>.gz (one caption per line) aligned with data/task1/image_splits/<split>.txt."""
import gzip
import os

import pytest
from PIL import Image

from ccrk.evaluation import multi30k
from ccrk.evaluation.benchmarks import CaptionCleaner
from storage.errors import CCRKError

# Not in sorted order, so a loader that sorted names or files would mismatch captions and images.
TEST_IMAGES = ["1009434119.jpg", "1007129816.jpg", "22439193117_4183a49ec2.jpg"]
TEST_CAPTIONS = {
    "en": ["A Boston Terrier is running on lush green grass.", "A man in an orange hat starring at something.",
           "A sleek yellow dog mid run on a dirt area."],
    "de": ["Ein Boston Terrier läuft über saftig-grünes Gras.", "Ein Mann mit einem orangefarbenen Hut.",
           "Ein schlanker gelblicher Hund beim Laufen."],
    "fr": ["Un terrier de Boston court sur l'herbe.", "Un homme avec un chapeau orange.",
           "Un chien jaune court sur une piste en terre."],
    # The published Czech test_2018 lines end in a space: only the newline is the reader's to strip.
    "cs": ["Bostonský teriér běží po trávě. ", "Muž v oranžovém klobouku na něco zírá.", "Žlutý pes běží."],
}
COCO_IMAGES = ["COCO_val2014_000000398076.jpg#657409", "COCO_train2014_000000117071.jpg#367178"]
COCO_CAPTIONS = {
    "en": ["A woman is pointing at the camera", "I cannot see where the green arrow is pointing."],
    "de": ["Eine liegende Frau zeigt auf die Kamera", "Ich kann nicht sehen, wohin der grüne Pfeil zeigt."],
    "fr": ["Une femme pointe vers la caméra", "Je ne peux pas voir ce qu'indique la flèche verte."],
}
TRAIN_IMAGES = ["1000092795.jpg", "10002456.jpg"]
TRAIN_CAPTIONS = {"en": ["Two young, White males are outside.", "Several men in hard hats."],
                  "de": ["Zwei junge weiße Männer sind im Freien.", "Mehrere Männer mit Schutzhelmen."]}


def _gz(path, lines):
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.writelines(line + "\n" for line in lines)


def _split(task1, split, images, captions):
    (task1 / "image_splits" / f"{split}.txt").write_text("".join(name + "\n" for name in images))
    for lang, lines in captions.items():
        _gz(task1 / "raw" / f"{split}.{lang}.gz", lines)


@pytest.fixture
def repo(tmp_path):
    """The repository's root: data/task1/{raw,image_splits} and the images in <root>/images."""
    root = tmp_path / "dataset"
    task1 = root / "data" / "task1"
    (task1 / "raw").mkdir(parents=True)
    (task1 / "image_splits").mkdir()
    _split(task1, "test_2016_flickr", TEST_IMAGES, TEST_CAPTIONS)
    _split(task1, "test_2017_mscoco", COCO_IMAGES, COCO_CAPTIONS)
    _split(task1, "train", TRAIN_IMAGES, TRAIN_CAPTIONS)
    images = root / "images"
    images.mkdir()
    for i, name in enumerate(TEST_IMAGES + TRAIN_IMAGES):
        Image.new("RGB", (8, 8), (40 * i, 10, 200)).save(images / name, format="JPEG")
    for name in COCO_IMAGES:
        Image.new("RGB", (8, 8), (0, 90, 0)).save(images / name.split("#")[0], format="PNG")
    return root


def _by_image(rs):
    return {rs.image_ids[i]: text for text, i in zip(rs.texts, rs.text_image)}


def test_every_language_of_the_test_split_maps_each_caption_to_its_image(repo):
    bench = multi30k.load_raw(str(repo))
    assert bench.name == "multi30k" and bench.langs == ("en", "de", "fr", "cs")
    en, de, cs = bench.sets["en"][0], bench.sets["de"][0], bench.sets["cs"][0]
    assert _by_image(en)["1007129816"] == "A man in an orange hat starring at something."
    assert _by_image(en)["1009434119"] == "A Boston Terrier is running on lush green grass."
    assert _by_image(de)["22439193117_4183a49ec2"] == "Ein schlanker gelblicher Hund beim Laufen."
    assert _by_image(cs)["1009434119"] == "Bostonský teriér běží po trávě."
    for lang in bench.langs:
        rs = bench.sets[lang][0]
        assert rs.image_ids == ["1009434119", "1007129816", "22439193117_4183a49ec2"]
        assert rs.images[1].path == os.path.join(str(repo), "images", "1007129816.jpg")
        assert rs.text_keys == ["1009434119#0", "1007129816#0", "22439193117_4183a49ec2#0"]
        assert rs.source.endswith(os.path.join("raw", f"test_2016_flickr.{lang}.gz"))
        assert rs.skipped_images == 0 and rs.skipped_texts == 0
    assert en.images[2].open().size == (8, 8)


@pytest.mark.parametrize("below", ["", "data", os.path.join("data", "task1")])
def test_the_repository_root_data_and_data_task1_are_all_accepted(repo, below):
    data_dir = os.path.join(str(repo), below) if below else str(repo)
    assert multi30k.find_raw_root(data_dir) == os.path.join(str(repo), "data", "task1")
    bench = multi30k.load_raw(data_dir, ["fr"], image_root=str(repo / "images"))
    assert _by_image(bench.sets["fr"][0])["1007129816"] == "Un homme avec un chapeau orange."


def test_a_folder_without_the_raw_layout_is_not_one(tmp_path):
    assert multi30k.find_raw_root(str(tmp_path)) is None
    with pytest.raises(CCRKError, match="no Multi30K raw layout") as err:
        multi30k.load_raw(str(tmp_path))
    assert "\n" not in str(err.value)


def test_coco_names_lose_their_caption_id_and_czech_is_absent_from_test_2017(repo):
    bench = multi30k.load_raw(str(repo), split="test_2017_mscoco")
    assert bench.langs == ("en", "de", "fr")
    de = bench.sets["de"][0]
    assert de.image_ids == ["COCO_val2014_000000398076", "COCO_train2014_000000117071"]
    assert de.images[0].path == os.path.join(str(repo), "images", "COCO_val2014_000000398076.jpg")
    assert _by_image(de)["COCO_train2014_000000117071"] == "Ich kann nicht sehen, wohin der grüne Pfeil zeigt."
    with pytest.raises(CCRKError, match=r"test_2017_mscoco has no 'cs' captions.*available: en, de, fr") as err:
        multi30k.load_raw(str(repo), ["en", "cs"], split="test_2017_mscoco")
    assert "\n" not in str(err.value)


def test_an_unknown_split_lists_the_splits_there_are(repo):
    with pytest.raises(CCRKError, match="available: test_2016_flickr, test_2017_mscoco, train") as err:
        multi30k.load_raw(str(repo), split="test_2018_flickr")
    assert "\n" not in str(err.value)


def test_a_caption_file_out_of_line_with_the_split_file_names_both_and_their_counts(repo):
    task1 = repo / "data" / "task1"
    _gz(task1 / "raw" / "test_2016_flickr.de.gz", TEST_CAPTIONS["de"][:2])
    with pytest.raises(CCRKError) as err:
        multi30k.load_raw(str(repo))
    message = str(err.value)
    assert "\n" not in message
    assert str(task1 / "raw" / "test_2016_flickr.de.gz") in message and "has 2 captions" in message
    assert str(task1 / "image_splits" / "test_2016_flickr.txt") in message and "lists 3 images" in message


def test_a_missing_image_is_an_error_naming_it_or_a_counted_skip(repo):
    os.remove(repo / "images" / "1007129816.jpg")
    with pytest.raises(CCRKError, match="1007129816.jpg") as err:
        multi30k.load_raw(str(repo), ["en"])
    assert "\n" not in str(err.value) and "test_2016_flickr.txt:2" in str(err.value)
    bench = multi30k.load_raw(str(repo), skip_missing=True)
    assert bench.skipped_images == 4
    for lang in bench.langs:
        rs = bench.sets[lang][0]
        assert rs.image_ids == ["1009434119", "22439193117_4183a49ec2"] and rs.skipped_images == 1
    assert _by_image(bench.sets["en"][0])["22439193117_4183a49ec2"] == "A sleek yellow dog mid run on a dirt area."


def test_training_pairs_come_cleaned_with_their_image_ids(repo):
    pairs, skipped = multi30k.load_raw_train(str(repo), "de")
    assert skipped == 0
    assert [(p.image_id, p.caption) for p in pairs] == [("1000092795", "Zwei junge weiße Männer sind im Freien."),
                                                        ("10002456", "Mehrere Männer mit Schutzhelmen.")]
    assert pairs[1].image.path == os.path.join(str(repo), "images", "10002456.jpg")
    clean = CaptionCleaner(3)
    pairs, _ = multi30k.load_raw_train(str(repo), "en", clean=clean)
    assert [p.caption for p in pairs] == ["two young white", "several men in"]
    os.remove(repo / "images" / "10002456.jpg")
    with pytest.raises(CCRKError, match="10002456.jpg"):
        multi30k.load_raw_train(str(repo), "en")
    pairs, skipped = multi30k.load_raw_train(str(repo), "en", skip_missing=True)
    assert skipped == 1 and [p.image_id for p in pairs] == ["1000092795"]
    with pytest.raises(CCRKError, match="available: en, de"):
        multi30k.load_raw_train(str(repo), "cs")


def test_max_words_normalises_captions_as_the_caption_cleaner_does(repo):
    task1 = repo / "data" / "task1"
    _gz(task1 / "raw" / "test_2016_flickr.en.gz", [TEST_CAPTIONS["en"][0], "...", TEST_CAPTIONS["en"][2]])
    rs = multi30k.load_raw(str(repo), ["en"], max_words=5).sets["en"][0]
    assert _by_image(rs) == {"1009434119": "a boston terrier is running", "22439193117_4183a49ec2": "a sleek yellow dog mid"}
    assert rs.texts == [CaptionCleaner(5)(TEST_CAPTIONS["en"][0]), CaptionCleaner(5)(TEST_CAPTIONS["en"][2])]
    assert rs.rejected_texts == 1 and rs.skipped_texts == 1
