"""The shared foundation: data root, versions, catalog lineage, demo grammar, CLI errors."""
import subprocess
import sys

from storage import layout
from storage.catalog import Artifact, Catalog
from storage.demo import grammar
from storage.versioning import content_version


def test_data_root_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("CCRK_ROOT", str(tmp_path / "env"))
    assert layout.data_root(None) == str(tmp_path / "env")
    assert layout.data_root(str(tmp_path / "arg")) == str(tmp_path / "arg")
    assert layout.data_root("s3://bucket/x/") == "s3://bucket/x"
    monkeypatch.delenv("CCRK_ROOT")
    assert layout.data_root(None).endswith("/data")


def test_version_depends_on_every_input():
    base = content_version("dataset", ["a", "b"], {"x": 1})
    assert base == content_version("dataset", ["b", "a"], {"x": 1})
    assert base != content_version("dataset", ["a"], {"x": 1})
    assert base != content_version("dataset", ["a", "b"], {"x": 2})
    assert base != content_version("dataset", ["a", "b"], {"x": 1}, code_version="other")


def test_catalog_lineage_walks_back_to_sources(root):
    cat = Catalog(root)
    cat.record(Artifact("s1", "source", "coco", "/s1"))
    cat.record(Artifact("t1", "translation", "m2m", "/t1", parents=["s1"]))
    cat.record(Artifact("d1", "dataset", "demo", "/d1", parents=["s1", "t1"]))
    chain = [(d, a.version) for d, a in cat.lineage("d1")]
    assert chain[0] == (0, "d1")
    assert {v for _, v in chain} == {"d1", "s1", "t1"}
    assert cat.find("d") is None or cat.find("d").version == "d1"
    assert [a.version for a in cat.list("source")] == ["s1"]


def test_grammar_agreement():
    o = grammar.Obj("star", "red", "small", "left")
    p = grammar.Phrase("size_position", (o,))
    assert grammar.render(p, "en") == "a small red star on the left"
    assert grammar.render(p, "es") == "una estrella roja pequeña a la izquierda"
    assert grammar.render(p, "ru") == "маленькая красная звезда слева"
    assert grammar.render(p, "tr") == "solda küçük kırmızı bir yıldız"
    assert grammar.render(p, "id") == "sebuah bintang merah kecil di kiri"
    assert grammar.render(grammar.Phrase("size", (grammar.Obj("circle", "orange", "small", "top"),)), "en") == "a small orange circle"
    assert grammar.render(grammar.Phrase("position", (grammar.Obj("circle", "orange", "small", "top"),)), "en") == "an orange circle at the top"


def test_cli_error_is_one_sentence(root):
    out = subprocess.run([sys.executable, "-m", "ccrk.cli", "lineage", "nope", "--root", root],
                         capture_output=True, text=True)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert "no artifact with version 'nope'" in out.stderr
