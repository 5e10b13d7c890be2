"""Imported translations (CCLM / UC2 JSON lines) join the sources' captions on a loose English key,
with the match rate per source reported and a warning, naming examples, under 95%."""
from __future__ import annotations

import json
import os
import tarfile

import pytest

from klingual_fixtures import write_source
from storage.build import build_dataset
from storage.errors import CCRKError
from storage.versioning import match_key, normalize, text_sha
from translation import store
from translation.imports import import_report, import_translations
from translation.spec import ImportSpec

CAPTIONS = ["A red circle.", "Two blue squares on the left", "a green star", "A YELLOW heart"]
# CCLM's release as it may differ from the source: case, spacing, trailing punctuation, quotes.
CCLM = [{"caption": {"en": "a red circle", "de": "ein roter Kreis"}},
        {"caption": {"en": "  two BLUE squares   on the left ", "de": "zwei blaue Quadrate links"}},
        {"caption": {"en": '"A green star."', "de": "ein grüner Stern"}},
        {"caption": {"en": "a purple moon", "de": "ein lila Mond"}}]  # no such caption


def _jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return str(path)


def _texts(captions) -> dict[str, str]:
    return {text_sha(normalize(c)): normalize(c) for c in captions}


def _stored(root, name="cclm", lang="de") -> dict[str, dict]:
    d = store.lang_dir(root, f"import:{name}", "imported", lang)
    return {r["text_sha"]: r for r in store.read_dir(d).to_pylist()}


def test_match_key_ignores_case_spacing_punctuation_and_quotes():
    assert match_key("A red circle.") == match_key("  a RED   circle ") == match_key("“a red circle”") == "a red circle"
    assert match_key("a man's t-shirt") == match_key("a man s t shirt")  # CCLM's caption cleaning keeps the key
    assert match_key("a red circle") != match_key("a red square") and match_key("?!") == match_key(None) == ""
    assert normalize("A red circle.") == "A red circle."  # the store's key is untouched


def test_rows_land_on_the_source_captions_own_text_sha(root, tmp_path):
    path = _jsonl(tmp_path / "cclm.jsonl", CCLM)
    stats = import_translations(root, path, "cclm", sources={"coco@v1": _texts(CAPTIONS)})
    rows = _stored(root)
    assert set(rows) == {text_sha(c) for c in CAPTIONS[:3]}
    assert rows[text_sha("A red circle.")]["src_text"] == "A red circle."
    assert rows[text_sha("Two blue squares on the left")]["tgt_text"] == "zwei blaue Quadrate links"
    assert stats.imported == {"de": 3} and stats.unmatched_rows == 1 and stats.rows == 4
    (match,) = stats.sources
    assert (match.source, match.captions, match.matched) == ("coco@v1", 4, 3)
    assert match.rate == 0.75 and match.unmatched_examples == ["A YELLOW heart"]
    again = import_translations(root, path, "cclm", sources={"coco@v1": _texts(CAPTIONS)})
    assert again.imported == {"de": 0} and again.already == {"de": 3} and again.sources[0].matched == 3


def test_an_exact_match_wins_over_a_loose_one(root, tmp_path):
    path = _jsonl(tmp_path / "cclm.jsonl", [{"caption": {"en": "a red circle", "de": "loose"}},
                                            {"caption": {"en": "A red circle.", "de": "exact"}}])
    import_translations(root, path, "cclm", sources={"coco@v1": _texts(["A red circle.", "a red circle"])})
    rows = _stored(root)
    assert rows[text_sha("A red circle.")]["tgt_text"] == "exact"
    assert rows[text_sha("a red circle")]["tgt_text"] == "loose"


def test_a_list_of_captions_per_line_is_read_too(root, tmp_path):
    path = _jsonl(tmp_path / "cclm.jsonl", [{"caption": [{"en": "a red circle", "de": "ein roter Kreis"},
                                                         {"en": "a green star", "ja": "緑の星"}],
                                             "image_path": "COCO_train2014_000000000001.jpg"}])
    stats = import_translations(root, path, "cclm", sources={"coco@v1": _texts(CAPTIONS)})
    assert stats.rows == 2 and stats.imported == {"de": 1, "ja": 1}


def test_a_folder_of_parts_is_read_in_name_order(root, tmp_path):
    (tmp_path / "coco-mm-data-all").mkdir()
    _jsonl(tmp_path / "coco-mm-data-all" / "part_1.data", [{"caption": {"en": "a red circle", "de": "later"}}])
    _jsonl(tmp_path / "coco-mm-data-all" / "part_0.data", CCLM[:1] + CCLM[2:3])
    stats = import_translations(root, str(tmp_path / "coco-mm-data-all"), "cclm",
                                sources={"coco@v1": _texts(CAPTIONS)})
    assert stats.rows == 3 and stats.sources[0].matched == 2
    assert _stored(root)[text_sha("A red circle.")]["tgt_text"] == "ein roter Kreis"  # part_0 first
    with pytest.raises(CCRKError, match="translations to import not found"):
        import_translations(root, str(tmp_path / "nowhere"), "cclm")


def test_without_a_source_rows_keep_their_own_english_key(root, tmp_path):
    path = _jsonl(tmp_path / "cclm.jsonl", CCLM[:2])
    stats = import_translations(root, path, "cclm")
    assert set(_stored(root)) == {text_sha("a red circle"), text_sha("two BLUE squares on the left")}
    assert stats.sources == [] and stats.unmatched_rows == 0


def test_a_rate_under_the_minimum_is_a_warning_naming_unmatched_captions(root, tmp_path):
    path = _jsonl(tmp_path / "cclm.jsonl", CCLM)
    stats = import_translations(root, path, "cclm", sources={"coco@v1": _texts(CAPTIONS)})
    low = import_report("cclm", path, stats, min_match_rate=0.95)
    (warning,) = low["warnings"]
    assert "75.0%" in warning and "coco@v1" in warning and "'A YELLOW heart'" in warning
    assert low["sources"][0]["rate"] == 0.75 and low["unmatched_rows"] == 1
    assert import_report("cclm", path, stats, min_match_rate=0.7)["warnings"] == []


def test_import_spec_takes_one_source_or_several():
    assert ImportSpec.parse({"name": "cclm", "path": "x", "source": "cc3m"}).source == ["cc3m"]
    assert ImportSpec.parse({"name": "cclm", "path": "x", "source": ["sbu", "vg"]}).source == ["sbu", "vg"]
    assert "source" not in ImportSpec(name="cclm", path="x").version_params()


def _samples(path) -> dict[str, dict]:
    out = {}
    for name in sorted(os.listdir(os.path.join(path, "shards"))):
        if name.endswith(".tar"):
            with tarfile.open(os.path.join(path, "shards", name)) as tar:
                for m in tar.getmembers():
                    if m.name.endswith(".json"):
                        out[m.name[:-5]] = json.loads(tar.extractfile(m).read())
    return out


def test_translate_flow_joins_an_import_whose_english_differs_and_the_build_finds_it(root, tmp_path, capsys):
    from ccrk.app.commands.translate import print_translation_summary
    from flows.translate import translate_flow

    write_source(root, "coco", "c1", [{"id": i, "captions": [c]} for i, c in enumerate(CAPTIONS)])
    path = _jsonl(tmp_path / "cclm.jsonl", CCLM)
    spec = {"langs": ["es"], "threads": 1, "device": "cpu", "sources": ["coco"],
            "imports": [{"name": "cclm", "path": path, "source": "coco"}]}
    summary = translate_flow(spec, root=root)
    (report,) = summary["imports"]
    assert report["sources"] == [{"source": "coco@c1", "captions": 4, "matched": 3, "rate": 0.75,
                                  "unmatched_examples": ["A YELLOW heart"]}]
    assert summary["warnings"] == report["warnings"] and "A YELLOW heart" in summary["warnings"][0]
    print_translation_summary(summary)  # what `ccrk translate` prints
    out = capsys.readouterr().out
    assert "import:cclm" in out and "75.0%" in out and "warning: import cclm" in out

    built = build_dataset(root, name="joined", sources=["coco"], langs="en,de", min_langs=1)
    samples = _samples(built.path)
    assert samples["coco-0"]["captions"] == [{"en": "A red circle.", "de": "ein roter Kreis"}]
    assert samples["coco-1"]["captions"][0]["de"] == "zwei blaue Quadrate links"
    assert samples["coco-2"]["captions"][0]["de"] == "ein grüner Stern"
    assert "de" not in samples["coco-3"]["captions"][0]


def test_an_import_naming_a_source_the_run_does_not_read_is_one_line_error(root, tmp_path):
    from flows.translate import translate_flow

    write_source(root, "coco", "c1", [{"id": 0, "captions": ["a red circle"]}])
    spec = {"langs": ["es"], "threads": 1, "device": "cpu",
            "imports": [{"name": "uc2", "path": _jsonl(tmp_path / "uc2.jsonl", CCLM), "source": "cc3m"}]}
    with pytest.raises(CCRKError, match="import uc2 covers source cc3m, which this run does not read") as err:
        translate_flow(spec, root=root)
    assert "\n" not in str(err.value)


def test_imports_alone_translate_no_language_and_load_no_model(root, tmp_path):
    """CCR6's chain: every language comes from the authors' release, so ``langs: []`` and a model
    path that does not exist here -- nothing is loaded, the import is stored and matched."""
    from flows.translate import translate_flow
    from translation.spec import TranslateSpec

    write_source(root, "coco", "c1", [{"id": i, "captions": [c]} for i, c in enumerate(CAPTIONS)])
    path = _jsonl(tmp_path / "cclm.jsonl", CCLM)
    spec = {"langs": [], "model": str(tmp_path / "no-such-model"), "sources": ["coco"],
            "imports": [{"name": "cclm", "path": path, "source": "coco"}]}
    summary = translate_flow(spec, root=root)
    assert summary["per_lang"] == [] and summary["parts"] == 0 and summary["model_id"] == "none"
    assert summary["imports"][0]["sources"][0]["matched"] == 3
    assert len(_stored(root)) == 3
    with pytest.raises(CCRKError, match="nothing to translate"):
        TranslateSpec.parse({"langs": []})
