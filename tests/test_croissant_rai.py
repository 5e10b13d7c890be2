"""The dataset card and Croissant's Responsible-AI fields render the facts a manifest summary gives:
languages per sample, the evaluation-benchmark exclusion per benchmark, the translation model and
decoding per language (from the build's lineage), the filters and every source's and model's
licence; mlcroissant reads the fields back. Summaries are written here as `storage.manifest.summary`
returns them, with and without the keys newer manifests add (benchmark_overlap, lang_counts)."""
import json
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from storage.dataset_facts import dataset_facts, model_facts
from storage.export import croissant_metadata, dataset_card

M12B, D5 = "m2m100_1.2B-0123456789", "d5555555555"
SETTINGS = {"beam_size": 5, "max_len_a": 1.5, "max_len_b": 10, "max_input_tokens": None}
THRESHOLDS = {"default": {"max_uniformity": 0.5, "max_copy_sim": 0.9}, "by_lang": {"ru": {"max_copy_sim": 0.8}}}
MODELS = [("de", "import:cclm", "import"), ("es", M12B, D5), ("ru", M12B, D5)]


def summary(**extra) -> dict:
    lineage = [["dataset", "name", "ccr6-e"], ["dataset", "version", "v123"], ["code", "code_version", "1"],
               ["source", "cc3m", "cc3m-v1"], ["source", "sbu", "sbu-v1"], ["source", "coco", "coco-v1"],
               ["translation", "de", "model_id=import:cclm decode_id=import content=c1"]]
    for lang in ("es", "ru"):
        lineage += [["translation", lang, f"model_id={M12B} decode_id={D5} content=c2"],
                    ["translation_artifact", f"{M12B}/{D5}/{lang}",
                     "t1 " + json.dumps({"model_id": M12B, "decode_id": D5, "settings": SETTINGS,
                                         "thresholds": THRESHOLDS}, sort_keys=True)]]
    lineage += [["param", "drop_flagged", "true"], ["param", "langs", '["en", "de", "es", "ru"]'],
                ["param", "min_langs", "4"]]
    return {"name": "ccr6-e", "version": "v123", "n_samples": 100, "n_shards": 1, "bytes": 1, "code_version": "1",
            "captions_by_lang": {"de": 100, "en": 100, "es": 100, "ru": 100},
            "drops": [{"unit": "image", "reason": "no_image", "lang": None, "count": 30}],
            "samples_by_source": {"cc3m": 60, "coco": 15, "sbu": 25}, "lineage": lineage, **extra}


@pytest.fixture
def files(tmp_path):
    """One published language file (croissant.json names it with its sha256)."""
    (tmp_path / "data").mkdir()
    pq.write_table(pa.table({"caption": ["a dog"], "translation": ["un perro"]}), tmp_path / "data" / "es.parquet")
    return {"data/es.parquet": 1}


@pytest.fixture
def absl_to_real_stderr():
    """mlcroissant's absl handler keeps the stream that was sys.stderr at import (see test_export)."""
    yield
    absl_logging = sys.modules.get("absl.logging")
    if absl_logging is not None:
        absl_logging.get_absl_handler().python_handler.stream = sys.__stderr__


def test_rai_fields_carry_the_model_decoding_overlap_and_licences(tmp_path, files, absl_to_real_stderr):
    mlc = pytest.importorskip("mlcroissant")
    facts = dataset_facts(summary(benchmark_overlap={"xflickrco": 12, "coco_karpathy_test": 3},
                                  lang_counts={"4": 100}), MODELS)
    path = tmp_path / "croissant.json"
    path.write_text(json.dumps(croissant_metadata(facts, str(tmp_path), files)))
    meta = mlc.Dataset(jsonld=str(path)).metadata
    assert not meta.ctx.issues.errors
    protocol = meta.data_preprocessing_protocol
    assert (f"es, ru: machine-translated from English by M2M-100 1.2B (model_id {M12B}), decoding: beam search, "
            f"beam 5, output at most 1.5 x source tokens + 10 (decode_id {D5})") in protocol
    assert any(x.startswith("de: machine-translated from English by imported translations (cclm)") for x in protocol)
    assert any("xflickrco: 12 images; coco_karpathy_test: 3 images (total 15)" in x for x in protocol)
    assert any("min_langs = 4: captions with fewer than 4 of the 4 languages" in x for x in protocol)
    assert any("drop_flagged = true" in x for x in protocol)
    assert any(x.startswith("ru: ok when max_copy_sim 0.8, max_uniformity 0.5") for x in protocol)
    assert "Languages per sample: 100 samples with 4 languages." in protocol
    assert any("Flickr photos with the descriptions their owners wrote" in x for x in meta.data_annotation_protocol)
    assert any("can name people" in x for x in meta.personal_sensitive_information)
    assert "Web Scraping" in meta.data_collection_type and "User-generated content data" in meta.data_collection_type
    assert "30 image(s) no image" in meta.data_collection_missing_data
    assert not any("No evaluation benchmark" in x for x in meta.data_limitations)
    licences = {lic.name: lic.url for lic in meta.license}
    assert licences["translations by M2M-100 1.2B: MIT (M2M-100, Fan et al. 2021)"] == "https://spdx.org/licenses/MIT.html"
    assert "translations by imported translations (cclm): see the cclm release's licence" in licences
    for title in ("Conceptual Captions (CC3M)", "SBU Captioned Photo Dataset", "COCO Captions"):
        assert any(name.startswith(title + ": ") for name in licences), title


def test_card_states_languages_per_sample_the_exclusion_and_decoding_per_language(files):
    by_kind = [{"benchmark": "xflickrco", "kind": "source_id", "n_images": 10},
               {"benchmark": "xflickrco", "kind": "phash", "n_images": 2}]
    facts = dataset_facts(summary(benchmark_overlap={"xflickrco": 12, "multi30k": 0}, overlap_by_kind=by_kind,
                                  lang_counts={4: 70, 3: 30}), MODELS)
    body = dataset_card(facts, files).split("---\n", 2)[2]
    assert "| 4 | 70 |\n| 3 | 30 |" in body
    assert "| xflickrco | 12 | source_id 10, phash 2 |\n| multi30k | 0 |  |" in body
    assert "xflickrco: 12 images (by source_id 10, phash 2); multi30k: 0 images (total 12)" in body
    assert "Warning" not in body
    assert (f"| es | M2M-100 1.2B | beam search, beam 5, output at most 1.5 x source tokens + 10 | {M12B} | {D5} | "
            "MIT (M2M-100, Fan et al. 2021) |") in body
    assert "| de | imported translations (cclm) | as released (decoding not recorded by ccrk) |" in body
    assert "- Quality filter drop_flagged = true" in body and "- Language policy min_langs = 4" in body


def test_card_warns_when_no_benchmark_was_configured(files):
    """A summary without the newer keys (an older manifest) renders, and says what it lacks."""
    body = dataset_card(dataset_facts(summary(), MODELS), files)
    assert "> **Warning:** No evaluation benchmark was excluded (none was configured at build time)" in body
    assert "No benchmark excluded." in body
    assert "## Languages per sample\n\nNot recorded in this manifest." in body


def test_decoding_not_in_the_lineage_is_said_so(files):
    s = summary()
    s["lineage"] = [r for r in s["lineage"] if r[0] != "translation_artifact"]
    facts = dataset_facts(s, MODELS)
    assert facts.translations[1].decoding == f"not recorded in the lineage (decode_id {D5})"


def test_model_facts_name_the_model_and_its_licence():
    assert model_facts("m2m100_418M-abcdef0123").name == "M2M-100 418M"
    nllb = model_facts("nllb-200-distilled-600M-ct2-0123456789")
    assert nllb.name == "NLLB-200 600M" and nllb.licence.startswith("CC-BY-NC 4.0")
    assert model_facts("demo_model-11905a6c7e").licence == "MIT (ccrk)"
    assert model_facts("import:uc2").licence_url is None
