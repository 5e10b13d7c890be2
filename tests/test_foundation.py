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


def test_catalog_paths_follow_a_moved_root(tmp_path):
    """Paths under the root are stored relative to it, so a root moved elsewhere keeps working;
    a catalog written with absolute paths (before that) finds its artifacts under the new root."""
    import os
    import shutil

    import duckdb

    old, new = str(tmp_path / "old"), str(tmp_path / "new")
    inside = layout.source_dir(old, "coco", "v1")
    os.makedirs(inside)
    cat = Catalog(old)
    cat.record(Artifact("v1", "source", "coco", inside))
    cat.record(Artifact("x1", "dataset", "elsewhere", str(tmp_path / "outside"), parents=["v1"]))
    con = duckdb.connect(cat.path)
    stored = dict(con.execute("SELECT version, path FROM artifacts").fetchall())
    # A record from before relative paths: absolute, under the old root.
    con.execute("INSERT INTO artifacts (version, kind, name, path) VALUES ('v0', 'source', 'vg', ?)",
                [layout.source_dir(old, "vg", "v0")])
    con.close()
    os.makedirs(layout.source_dir(old, "vg", "v0"))
    assert stored == {"v1": "sources/coco/v1", "x1": str(tmp_path / "outside")}
    assert cat.get("v1").path == inside

    shutil.move(old, new)
    moved = Catalog(new)
    assert moved.get("v1").path == layout.source_dir(new, "coco", "v1")
    assert moved.get("v0").path == layout.source_dir(new, "vg", "v0")
    assert moved.get("x1").path == str(tmp_path / "outside")  # outside the root: kept as recorded
    assert [a.path for _, a in moved.lineage("x1")][1] == layout.source_dir(new, "coco", "v1")
    assert layout.rooted(new, layout.join(new, "benchmarks", "demo")) == "benchmarks/demo"
    assert layout.rooted(new, new) == new and layout.rooted(new, str(tmp_path)) == str(tmp_path)
    assert layout.rooted(new, new + "-other") == new + "-other"


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
    out = subprocess.run([sys.executable, "-m", "ccrk.app.cli", "lineage", "nope", "--root", root],
                         capture_output=True, text=True)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert "no artifact with version 'nope'" in out.stderr


def test_a_failed_flow_run_is_one_sentence_too(root):
    """A stage that fails inside its Prefect flow: the run log keeps one line per failed run
    (no traceback), and nothing else follows the error (DuckDB's bindings listed every object the
    failed task's frames still held at exit as a leak, dozens of lines)."""
    out = subprocess.run([sys.executable, "-m", "ccrk.app.cli", "build", "--root", root, "--name", "x",
                          "--sources", "coco", "--langs", "en,es"], capture_output=True, text=True)
    assert out.returncode == 2
    error = "ccrk build: error: no source artifact 'coco' in the catalog"
    assert error in out.stderr and "Task run failed with exception: CCRKError" in out.stderr
    assert "Traceback" not in out.stderr + out.stdout and "leaked" not in out.stderr
    assert out.stderr.rstrip().splitlines()[-1].startswith(error)
