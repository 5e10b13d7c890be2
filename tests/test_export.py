"""`ccrk export`: parquet per language (no image bytes), a dataset card, croissant.json."""
import os
import sys

import pyarrow.parquet as pq
import pytest
import yaml

from ccrk.app.cli import main
from klingual_fixtures import MODEL, ensure_normalize, tiny_corpus
from storage.build import build_dataset

ensure_normalize()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("export"))
    tiny_corpus(root)
    ds = build_dataset(root, name="tiny", sources=["coco", "vg"], langs="en,es,ru", shard_size=2)
    out = os.path.join(root, "published")
    assert main(["export", ds.path, "--out", out]) == 0
    return out


def test_one_parquet_per_language_with_captions_translations_and_scores(exported):
    assert sorted(os.listdir(os.path.join(exported, "data"))) == ["en.parquet", "es.parquet", "ru.parquet"]
    es = pq.read_table(os.path.join(exported, "data", "es.parquet"))
    assert es.num_rows == 7
    assert {"caption", "translation", "uniformity", "copy_sim", "len_ratio", "ok", "image_url", "source",
            "source_id", "caption_id", "image_key", "model_id", "decode_id"} <= set(es.column_names)
    assert not any(str(t).startswith(("binary", "large_binary")) for t in es.schema.types)  # no image bytes
    rows = {r["caption"]: r for r in es.to_pylist()}
    flagged = rows["two blue squares"]
    assert flagged["translation"] == "ES two blue squares" and flagged["ok"] is False
    assert flagged["model_id"] == MODEL and flagged["image_url"] == "http://127.0.0.1:1/coco/2.jpg"
    assert rows["a yellow star"]["source"] == "vg" and rows["a yellow star"]["source_id"] == "10"


def test_dataset_card_has_a_hugging_face_header_and_licences(exported):
    text = open(os.path.join(exported, "README.md")).read()
    assert text.startswith("---\n")
    header = yaml.safe_load(text.split("---\n")[1])
    assert header["language"] == ["en", "es", "ru"]
    assert header["size_categories"] == ["n<1K"]
    assert header["source_datasets"] == ["extended|coco", "extended|visual_genome"]
    assert header["license"] == "other" and "MIT" in header["license_details"]
    assert [c["config_name"] for c in header["configs"]] == ["en", "es", "ru"]
    body = text.split("---\n", 2)[2]
    assert "CC BY 4.0" in body and "Flickr terms of use" in body and "MIT (M2M-100" in body
    assert "missing_language" in body


@pytest.fixture
def absl_to_real_stderr():
    """mlcroissant brings absl, whose log handler keeps the stream that was sys.stderr at import:
    under pytest, this test's capture, closed afterwards. Point it at the real stderr again, or a
    later test that logs through it fails with "I/O operation on closed file"."""
    yield
    absl_logging = sys.modules.get("absl.logging")
    if absl_logging is not None:
        absl_logging.get_absl_handler().python_handler.stream = sys.__stderr__


def test_croissant_metadata_validates_and_reads(exported, absl_to_real_stderr):
    mlc = pytest.importorskip("mlcroissant")
    ds = mlc.Dataset(jsonld=os.path.join(exported, "croissant.json"))
    records = list(ds.records("ru"))
    assert len(records) == 7
    assert {r["ru/translation"].decode() for r in records} >= {"RU a red circle"}
