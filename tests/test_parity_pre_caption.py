"""Parity of ccrk.captions.pre_caption with the authors' dataset/utils.py pre_caption.

The fixture folder (env ``CCRK_PARITY_FIXTURE``, default ``../shared/reference-parity`` next to the
checkout) holds ``pre_caption.json``: for each tricky caption the reference's output at max_words 40
and 80, or None plus the error it raised.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from ccrk.captions import EmptyCaptionError, pre_caption
from parity_fixture import FIXTURE as FIXTURE_DIR

FIXTURE = FIXTURE_DIR / "pre_caption.json"
WORD_LIMITS = (40, 80)


def _cases() -> list[dict]:
    if not FIXTURE.exists():
        return []
    return json.loads(FIXTURE.read_text(encoding="utf-8"))["cases"]


CASES = _cases()
needs_fixture = pytest.mark.skipif(not CASES, reason=f"reference-parity fixture {FIXTURE} not found "
                                                     f"(set CCRK_PARITY_FIXTURE to its folder)")


@needs_fixture
def test_fixture_covers_both_word_limits_and_an_error():
    assert all(f"max_words_{n}" in case for case in CASES for n in WORD_LIMITS)
    assert any(case["max_words_40"] is None for case in CASES)


@needs_fixture
@pytest.mark.parametrize("max_words", WORD_LIMITS)
@pytest.mark.parametrize("index", range(len(CASES)) if CASES else [0])
def test_pre_caption_matches_the_reference(index, max_words):
    case = CASES[index]
    expected = case[f"max_words_{max_words}"]
    if expected is None:
        assert case[f"error_{max_words}"].startswith("ValueError")  # the reference's error type
        with pytest.raises(ValueError):
            pre_caption(case["input"], max_words)
    else:
        assert pre_caption(case["input"], max_words) == expected


def test_empty_result_is_a_one_line_ccrk_error():
    from storage.errors import CCRKError

    with pytest.raises(EmptyCaptionError) as info:
        pre_caption(" ?!... ", 40)
    assert isinstance(info.value, CCRKError) and "\n" not in str(info.value)


def test_truncation_counts_space_separated_words_only():
    assert pre_caption("One two three four", 2) == "one two"
    assert pre_caption("one\ttwo three", 2) == "one\ttwo three"  # a single tab does not split words


# --------------------------------------------------------------------------- where captions meet it


def test_option_is_off_by_default_and_on_in_the_paper_and_demo_configs():
    import yaml

    from ccrk.data import pretrain_max_words, uses_pre_caption

    assert not uses_pre_caption({}) and pretrain_max_words({"data": {"max_tokens": 40}}) is None
    assert pretrain_max_words({"data": {"pre_caption": True}}) == 40  # the authors' pre-training limit
    configs = Path(__file__).resolve().parents[1] / "configs"
    for name in ("ccr6", "ccr6-e", "ccr10", "ccr10-e", "tiny", "cl2cm-demo"):
        assert uses_pre_caption(yaml.safe_load((configs / f"{name}.yaml").read_text())), name


def test_pretraining_captions_are_normalised_and_rejected_ones_count_as_missing():
    from ccrk.data import clean_captions

    captions = [{"en": "A Dog!", "de": "...", "fr": "Un chien."}, {"en": "?!", "de": ""}]
    kept, rejected = clean_captions(captions, ["en", "de"], 40)
    assert kept == [{"en": "a dog"}] and rejected == 2  # "fr" is not a training language
    assert clean_captions(captions, ["en", "de"], None) == (captions, 0)


def test_benchmark_captions_use_the_benchmark_word_limit_and_count_rejections(tmp_path):
    from PIL import Image

    from ccrk.evaluation import benchmarks as bm

    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (8, 8)).save(images / "1.jpg")
    ann = tmp_path / "annotations" / "en"
    ann.mkdir(parents=True)
    line = {"sentences": ["A Dog, running!", "...", "  "], "id": "1", "img_path": "1.jpg"}
    (ann / "test.jsonl").write_text(json.dumps(line) + "\n", encoding="utf-8")
    (ann / "train.jsonl").write_text(json.dumps(line) + "\n", encoding="utf-8")
    assert bm.default_max_words("xflickrco") == 80 and bm.default_max_words("multi30k") == 30

    raw = bm.load_benchmark("xflickrco", str(tmp_path), ["en"]).sets["en"][0]
    assert raw.texts == ["A Dog, running!", "..."] and raw.rejected_texts == 0
    bench = bm.load_benchmark("xflickrco", str(tmp_path), ["en"], max_words=bm.default_max_words("xflickrco"))
    en = bench.sets["en"][0]
    assert en.texts == ["a dog running"] and en.text_keys == ["1#0"]
    assert (en.skipped_texts, bench.rejected_texts) == (2, 1)  # the blank one is empty, not rejected

    clean = bm.CaptionCleaner(30)
    pairs, skipped = bm.load_xflickrco_train(str(ann / "train.jsonl"), str(images), clean=clean)
    assert [p.caption for p in pairs] == ["a dog running"] and (skipped, clean.rejected) == (0, 1)
