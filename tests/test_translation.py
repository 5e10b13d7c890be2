"""Translation stage, library level: model directory, engines, batching, scores, store, import."""
from __future__ import annotations

import json
import os
import shutil

import pyarrow.parquet as pq
import pytest

from storage.errors import CCRKError
from storage.versioning import normalize, text_sha
from translation import m2m, store
from translation.engines.base import DecodeSettings, OutOfMemory, make_engine, token_budget_batches
from translation.imports import import_translations
from translation.scores import score, uniformity
from translation.train_demo_model import split_captions

DEMO = m2m.DEMO_MODEL_DIR


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("ct2cache"))


@pytest.fixture(scope="module")
def ct2(cache_dir):
    return make_engine("ctranslate2", DEMO, compute_type="float32", threads=1, cache_dir=cache_dir)


@pytest.fixture(scope="module")
def hf():
    return make_engine("transformers", DEMO, threads=1)


# --- the model directory --------------------------------------------------------------------


def test_demo_model_has_the_published_m2m100_layout_and_fits_in_10_mb():
    for name in ("config.json", "generation_config.json", "model.safetensors", "sentencepiece.bpe.model",
                 "vocab.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert os.path.isfile(os.path.join(DEMO, name)), name
    size = sum(os.path.getsize(os.path.join(DEMO, n)) for n in os.listdir(DEMO))
    assert size <= 10 * 1024 * 1024
    with open(os.path.join(DEMO, "config.json")) as f:
        assert json.load(f)["architectures"] == ["M2M100ForConditionalGeneration"]


def test_language_tokens_are_special_so_decode_does_not_leak_them():
    tok = m2m.load_tokenizer(DEMO)
    tok.tgt_lang = "es"
    ids = tok(text_target="un círculo rojo")["input_ids"]
    assert ids[0] == tok.get_lang_id("es")
    assert tok.decode(ids, skip_special_tokens=True) == "un círculo rojo"
    assert "__ru__" in tok.all_special_tokens


def test_model_directory_missing_a_file_is_an_error_naming_it(tmp_path):
    broken = tmp_path / "m2m"
    shutil.copytree(DEMO, broken)
    os.remove(broken / "sentencepiece.bpe.model")
    with pytest.raises(CCRKError, match="sentencepiece.bpe.model"):
        make_engine("transformers", str(broken))


def test_unsupported_language_is_an_error_listing_the_supported_ones(ct2):
    with pytest.raises(CCRKError, match=r"xx.*supports: .*es, .*ru"):
        ct2.translate(["a red circle"], "xx")


def test_model_id_is_readable_and_follows_the_content(tmp_path):
    copy = tmp_path / "demo_model"
    shutil.copytree(DEMO, copy)
    assert m2m.model_id(str(copy)) == m2m.model_id(DEMO)
    assert m2m.model_id(DEMO).startswith("demo_model-")
    with open(copy / "generation_config.json", "a") as f:
        f.write("\n")
    assert m2m.model_id(str(copy)) != m2m.model_id(DEMO)


# --- engines --------------------------------------------------------------------------------


def test_greedy_ctranslate2_gives_the_same_tokens_as_greedy_transformers(ct2, hf):
    _, heldout = split_captions()
    texts = [r["en"] for r in heldout[:40]] + ["a dog runs on the beach", "Two people, a bicycle and a tree."]
    for lang in ("es", "ru"):
        a, b = ct2.translate(texts, lang), hf.translate(texts, lang)
        assert [x.tokens for x in a] == [x.tokens for x in b]


def test_ctranslate2_conversion_happens_once_cached_by_content_hash(ct2, cache_dir):
    assert os.path.basename(ct2.converted_dir) == "ct2-" + m2m.content_hash(DEMO)[:16]
    stamp = os.path.getmtime(os.path.join(ct2.converted_dir, "model.bin"))
    again = make_engine("ctranslate2", DEMO, compute_type="int8", threads=1, cache_dir=cache_dir)
    assert again.converted_dir == ct2.converted_dir
    assert os.path.getmtime(os.path.join(again.converted_dir, "model.bin")) == stamp
    assert again.translate(["a small red circle"], "es")[0].text == "un círculo rojo pequeño"


def test_results_come_back_in_input_order_whatever_the_batching(cache_dir):
    small = make_engine("ctranslate2", DEMO, compute_type="float32", threads=1, cache_dir=cache_dir,
                        token_budget=24, max_batch_size=3)
    texts = ["a red circle and a blue star", "a small red circle", "a large green heart at the top",
             "a black square on the right"]
    assert [t.text for t in small.translate(texts, "es")] == [
        "un círculo rojo y una estrella azul", "un círculo rojo pequeño", "un corazón verde grande arriba",
        "un cuadrado negro a la derecha"]


def test_too_long_text_is_truncated_and_flagged(ct2):
    long_text = " and ".join(["a red circle"] * 100)
    out = ct2.translate([long_text, "a small red circle"], "es")
    assert out[0].truncated and not out[1].truncated
    row = score(long_text, out[0].text, "es", truncated=out[0].truncated)
    assert row["truncated"] and not row["ok"]


def test_output_cap_is_relative_to_the_input_length(ct2):
    tight = make_engine("ctranslate2", DEMO, compute_type="float32", threads=1,
                        settings=DecodeSettings(max_len_a=0.0, max_len_b=2), cache_dir=os.path.dirname(
                            os.path.dirname(ct2.converted_dir)))
    out = tight.translate(["a large green heart at the top"], "es")[0]
    assert len(out.tokens) == 2 and out.truncated


def test_token_budget_batches_sort_by_length_and_respect_the_budget():
    lengths = [9, 3, 5, 3, 8, 4, 20]
    batches = token_budget_batches(lengths, token_budget=12, max_batch_size=8)
    assert sorted(i for b in batches for i in b) == list(range(7))
    flat = [lengths[i] for b in batches for i in b]
    assert flat == sorted(flat)
    for b in batches:
        assert len(b) == 1 or max(lengths[i] for i in b) * len(b) <= 12
    assert [6] in batches  # longer than the budget: alone


def test_out_of_memory_splits_the_batch_and_retries(hf):
    calls = []
    real = type(hf)._generate

    def generate(self, sources, tgt_lang, max_output):
        calls.append(len(sources))
        if len(sources) > 2:
            raise OutOfMemory("CUDA out of memory (simulated: this batch does not fit)")
        return real(self, sources, tgt_lang, max_output)

    texts = ["a small red circle", "a large blue star", "a green heart at the top", "a black square on the left",
             "a small white triangle"]
    expected = [t.text for t in hf.translate(texts, "tr")]
    hf._generate = generate.__get__(hf)
    try:
        got = [t.text for t in hf.translate(texts, "tr")]
    finally:
        del hf._generate
    assert got == expected
    assert calls == [5, 2, 3, 1, 2]  # 5 fails -> 2 + 3; 3 fails -> 1 + 2


def test_decode_id_changes_with_the_decoding_settings():
    assert DecodeSettings().decode_id() == DecodeSettings().decode_id()
    assert DecodeSettings(beam_size=4).decode_id() != DecodeSettings().decode_id()


# --- normalisation and scores ---------------------------------------------------------------


def test_normalize_composes_unicode_and_collapses_whitespace():
    assert normalize("  a  cafe\u0301\t on\nthe  left ") == "a café on the left"
    assert normalize(None) == "" and normalize(" \t ") == ""


def test_scores_flag_repetition_copy_wrong_script_and_empty_output():
    good = score("a red star on the left", "красная звезда слева", "ru")
    assert good["ok"] and good["script_ok"] and good["uniformity"] == 0.0
    assert not score("a red star", "a red star", "es")["ok"]  # copied through
    assert score("a red star", "a red star", "es")["copy_sim"] == 1.0
    assert not score("a red star", "red star", "ru")["script_ok"]  # Latin text for Russian
    rep = score("a red star", "roja roja roja roja roja", "es")
    assert rep["uniformity"] == pytest.approx(0.8) and not rep["ok"]
    empty = score("a red star", "", "tr")
    assert empty["empty"] and not empty["ok"]
    assert uniformity("") == 0.0


# --- store and import -----------------------------------------------------------------------


def test_store_parts_are_numbered_past_gaps_and_load_translations_keys_by_text_sha(root):
    d = store.lang_dir(root, "m-1", "d1", "es")
    row = {"text_sha": text_sha("a red circle"), "tgt_lang": "es", "src_text": "a red circle",
           "tgt_text": "un círculo rojo", "model_id": "m-1", "decode_id": "d1", **score("a red circle",
                                                                                        "un círculo rojo", "es")}
    store.write_part(d, 3, [row])
    assert store.next_part_index(d) == 4
    assert store.stored_shas(d) == {text_sha("a red circle")}
    table = store.load_translations(root, ["es"])
    assert table.column_names == list(store.COLUMNS)
    assert table.to_pylist()[0]["tgt_text"] == "un círculo rojo"
    assert store.load_translations(root, ["ru"]).num_rows == 0


def test_import_cclm_json_lines_as_import_rows_once(root, tmp_path):
    path = tmp_path / "cclm.jsonl"
    lines = [{"caption": {"en": "a  dog on a beach", "de": "ein Hund am Strand", "fr": "un chien sur une plage"}},
             {"caption": {"en": "a cat", "de": "eine Katze"}}]
    path.write_text("\n".join(json.dumps(x, ensure_ascii=False) for x in lines) + "\nnot json\n{}\n",
                    encoding="utf-8")
    stats = import_translations(root, str(path), "cclm")
    assert stats.imported == {"de": 2, "fr": 1} and stats.bad_rows == 2
    table = store.load_translations(root, ["de"], model_id="import:cclm")
    rows = {r["text_sha"]: r for r in table.to_pylist()}
    assert rows[text_sha("a dog on a beach")]["tgt_text"] == "ein Hund am Strand"
    assert rows[text_sha("a cat")]["model_id"] == "import:cclm"
    again = import_translations(root, str(path), "cclm")
    assert again.imported == {"de": 0, "fr": 0} and again.already == {"de": 2, "fr": 1}


def test_import_parquet_with_language_columns(root, tmp_path):
    import pyarrow as pa

    path = tmp_path / "uc2.parquet"
    pq.write_table(pa.table({"en": ["a red car"], "ja": ["赤い車"], "cs": ["červené auto"]}), path)
    stats = import_translations(root, str(path), "uc2", langs=["ja"])
    assert stats.imported == {"ja": 1}
    assert store.load_translations(root, ["ja"]).to_pylist()[0]["tgt_text"] == "赤い車"
