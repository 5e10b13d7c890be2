"""Translation stage end to end: the Prefect flow, the store's resume after kill -9, the CLI."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq

from storage.catalog import Catalog
from storage.versioning import normalize, text_sha
from translation import m2m, store
from translation.train_demo_model import all_captions
from translation_fixtures import write_source

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _all_rows(root, lang):
    return [r for m, d, lg in store.list_stores(root) if lg == lang
            for r in store.read_dir(store.lang_dir(root, m, d, lang)).to_pylist()]


def test_flow_translates_each_unique_text_once_and_a_rerun_only_new_texts(root):
    from flows.translate import translate_flow

    coco = write_source(root, "coco", ["a small red circle", "a  small red circle ", "", "   ",
                                       "a blue star on the left", "a large green heart"])
    first = translate_flow({"langs": ["es", "ru"], "part_size": 2, "threads": 1, "device": "cpu"}, root=root)
    by_lang = {r["lang"]: r for r in first["per_lang"]}
    assert by_lang["es"]["translated"] == 3 and by_lang["es"]["skipped_empty"] == 2
    assert {r["tgt_text"] for r in _all_rows(root, "es")} == {
        "un círculo rojo pequeño", "una estrella azul a la izquierda", "un corazón verde grande"}
    assert {r["tgt_text"] for r in _all_rows(root, "ru")} >= {"маленький красный круг"}
    art = Catalog(root).get(first["version"])
    assert art.kind == "translation" and art.parents == [coco.version]

    sbu = write_source(root, "sbu", ["a small red circle", "a black square at the bottom"])
    second = translate_flow({"langs": ["es", "ru"], "part_size": 2, "threads": 1, "device": "cpu"}, root=root)
    by_lang = {r["lang"]: r for r in second["per_lang"]}
    assert by_lang["es"]["translated"] == 1 and by_lang["es"]["already_stored"] == 3
    rows = _all_rows(root, "es")
    assert len(rows) == len({r["text_sha"] for r in rows}) == 4
    assert sorted(Catalog(root).get(second["version"]).parents) == sorted([coco.version, sbu.version])
    table = store.load_translations(root, ["es"], model_id=second["model_id"])
    assert table.num_rows == 4
    sha = text_sha(normalize("a black square at the bottom"))
    assert {r["text_sha"]: r["tgt_text"] for r in table.to_pylist()}[sha] == "un cuadrado negro abajo"


def test_killed_run_loses_at_most_the_parts_in_flight_and_resumes_without_duplicates(root):
    from prefect.settings import PREFECT_API_URL

    captions = [r["en"] for r in all_captions()[:240]]
    write_source(root, "vg", captions)
    model_id = m2m.model_id(m2m.DEMO_MODEL_DIR)
    from translation.engines.base import DecodeSettings

    directory = store.lang_dir(root, model_id, DecodeSettings().decode_id(), "tr")
    script = ("from flows.translate import translate_flow\n"
              f"translate_flow({{'langs': ['tr'], 'part_size': 8, 'engine': 'transformers', 'threads': 1, "
              f"'device': 'cpu'}}, root={root!r})\n")
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "CCRK_ROOT": root}
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and len(store.part_paths(directory)) < 2:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    parts = store.part_paths(directory)
    assert 2 <= len(parts) < 30, "the run must be killed part-way"
    for p in parts:  # every part present is whole
        assert pq.read_table(p).num_rows == 8

    from flows.translate import translate_flow

    resumed = translate_flow({"langs": ["tr"], "part_size": 8, "threads": 1, "device": "cpu"}, root=root)
    assert resumed["per_lang"][0]["already_stored"] == 8 * len(parts)
    rows = store.read_dir(directory).to_pylist()
    assert len(rows) == len({r["text_sha"] for r in rows}) == 240
    assert {r["text_sha"] for r in rows} == {text_sha(c) for c in captions}


def test_cli_translates_prints_a_summary_and_samples(root, capsys):
    from ccrk.app.cli import main

    write_source(root, "cc3m", ["a large purple star", "a white triangle on the right"])
    assert main(["translate", "--root", root, "--langs", "id,tr", "--part-size", "1", "--device", "cpu",
                 "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "translation summary" in out and "sample translations" in out
    assert "sebuah" in out and "üçgen" in out  # sample rows (the table may wrap them)
    assert {r["tgt_text"] for r in _all_rows(root, "id")} == {"sebuah bintang ungu besar",
                                                               "sebuah segitiga putih di kanan"}
    assert {r["tgt_text"] for r in _all_rows(root, "tr")} == {"büyük mor bir yıldız", "sağda beyaz bir üçgen"}


def test_cli_unsupported_language_lists_the_supported_ones(root, capsys):
    from ccrk.app.cli import main

    write_source(root, "coco", ["a red circle"])
    assert main(["translate", "--root", root, "--langs", "es,xx"]) == 2
    err = capsys.readouterr().err
    assert "xx" in err and "es, " in err and "ru" in err


def test_cli_without_acquired_sources_is_a_clear_error(root, capsys):
    from ccrk.app.cli import main

    assert main(["translate", "--root", root, "--langs", "es"]) == 2
    assert "no acquired sources" in capsys.readouterr().err
