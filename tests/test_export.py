"""`ccrk export`: parquet per language (no image bytes), a dataset card, croissant.json (Croissant 1.1
with the Responsible-AI fields, read back by mlcroissant)."""
import json
import os
import sys

import pyarrow.parquet as pq
import pytest
import yaml

from ccrk.app.cli import main
from klingual_fixtures import DECODE, MODEL, ensure_normalize, tiny_corpus
from storage import layout, manifest
from storage.build import build_dataset
from storage.catalog import Artifact, Catalog
from translation.pipeline import decode_settings
from translation.spec import TranslateSpec

ensure_normalize()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The tiny corpus built and exported with `ccrk export`: {"dataset": path, "out": published dir}."""
    root = str(tmp_path_factory.mktemp("export"))
    tiny_corpus(root)
    # The translate stage's catalog entry for the fixture's store, as `ccrk translate` records it
    # (beam 5): the build's lineage carries it, and the export reads the decoding from there.
    spec = TranslateSpec(beam_size=5)
    Catalog(root).record(Artifact("tr-beam5", "translation", f"{MODEL}/{DECODE}",
                                  layout.join(root, "translations", MODEL, DECODE),
                                  params={"model_id": MODEL, "decode_id": DECODE, "langs": ["es", "ru"],
                                          "settings": decode_settings(**spec.decode_params()).__dict__,
                                          "thresholds": spec.thresholds.version_params()}))
    ds = build_dataset(root, name="tiny", sources=["coco", "vg"], langs="en,es,ru", shard_size=2)
    out = os.path.join(root, "published")
    assert main(["export", ds.path, "--out", out]) == 0
    return {"dataset": ds.path, "out": out}


@pytest.fixture(scope="module")
def exported(built):
    return built["out"]


@pytest.fixture(scope="module")
def summary(built):
    return manifest.summary(built["dataset"])


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


def test_croissant_is_1_1_with_the_responsible_ai_fields_from_the_build(exported, summary, absl_to_real_stderr):
    mlc = pytest.importorskip("mlcroissant")
    meta = mlc.Dataset(jsonld=os.path.join(exported, "croissant.json")).metadata
    assert meta.ctx.is_v1_1() and not meta.ctx.issues.errors and not meta.ctx.issues.warnings
    raw = json.load(open(os.path.join(exported, "croissant.json")))
    assert "http://mlcommons.org/croissant/RAI/1.0" in raw["conformsTo"]
    protocol = " ".join(meta.data_preprocessing_protocol)
    # Decoding from the translate stage's record, carried by the build's lineage.
    assert f"es, ru: machine-translated from English by M2M-100 (model_id {MODEL}), decoding: beam search, beam 5" \
        in protocol
    assert "ru: ok when max_copy_sim 0.9, max_len_ratio 3.0, max_uniformity 0.5, min_len_ratio 0.4" in protocol
    assert "min_langs = all" in protocol and "drop_flagged = false" in protocol
    overlap = summary.get("benchmark_overlap") or {}
    if overlap:
        assert all(f"{b}: {n:,} images" in protocol for b, n in overlap.items())
        assert not any("No evaluation benchmark" in x for x in meta.data_limitations)
    else:
        assert "No evaluation benchmark was excluded" in protocol
    assert "COCO Captions (source version cocov1, 3 images" in meta.data_collection
    assert "img2dataset" in meta.data_collection
    assert "1 image(s) no image" in meta.data_collection_missing_data
    assert any("identifiable people" in x for x in meta.personal_sensitive_information)
    assert raw["rai:dataCollectionTimeframe"].count("/") == 1 and raw["datePublished"]
    licences = [lic.name if hasattr(lic, "name") else lic for lic in meta.license]
    assert any(x.startswith("COCO Captions: annotations CC BY 4.0") for x in licences)
    assert any(x.startswith("Visual Genome: annotations CC BY 4.0") for x in licences)
    assert any(x.startswith("translations by M2M-100: MIT") for x in licences)


def test_dataset_card_states_languages_per_sample_benchmarks_and_decoding(exported, summary):
    body = open(os.path.join(exported, "README.md")).read().split("---\n", 2)[2]
    counts = summary.get("lang_counts") or {3: 5}  # the 5 samples all have en, es and ru
    assert all(f"| {k} | {n:,} |" in body for k, n in counts.items())
    assert f"| es | M2M-100 | beam search, beam 5, output at most 1.5 x source tokens + 10 | {MODEL} | {DECODE} |" \
        in body
    overlap = summary.get("benchmark_overlap") or {}
    if overlap:
        assert all(f"| {b} | {n:,} |" in body for b, n in overlap.items())
        assert "> **Warning:**" not in body
    else:
        assert "> **Warning:** No evaluation benchmark was excluded" in body and "No benchmark excluded." in body
