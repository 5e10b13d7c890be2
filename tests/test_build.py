"""The build stage: a deterministic, versioned K-lingual dataset from sources + translations."""
import glob
import json
import os
import tarfile

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from klingual_fixtures import DECODE, MODEL, ensure_normalize, tiny_corpus, write_source, write_translations
from storage.build import build_dataset, plan_build, write_shard_group
from storage.catalog import Catalog
from storage.errors import CCRKError

ensure_normalize()
ARGS = dict(name="tiny", sources=["coco", "vg"], langs="en,es,ru", shard_size=2)


def _drops(result):
    return {(d["unit"], d["reason"], d["lang"]): d["count"] for d in result.drops}


def _shard_bytes(path):
    d = os.path.join(path, "shards")
    return {f: open(os.path.join(d, f), "rb").read() for f in sorted(os.listdir(d)) if f.endswith(".tar")}


def test_same_inputs_give_the_same_version_and_byte_identical_shards(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    tiny_corpus(a)
    tiny_corpus(b)
    ra, rb = build_dataset(a, **ARGS), build_dataset(b, **ARGS)
    assert ra.version == rb.version
    assert _shard_bytes(ra.path) == _shard_bytes(rb.path)
    assert list(_shard_bytes(ra.path)) == ["shard-00000.tar", "shard-00001.tar", "shard-00002.tar"]
    other = build_dataset(a, **{**ARGS, "seed": 1})
    assert other.version != ra.version


def test_building_again_is_a_noop_that_says_so(root):
    tiny_corpus(root)
    first = build_dataset(root, **ARGS)
    mtimes = {f: os.stat(os.path.join(first.path, "shards", f)).st_mtime_ns for f in _shard_bytes(first.path)}
    again = build_dataset(root, **ARGS)
    assert again.skipped and not first.skipped
    assert "already built" in again.message and "nothing to do" in again.message
    assert again.version == first.version and again.n_samples == first.n_samples == 5
    assert mtimes == {f: os.stat(os.path.join(first.path, "shards", f)).st_mtime_ns for f in mtimes}


def test_a_translation_part_rewritten_in_place_gives_a_new_version(root):
    """A translation set's content id is the sha256 of its parts, kept beside each part after the
    first build; a part rewritten with other translations -- same size, same mtime -- must still be
    seen as new input, not read back from that cache."""
    import time

    tiny_corpus(root)
    part = glob.glob(os.path.join(root, "translations", "**", "es", "part-00000.parquet"), recursive=True)[0]
    plain = dict(compression="NONE", use_dictionary=False, write_statistics=False)  # size set by the lengths
    pq.write_table(pq.read_table(part), part, **plain)
    first = build_dataset(root, **ARGS)
    assert os.path.exists(os.path.join(os.path.dirname(part), ".part-00000.parquet.sha256.json"))
    assert build_dataset(root, **ARGS).skipped
    st = os.stat(part)
    time.sleep(0.05)
    table = pq.read_table(part)
    tgt = table.column("tgt_text").to_pylist()
    table = table.set_column(table.schema.get_field_index("tgt_text"), "tgt_text",
                             pa.array([t.swapcase() for t in tgt]))
    pq.write_table(table, part, **plain)
    os.utime(part, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(part).st_size == st.st_size and os.stat(part).st_mtime_ns == st.st_mtime_ns
    again = build_dataset(root, **ARGS)
    assert not again.skipped and again.version != first.version


def test_every_drop_is_counted_by_reason(root):
    tiny_corpus(root)
    r = build_dataset(root, **ARGS)
    assert _drops(r) == {("image", "no_image", None): 1,          # coco-3 failed to download
                         ("image", "no_captions", None): 1,       # coco-4 has no caption
                         ("caption", "no_image", None): 1,        # coco-3's caption
                         ("caption", "missing_language", None): 1,  # 'a white circle' has no ru
                         ("translation", "missing", "ru"): 1}
    assert r.n_samples == 5 and r.captions_by_lang == {"en": 7, "es": 7, "ru": 7}


def test_drop_flagged_removes_not_ok_translations(root):
    tiny_corpus(root)
    r = build_dataset(root, **ARGS, drop_flagged=True)
    drops = _drops(r)
    assert drops[("translation", "flagged_translation", "es")] == 1   # 'two blue squares'
    assert drops[("caption", "flagged_translation", None)] == 1
    assert r.captions_by_lang == {"en": 6, "es": 6, "ru": 6}


def test_min_langs_keeps_captions_with_enough_languages(root):
    tiny_corpus(root)
    r = build_dataset(root, **ARGS, min_langs=2)
    assert ("caption", "missing_language", None) not in _drops(r)
    assert r.captions_by_lang == {"en": 8, "es": 8, "ru": 7}  # 'a white circle' kept with en+es
    strict = build_dataset(root, **ARGS, min_langs=3, drop_flagged=True)
    assert _drops(strict)[("caption", "below_min_langs", None)] == 2


def test_sample_layout_and_deterministic_tar_headers(root):
    tiny_corpus(root)
    r = build_dataset(root, **ARGS)
    samples = {}
    for name in sorted(os.listdir(os.path.join(r.path, "shards"))):
        if not name.endswith(".tar"):
            continue
        with tarfile.open(os.path.join(r.path, "shards", name)) as tar:
            members = tar.getmembers()
            names = [m.name for m in members]
            for i in range(0, len(names), 2):
                key = names[i][:-4]
                assert names[i:i + 2] == [f"{key}.jpg", f"{key}.json"] and "." not in key and "/" not in key
            for m in members:
                assert (m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) == (0, 0, 0, "", "", 0o644)
                if m.name.endswith(".json"):
                    samples[m.name[:-5]] = json.loads(tar.extractfile(m).read())
    assert sorted(samples) == ["coco-1", "coco-2", "coco-5", "vg-10", "vg-11"]
    vg = samples["vg-10"]
    assert vg["captions"] == [{"en": "a yellow star", "es": "ES a yellow star", "ru": "RU a yellow star"}]
    assert vg["boxes"] == [{"region_id": 1000, "x": 1, "y": 2, "w": 3, "h": 4}]
    assert (vg["source"], vg["image_key"], vg["url"]) == ("vg", "vg-10", "http://127.0.0.1:1/vg/10.jpg")
    assert "boxes" not in samples["coco-1"]
    assert samples["coco-1"]["captions"][0]["en"] == "a red circle"  # normalised whitespace


def test_unsafe_image_keys_never_make_paths(root):
    write_source(root, "coco", "c1", [{"id": "../../etc/pa.ss wd", "captions": ["a red circle"]},
                                      {"id": "ok", "captions": ["a blue square"]}])
    r = build_dataset(root, name="keys", sources=["coco"], langs="en", shard_size=10)
    with tarfile.open(os.path.join(r.path, "shards", "shard-00000.tar")) as tar:
        names = tar.getnames()
    assert len(names) == 4 and "coco-ok.jpg" in names
    for n in names:
        key = n.rsplit(".", 1)[0]
        assert "/" not in n and "." not in key and key.replace("_", "").replace("-", "").isalnum()


def test_a_build_leaves_no_source_mapped(root):
    from storage import shards as shards_module

    tiny_corpus(root)
    assert build_dataset(root, **ARGS).n_samples > 0
    assert not shards_module._MAPS


def test_truncated_source_image_counts_as_no_image(root):
    write_source(root, "coco", "c1", [{"id": 1, "captions": ["a red circle"]},
                                      {"id": 2, "captions": ["a blue square"], "truncate": True}])
    r = build_dataset(root, name="t", sources=["coco"], langs="en")
    assert r.n_samples == 1 and _drops(r)[("image", "no_image", None)] == 1


def test_a_killed_build_resumes_to_the_same_bytes(tmp_path):
    clean, killed = str(tmp_path / "clean"), str(tmp_path / "killed")
    tiny_corpus(clean)
    tiny_corpus(killed)
    plan = plan_build(killed, **ARGS)
    write_shard_group(plan.path, [1])                       # one shard finished before the kill
    open(os.path.join(plan.path, "shards", ".tmp-shard-00000.tar"), "wb").write(b"half")  # one half-written
    assert not os.path.exists(os.path.join(plan.path, "_COMPLETE"))
    resumed = build_dataset(killed, **ARGS)
    assert not resumed.skipped and resumed.version == plan.version
    assert _shard_bytes(resumed.path) == _shard_bytes(build_dataset(clean, **ARGS).path)
    assert not any(f.startswith(".tmp-") for f in os.listdir(os.path.join(resumed.path, "shards")))
    assert os.path.exists(os.path.join(resumed.path, "_COMPLETE"))


def test_a_build_killed_while_finishing_its_manifest_resumes(tmp_path):
    """The flow's finalize task adds the shard table to _build/manifest.partial.duckdb; killed
    before DuckDB checkpoints, it leaves that file's WAL behind. The resumed flow plans again (a new
    partial manifest) and finalizes: the old WAL must not be replayed into the new file (DuckDB:
    "WAL does not match database file"), and a WAL that does match must not break the finalize."""
    import subprocess
    import sys

    from storage.build import finalize_build

    clean, killed = str(tmp_path / "clean"), str(tmp_path / "killed")
    tiny_corpus(clean)
    tiny_corpus(killed)
    expected = _shard_bytes(build_dataset(clean, **ARGS).path)

    def plan_and_shards():
        plan = plan_build(killed, **ARGS)
        write_shard_group(plan.path, range(plan.n_shards))
        return plan

    def killed_finalize(partial):
        # What the finalize task had done when SIGKILLed: the shards table committed (to the WAL).
        code = ("import duckdb, os, signal; con = duckdb.connect(); "
                f"con.execute(\"ATTACH '{partial}' AS m\"); "
                "con.execute('CREATE TABLE m.shards AS SELECT 1 AS name'); "
                "os.kill(os.getpid(), signal.SIGKILL)")
        assert subprocess.run([sys.executable, "-c", code]).returncode == -9
        assert os.path.exists(partial + ".wal")

    plan = plan_and_shards()
    partial = os.path.join(plan.path, "_build", "manifest.partial.duckdb")
    killed_finalize(partial)
    plan = plan_and_shards()  # the resumed flow: plan task (a new partial manifest), shard tasks (all done)
    assert not os.path.exists(partial + ".wal")
    killed_finalize(partial)  # killed again, and this time resumed straight at the finalize
    r = finalize_build(plan.path)
    assert r.n_samples == 5 and _shard_bytes(r.path) == expected
    assert os.path.exists(os.path.join(r.path, "_COMPLETE"))


def test_manifest_indexes_and_catalog_record_lineage(root):
    from storage import layout
    from storage.catalog import Artifact
    tiny_corpus(root)
    Catalog(root).record(Artifact("tr1", "translation", f"{MODEL}/{DECODE}", layout.join(root, "translations", MODEL, DECODE),
                                  params={"min_uniformity": 0.5}, parents=["cocov1", "vgv1"]))
    r = build_dataset(root, **ARGS)
    con = duckdb.connect(os.path.join(r.path, "manifest.duckdb"), read_only=True)
    shards = con.execute("SELECT name, n_samples, bytes, sha256 FROM shards ORDER BY name").fetchall()
    lineage = con.execute("SELECT kind, name, value FROM lineage").fetchall()
    assert con.execute("SELECT count(*) FROM samples").fetchone()[0] == 5
    assert con.execute("SELECT count(*) FROM captions WHERE lang = 'es' AND model_id = ?", [MODEL]).fetchone()[0] == 7
    con.close()
    from storage.versioning import file_sha256
    for name, n, size, sha in shards:
        path = os.path.join(r.path, "shards", name)
        assert (os.path.getsize(path), file_sha256(path)) == (size, sha)
    assert ("source", "coco", "cocov1") in lineage and ("source", "vg", "vgv1") in lineage
    assert any(k == "translation" and n == "es" and MODEL in v and DECODE in v for k, n, v in lineage)
    sizes = json.load(open(os.path.join(r.path, "shards", "sizes.json")))
    assert sizes == {name: n for name, n, _, _ in shards}
    wids = json.load(open(os.path.join(r.path, "shards", "wids-index.json")))
    assert [(s["url"], s["nsamples"]) for s in wids["shardlist"]] == [(name, n) for name, n, _, _ in shards]
    art = Catalog(root).get(r.version)
    assert art.kind == "dataset" and art.path == r.path and set(art.parents) == {"cocov1", "vgv1", "tr1"}
    assert any(k == "translation_artifact" and "tr1" in v and "min_uniformity" in v for k, _, v in lineage)
    assert {a.version for _, a in Catalog(root).lineage(r.version)} == {r.version, "cocov1", "vgv1", "tr1"}
    assert art.stats["n_samples"] == 5


@pytest.mark.parametrize("steps", ["local", "parts"])
def test_a_build_killed_before_its_catalog_entry_gets_it_on_the_next_run(root, steps):
    """Killed after _COMPLETE but before the catalog entry (simulated: the entry deleted), the next
    build skips the work -- it is built -- and records the entry it would have written."""
    from storage import layout
    from storage.build import PartSteps
    from storage.catalog import Artifact
    tiny_corpus(root)
    Catalog(root).record(Artifact("tr1", "translation", f"{MODEL}/{DECODE}", layout.join(root, "translations", MODEL, DECODE),
                                  parents=["cocov1", "vgv1"]))
    first = build_dataset(root, **ARGS)
    recorded = Catalog(root).get(first.version)
    con = duckdb.connect(Catalog(root).path)
    con.execute("DELETE FROM artifacts WHERE version = ?", [first.version])
    con.execute("DELETE FROM parents WHERE child = ?", [first.version])
    con.close()
    assert Catalog(root).get(first.version) is None
    again = build_dataset(root, **ARGS, steps=PartSteps() if steps == "parts" else None)
    assert again.skipped and again.version == first.version
    assert {**again.as_dict(), "skipped": False, "message": ""} == {**first.as_dict(), "message": ""}
    art = Catalog(root).get(first.version)
    assert art is not None and art.created_at > recorded.created_at
    assert (art.kind, art.name, art.path, art.params, art.parents, art.stats) == (
        recorded.kind, recorded.name, recorded.path, recorded.params, recorded.parents, recorded.stats)
    assert set(art.parents) == {"cocov1", "vgv1", "tr1"} and art.stats["sources"] == {"coco": "cocov1", "vg": "vgv1"}
    build_dataset(root, **ARGS)  # recorded: a further skip leaves the entry as it is
    assert Catalog(root).get(first.version).created_at == art.created_at


def test_a_moved_root_builds_from_its_catalog(tmp_path):
    """The catalog names sources and translations relative to the root: a root moved (or copied,
    or mounted elsewhere) builds the same dataset again, a no-op, and builds new ones from there."""
    import shutil

    old, new = str(tmp_path / "old"), str(tmp_path / "new")
    tiny_corpus(old)
    first = build_dataset(old, **ARGS)
    shutil.move(old, new)
    again = build_dataset(new, **ARGS)
    assert again.skipped and again.version == first.version
    assert again.path == first.path.replace(old, new, 1)
    other = build_dataset(new, **{**ARGS, "name": "other", "langs": "en,es"})
    assert not other.skipped and other.n_samples == 5 and other.path.startswith(new + os.sep)


def test_missing_source_or_translations_is_one_clear_error(root):
    tiny_corpus(root)
    with pytest.raises(CCRKError, match="no source artifact 'sbu'"):
        build_dataset(root, **{**ARGS, "sources": ["coco", "sbu"]})
    with pytest.raises(CCRKError, match="no translations for tr"):
        build_dataset(root, **{**ARGS, "langs": "en,es,tr"})


def test_cli_build_runs_the_flow_and_prints_the_summary(root, capsys):
    from ccrk.app.cli import main

    tiny_corpus(root)
    argv = ["build", "--root", root, "--name", "cli", "--sources", "coco,vg", "--langs", "en,es,ru",
            "--shard-size", "2", "--shards-per-task", "2", "--source-version", "coco=cocov1"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "built dataset cli" in out and "drops by reason" in out and "missing_language" in out
    assert main(argv) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert main([*argv[:4], "cli2", *argv[5:], "--memory", "lots"]) != 0
    assert "build memory 'lots' (--memory or CCRK_BUILD_MEMORY) is not a DuckDB memory size" in capsys.readouterr().err
    assert os.environ.get("CCRK_BUILD_MEMORY") != "lots"  # --memory holds for its own build only


def test_flow_starts_shard_tasks_from_plan_parts_and_matches_the_in_process_build(tmp_path, monkeypatch):
    """The flow's shard tasks start from the parts the plan task hands out (here one shard each,
    several per task); its dataset is byte for byte the in-process build's, and no staging is left."""
    import flows.build as flow_module
    from flows.build import build_flow

    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    tiny_corpus(a)
    tiny_corpus(b)
    args = {**ARGS, "shard_size": 1}
    parts_seen = []
    real_shards_task = flow_module.shards_task

    class Recording:
        @staticmethod
        def submit(path, group, part=None, advance=None):
            parts_seen.append((tuple(group), part))
            return real_shards_task.submit(path, group, part, advance)

    monkeypatch.setattr(flow_module, "shards_task", Recording)
    flowed = build_flow({**args, "langs": args["langs"].split(","), "shards_per_task": 2}, root=a)
    local = build_dataset(b, **args)
    assert flowed["version"] == local.version and flowed["n_samples"] == local.n_samples == 5
    assert _shard_bytes(flowed["path"]) == _shard_bytes(local.path)
    assert sorted(s for group, _ in parts_seen for s in group) == list(range(5))
    assert all(len(group) <= 2 and part and "/_build/parts-" in part for group, part in parts_seen)
    assert sorted(os.listdir(flowed["path"])) == ["_COMPLETE", "manifest.duckdb", "shards"]
    tables = ("samples", "captions", "shards", "lang_counts", "drops")
    ca = duckdb.connect(os.path.join(flowed["path"], "manifest.duckdb"), read_only=True)
    cb = duckdb.connect(os.path.join(local.path, "manifest.duckdb"), read_only=True)
    try:
        for t in tables:
            assert ca.execute(f"SELECT * FROM {t}").fetchall() == cb.execute(f"SELECT * FROM {t}").fetchall(), t
    finally:
        ca.close()
        cb.close()


def test_planned_shard_writer_matches_the_reference_writer(tmp_path):
    """The build's fast writer (image bytes straight from the source tars, numpy headers) writes
    exactly the bytes KLingualShardWriter writes for the same samples; the tar index finds them."""
    from klingual_fixtures import make_jpeg
    from storage import shards as shards_module
    from storage.shards import (KLingualShardWriter, _tarinfo_header, index_source_tar, shard_layout,
                                ustar_headers, write_planned_shard)

    names, sizes = ["a.jpg", "k" * 95 + ".json", "x-1_2.jpg"], [0, 511, 8 ** 11 - 1]
    assert [h.tobytes() for h in ustar_headers(names, sizes)] == [_tarinfo_header(n, s) for n, s in zip(names, sizes)]
    src = str(tmp_path / "src.tar")
    with tarfile.open(src, "w", format=tarfile.USTAR_FORMAT) as tar:
        for i in range(30):
            # Image 0 is empty (no data block at all): layouts must not assume one.
            for name, blob in ((f"{i:09d}.jpg", make_jpeg(i) if i else b""), (f"{i:09d}.json", b"{}")):
                info = tarfile.TarInfo(name)
                info.size = len(blob)
                tar.addfile(info, __import__("io").BytesIO(blob))
    index = index_source_tar(src)
    assert len(index) == 30
    keys = [f"k-{i}" for i in range(30)][::-1]
    where = [index[f"{i:09d}"] for i in range(30)][::-1]
    metas = [json.dumps({"i": i, "t": "ü" * i}).encode() for i in range(30)]
    metas[3] = json.dumps({"t": "x" * 503}).encode()  # exactly one block: no padding after it
    assert len(metas[3]) == 512
    sizes = []
    for count in (3, 30):  # a shard of 3 ends off a 4 KiB block: the padded last O_DIRECT write is cut back
        ref = KLingualShardWriter(str(tmp_path / "ref.tar"))
        for key, (off, size), meta in zip(keys[:count], where[:count], metas[:count]):
            with open(src, "rb") as f:
                f.seek(off)
                ref.add(key, f.read(size), meta)
        ref_info = ref.close()
        sizes.append(ref_info.bytes)
        # Chunks of a few samples, samples each bigger than a chunk (one chunk each), and chunks
        # that end off a 4 KiB block (the O_DIRECT writer carries the partial block into the next
        # chunk); through O_DIRECT and through the page cache; with each chunk's images after the
        # first (the probe) copied from a mapping of the source, or each read.
        for direct, mapped in ((True, True), (True, False), (False, True)):
            for chunk_bytes in (4096, 1, 6000, 1 << 20):
                # The writer's buffer is kept for this thread's next shard: whatever the last one
                # left in it must not reach the file.
                kept = getattr(shards_module._BUFFERS, "buf", None)
                if kept is not None:
                    kept[:] = b"\xab" * len(kept)
                info = write_planned_shard(str(tmp_path / "fast.tar"), keys[:count], [src] * count,
                                           [w[0] for w in where[:count]], [w[1] for w in where[:count]],
                                           metas[:count], chunk_bytes=chunk_bytes, direct=direct, mapped=mapped)
                assert open(tmp_path / "fast.tar", "rb").read() == open(tmp_path / "ref.tar", "rb").read(), \
                    (count, direct, mapped, chunk_bytes)
                assert (info.bytes, info.sha256) == (ref_info.bytes, ref_info.sha256)
    assert sizes[0] % 4096
    # The mapped copies happened (the source is in the page cache here), through one mapping kept
    # for the process's next shard; dropping it leaves none.
    assert any(key[1] == os.stat(src).st_ino for key in shards_module._MAPS)
    shards_module.drop_source_maps()
    assert not shards_module._MAPS
    # The source tar out of the page cache: the first read misses (RWF_NOWAIT), and from then on
    # each chunk's images are asked for ahead; or asked for from the start; or never. Same bytes.
    for prefetch in (None, True, False):
        fd = os.open(src, os.O_RDONLY)
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
        info = write_planned_shard(str(tmp_path / "fast.tar"), keys, [src] * 30, [w[0] for w in where],
                                   [w[1] for w in where], metas, chunk_bytes=6000, prefetch=prefetch)
        assert open(tmp_path / "fast.tar", "rb").read() == open(tmp_path / "ref.tar", "rb").read(), prefetch
        assert info.sha256 == ref_info.sha256
    # An image half in the page cache: the page-cache read stops short and the rest is read from
    # the disk (into the right place).
    big_src, blob = str(tmp_path / "big.tar"), os.urandom(40_000)
    with tarfile.open(big_src, "w", format=tarfile.USTAR_FORMAT) as tar:
        info = tarfile.TarInfo("000000000.jpg")
        info.size = len(blob)
        tar.addfile(info, __import__("io").BytesIO(blob))
    off, size = index_source_tar(big_src)["000000000"]
    ref = KLingualShardWriter(str(tmp_path / "big-ref.tar"))
    ref.add("big", blob, b"{}")
    ref.close()
    fd = os.open(big_src, os.O_RDONLY)
    os.fsync(fd)
    os.preadv(fd, [bytearray(size)], off)
    os.posix_fadvise(fd, (off // 4096 + 2) * 4096, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    write_planned_shard(str(tmp_path / "big.out.tar"), ["big"], [big_src], [off], [size], [b"{}"])
    assert open(tmp_path / "big.out.tar", "rb").read() == open(tmp_path / "big-ref.tar", "rb").read()
    with open(src, "r+b") as f:  # a source cut short inside an image: a clear error either way
        f.truncate(where[0][0] + where[0][1] // 2)  # where[0]: the tar's last image
    for prefetch in (None, True):
        with pytest.raises(ValueError, match="is truncated"):
            write_planned_shard(str(tmp_path / "cut.tar"), keys[:1], [src], [where[0][0]], [where[0][1]],
                                metas[:1], prefetch=prefetch)
    # The cut image second in its chunk: after a probe that finds the first in memory, it would be
    # copied from the mapping (which ends where the file does).
    for mapped in (True, False):
        with pytest.raises(ValueError, match="is truncated"):
            write_planned_shard(str(tmp_path / "cut.tar"), keys[:2], [src] * 2, [where[1][0], where[0][0]],
                                [where[1][1], where[0][1]], metas[:2], mapped=mapped)
    starts, total = shard_layout([w[1] for w in where], [len(m) for m in metas])
    assert total == ref_info.bytes and [int(s) + 512 for s in starts[:-1]] == [m.jpg_offset for m in ref_info.members]


def _fs_type(path: str) -> str:
    """The filesystem type /proc/mounts gives for ``path`` (its longest mount point)."""
    best, kind = "", ""
    with open("/proc/mounts") as f:
        for line in f:
            _, mnt, fs = line.split()[:3]
            if (path + "/").startswith(mnt.rstrip("/") + "/") and len(mnt) >= len(best):
                best, kind = mnt, fs
    return kind


def test_a_refused_direct_write_goes_through_the_page_cache(tmp_path):
    """A write O_DIRECT cannot take (here a buffer off any block boundary) switches O_DIRECT off
    and writes every byte anyway; a filesystem refusing O_DIRECT at open gets a plain fd."""
    import mmap

    from storage.shards import _open_output, _write_all

    data = bytes(range(256)) * 41
    buf = mmap.mmap(-1, 3 * 4096)
    buf[1:1 + len(data)] = data
    fd, direct = _open_output(str(tmp_path / "f"), True)
    try:
        still = _write_all(fd, memoryview(buf)[1:1 + len(data)], direct)
    finally:
        os.close(fd)
    assert open(tmp_path / "f", "rb").read() == data
    if _fs_type(str(tmp_path)) in ("ext4", "xfs", "btrfs"):  # they refuse a misaligned buffer
        assert direct and not still
    fd, direct = _open_output(str(tmp_path / "g"), False)
    os.close(fd)
    assert not direct


def test_catalog_calls_through_the_build_engine_see_the_same_artifacts(root):
    from storage.catalog import Artifact
    engine = duckdb.connect()
    try:
        Catalog(root, engine).record(Artifact("v1", "source", "coco", "/x", params={"a": 1}))
        Catalog(root).record(Artifact("v2", "dataset", "d", "/y", parents=["v1"]))
        assert [a.version for a in Catalog(root, engine).list()] == [a.version for a in Catalog(root).list()]
        assert Catalog(root, engine).get("v2").parents == ["v1"] and Catalog(root, engine).latest("source", "coco").params == {"a": 1}
        assert engine.execute("SELECT count(*) FROM duckdb_databases() WHERE NOT internal").fetchall()[0][0] == 1
    finally:
        engine.close()


def test_captions_find_their_translations_under_every_whitespace_and_unicode_form(root):
    """The build normalises printable-ASCII captions in SQL and the rest with storage.versioning.normalize;
    either way a caption's key must be the translation store's (text_sha of normalize(text))."""
    from storage.versioning import normalize

    captions = ["  a red   circle ", "a blue\tsquare", "a green\u00a0star", "un caf\u00e9  noir", "e\u0301tude bleue",
                "plain caption", "tab\t and  spaces\n"]
    write_source(root, "coco", "ws", [{"id": i, "captions": [c]} for i, c in enumerate(captions)])
    write_translations(root, MODEL, DECODE, "es", {c: (f"es {i}", True) for i, c in enumerate(captions)})
    r = build_dataset(root, name="ws", sources=["coco"], langs="en,es", shard_size=10)
    assert r.n_samples == len(captions) and not _drops(r)
    got = {}
    with tarfile.open(os.path.join(r.path, "shards", "shard-00000.tar")) as tar:
        for m in tar.getmembers():
            if m.name.endswith(".json"):
                cap = json.load(tar.extractfile(m))["captions"][0]
                got[cap["en"]] = cap["es"]
    assert got == {normalize(c): f"es {i}" for i, c in enumerate(captions)}


def test_sample_json_is_pythons_formatting_even_with_control_characters(root):
    """Sample json is made by SQL (to_json), which writes some control-character escapes in upper-case
    hex; such json is redone in Python, so every sample's bytes are json.dumps(sort_keys, compact,
    ensure_ascii=False) of its content -- the plain captions' and the escaped ones' alike."""
    captions = ["a red circle", "a blue square", "a green star", "a black dot"]
    es = {"a red circle": "rojo\x1f", "a blue square": "azul\x01\x7f", "a green star": "verde \\u00e9",
          "a black dot": "negro"}
    write_source(root, "coco", "ctl", [{"id": i, "captions": [c]} for i, c in enumerate(captions)])
    write_translations(root, MODEL, DECODE, "es", {c: (t, True) for c, t in es.items()})
    r = build_dataset(root, name="ctl", sources=["coco"], langs="en,es", shard_size=10)
    assert r.n_samples == len(captions)
    seen = {}
    with tarfile.open(os.path.join(r.path, "shards", "shard-00000.tar")) as tar:
        for m in tar.getmembers():
            if m.name.endswith(".json"):
                raw = tar.extractfile(m).read()
                meta = json.loads(raw)
                assert raw == json.dumps(meta, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode()
                seen[meta["captions"][0]["en"]] = meta["captions"][0]["es"]
    assert seen == es


def test_several_translation_sets_follow_the_chosen_preference_and_it_is_in_the_version(root):
    """Two sets translate the same captions into es: an ok translation wins over a flagged one,
    then the preferred set (sorted ids by default, else the --translations order); the preference
    is part of the version, so building with the other order is not mistaken for a no-op."""
    captions = ["a red circle", "a blue square", "a green star"]
    write_source(root, "coco", "sets", [{"id": i, "captions": [c]} for i, c in enumerate(captions)])
    write_translations(root, "mA", "d", "es", {"a red circle": ("A rojo", True), "a blue square": ("A azul", False),
                                               "a green star": ("A verde", True)})
    write_translations(root, "mB", "d", "es", {"a red circle": ("B rojo", True), "a blue square": ("B azul", True)})
    args = dict(name="sets", sources=["coco"], langs="en,es", shard_size=10)

    def es_of(result):
        with tarfile.open(os.path.join(result.path, "shards", "shard-00000.tar")) as tar:
            metas = [json.load(tar.extractfile(m)) for m in tar.getmembers() if m.name.endswith(".json")]
        return {m["captions"][0]["en"]: m["captions"][0]["es"] for m in metas}

    default = build_dataset(root, **args)
    assert es_of(default) == {"a red circle": "A rojo", "a blue square": "B azul", "a green star": "A verde"}
    b_first = build_dataset(root, **args, translations=["mB/d", "mA/d"])
    assert not b_first.skipped and b_first.version != default.version
    assert es_of(b_first) == {"a red circle": "B rojo", "a blue square": "B azul", "a green star": "A verde"}
    assert build_dataset(root, **args, translations=["mA/d", "mB/d"]).version == default.version
    con = duckdb.connect(os.path.join(b_first.path, "manifest.duckdb"), read_only=True)
    try:
        assert con.execute("SELECT model_id FROM translation_sets ORDER BY set_rank").fetchall() == [("mB",), ("mA",)]
    finally:
        con.close()


def test_a_text_translated_twice_in_one_set_keeps_one_translation(root):
    """A set whose parts translate a text twice (a re-run, an import): the caption still gets one
    translation -- an ok one over a flagged one, else the first by text -- and one sample."""
    captions = ["a red circle", "a blue square"]
    write_source(root, "coco", "dup", [{"id": i, "captions": [c]} for i, c in enumerate(captions)])
    write_translations(root, MODEL, DECODE, "es", {"a red circle": ("rojo malo", False), "a blue square": ("azul b", True)})
    write_translations(root, MODEL, DECODE, "es", {"a red circle": ("rojo", True), "a blue square": ("azul a", True)},
                       part=1)
    r = build_dataset(root, name="dup", sources=["coco"], langs="en,es", shard_size=10, drop_flagged=True)
    assert r.n_samples == 2 and r.captions_by_lang == {"en": 2, "es": 2} and not _drops(r)
    with tarfile.open(os.path.join(r.path, "shards", "shard-00000.tar")) as tar:
        metas = [json.load(tar.extractfile(m)) for m in tar.getmembers() if m.name.endswith(".json")]
    assert sorted(c["es"] for m in metas for c in m["captions"]) == ["azul a", "rojo"]


def test_manifest_captions_view_lists_every_kept_caption_language_of_the_shards(root):
    """The manifest keeps one row per caption (caption_texts) and a ``captions`` view with one row
    per caption and language: exactly the texts the shards' json carry, under any attach name."""
    tiny_corpus(root)
    r = build_dataset(root, **{**ARGS, "min_langs": 2})  # some captions keep two of the three languages
    want = []
    for name in sorted(os.listdir(os.path.join(r.path, "shards"))):
        if name.endswith(".tar"):
            with tarfile.open(os.path.join(r.path, "shards", name)) as tar:
                for m in tar.getmembers():
                    if m.name.endswith(".json"):
                        for ci, cap in enumerate(json.loads(tar.extractfile(m).read())["captions"]):
                            want += [(m.name[:-5], ci, lang, text) for lang, text in cap.items()]
    assert {lang for _, _, lang, _ in want} == {"en", "es", "ru"}
    assert any(len({w[2] for w in want if w[:2] == key[:2]}) == 2 for key in want)  # a caption lacking one
    con = duckdb.connect()
    con.execute(f"ATTACH '{os.path.join(r.path, 'manifest.duckdb')}' AS another_name (READ_ONLY)")
    rows = con.execute("SELECT key, caption_index, lang, text, model_id, ok FROM another_name.captions").fetchall()
    assert [row[:4] for row in rows] == sorted(want)
    assert all((model, ok) == ("source", True) for _, _, lang, _, model, ok in rows if lang == "en")
    assert all(model == MODEL for _, _, lang, _, model, _ in rows if lang != "en")
    counts = dict(con.execute("SELECT lang, captions FROM another_name.lang_counts").fetchall())
    assert counts == {lang: sum(w[2] == lang for w in want) for lang in ("en", "es", "ru")}
    assert r.captions_by_lang == counts


def test_manifest_draft_in_scratch_space_is_cleaned_up_and_optional(root, monkeypatch, tmp_path):
    """The in-process build drafts its manifest in scratch space (a memory filesystem) and copies it
    into the dataset at the end: nothing of it stays behind, a draft left by a dead build is
    removed, and without usable scratch space the draft goes beside the shards instead."""
    from storage import manifest

    scratch = tmp_path / "shm"
    scratch.mkdir()
    monkeypatch.setattr(manifest, "SCRATCH_DIR", str(scratch))
    dead = 2 ** 22 + 12345  # above any pid this machine hands out
    stale = scratch / f"ccrk-manifest-{dead}-abc.duckdb"
    stale.write_bytes(b"left by a killed build")
    (scratch / "someone-elses-file").write_bytes(b"x")
    used = []
    real = manifest.scratch_draft_path
    monkeypatch.setattr(manifest, "scratch_draft_path", lambda n: used.append(real(n)) or used[-1])
    tiny_corpus(root)
    r = build_dataset(root, **ARGS)
    assert used and used[0].startswith(str(scratch))
    assert sorted(os.listdir(scratch)) == ["someone-elses-file"]
    con = duckdb.connect(os.path.join(r.path, "manifest.duckdb"), read_only=True)
    assert con.execute("SELECT count(*) FROM samples").fetchone()[0] == r.n_samples == 5
    con.close()

    monkeypatch.setattr(manifest, "SCRATCH_DIR", str(tmp_path / "missing"))
    other = build_dataset(root, **{**ARGS, "seed": 1})
    assert used[-1] is None and other.n_samples == 5
    assert manifest.summary(other.path)["n_samples"] == 5


def _manifest_rows(path, tables=("samples", "caption_texts", "captions", "shards", "lang_counts", "drops")):
    con = duckdb.connect(os.path.join(path, "manifest.duckdb"), read_only=True)
    try:
        return {t: con.execute(f"SELECT * FROM {t}").fetchall() for t in tables}
    finally:
        con.close()


def test_plan_in_draw_buckets_with_spilling_gives_the_same_dataset(tmp_path, monkeypatch):
    """A plan cut into buckets of the seeded order (here one kept caption each) under a small DuckDB
    memory limit writes the same shards, plan and manifest as one bucket: bucket size only bounds
    memory."""
    import pyarrow.parquet as pq

    import storage.build_assemble as build_module

    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    tiny_corpus(a)
    tiny_corpus(b)
    counts = []
    real = build_module._draw_buckets

    def spy(n_rows, bucket_rows, **kw):
        out = real(n_rows, bucket_rows, **kw)
        counts.append(len(out))
        return out

    monkeypatch.setattr(build_module, "_draw_buckets", spy)
    whole = build_dataset(a, **ARGS)
    whole_plan = pq.read_table(os.path.join(plan_build(a, **{**ARGS, "name": "p"}).path, "_build", "plan.parquet"))
    monkeypatch.setenv("CCRK_PLAN_BUCKET_ROWS", "1")
    monkeypatch.setenv("CCRK_BUILD_MEMORY", "64MB")
    cut = build_dataset(b, **ARGS)
    cut_plan = pq.read_table(os.path.join(plan_build(b, **{**ARGS, "name": "p"}).path, "_build", "plan.parquet"))
    assert counts == [1, 1, 7, 7]  # 7 kept captions
    assert cut.version == whole.version and cut.n_samples == whole.n_samples == 5
    assert _shard_bytes(cut.path) == _shard_bytes(whole.path)
    assert _manifest_rows(cut.path) == _manifest_rows(whole.path)
    assert cut_plan.drop(["tar_path"]).equals(whole_plan.drop(["tar_path"]))
    assert [os.path.relpath(t, b) for t in cut_plan.column("tar_path").to_pylist()] == \
        [os.path.relpath(t, a) for t in whole_plan.column("tar_path").to_pylist()]
    assert not os.path.exists(os.path.join(cut.path, "_build"))  # the spill directory went with the staging


def test_a_lead_bucket_changes_nothing_but_when_the_first_shards_start(tmp_path, monkeypatch):
    """The plan's first bucket holds about three shards' samples (then a ramp) so that writing
    starts early; the dataset is the one a single bucket gives, byte for byte."""
    import storage.build_assemble as build_module

    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    images = [{"id": i, "captions": [f"a red circle {i}"] + ([f"a blue square {i}"] if i % 3 else [])}
              for i in range(80)]
    for root in (a, b):
        write_source(root, "coco", "lead", images)
        write_translations(root, MODEL, DECODE, "es", {c: (f"es {c}", True) for im in images for c in im["captions"]})
    args = dict(name="lead", sources=["coco"], langs="en,es", shard_size=3)
    real, seen = build_module._draw_buckets, []

    def spy(n_rows, bucket_rows, lead_rows=0):
        seen.append(lead_rows)
        return real(n_rows, bucket_rows, lead_rows)

    monkeypatch.setattr(build_module, "_draw_buckets", spy)
    led = build_dataset(a, **args)
    assert 2 * seen[-1] < 133 and len(real(133, 100_000, seen[-1])) >= 2  # 133 kept captions: a ramp of buckets
    monkeypatch.setattr(build_module, "_draw_buckets", lambda n_rows, bucket_rows, lead_rows=0: real(n_rows, bucket_rows))
    whole = build_dataset(b, **args)
    assert led.version == whole.version and led.n_samples == whole.n_samples == 80
    assert _shard_bytes(led.path) == _shard_bytes(whole.path)
    assert _manifest_rows(led.path) == _manifest_rows(whole.path)


def test_the_planner_queues_a_whole_bucket_of_shards_and_waits_before_the_next():
    """The in-process build's shard queue never blocks the planner within a bucket (it goes on to
    the next chunk, the drop counts and the manifest draft while shards are written); before the
    next bucket it waits until at most ``backlog`` shards are not yet written."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import pyarrow as pa

    from storage.build import ShardQueue

    gate, written, writing = threading.Event(), [], []

    def write(sid, rows):
        gate.wait(10)
        written.append((sid, rows.num_rows))

    with ThreadPoolExecutor(2) as pool:
        def on_ready():
            for (sid,), rows in queue.take():
                writing.append(pool.submit(write, sid, rows))
                writing[-1].add_done_callback(queue.written)

        queue = ShardQueue(shard_size=2, on_ready=on_ready, backlog=1)
        call = threading.Thread(target=queue, args=("/nowhere", pa.table({"shard": [0, 0, 1, 1, 2, 2, 3]}), False))
        call.start()
        call.join(5)
        assert not call.is_alive() and len(writing) == 3  # shards 0-2 handed out at once; 3 waits for its other sample
        wait = threading.Thread(target=queue.next_bucket)
        wait.start()
        wait.join(0.3)
        assert wait.is_alive()  # 3 not written > backlog 1
        gate.set()
        wait.join(5)
        assert not wait.is_alive()
        queue("/nowhere", pa.table({"shard": [3]}), True)
        for f in writing:
            f.result()
    assert sorted(written) == [(0, 2), (1, 2), (2, 2), (3, 2)]


def test_steps_that_share_only_files_build_the_same_dataset(tmp_path):
    """build_dataset is the one orchestration: with PartSteps (what the flow's tasks run: part files,
    several shards per write step, the manifest draft on disk) it builds, byte for byte, the dataset
    the in-process steps build; the flow's FlowSteps are these steps as Prefect tasks."""
    from storage.build import PartSteps

    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    tiny_corpus(a)
    tiny_corpus(b)
    args = {**ARGS, "shard_size": 1}
    counted = []
    parted = build_dataset(a, **args, steps=PartSteps(shards_per_task=2, progress=counted.append))
    local = build_dataset(b, **args)
    assert parted.version == local.version and parted.n_samples == local.n_samples == 5 and sum(counted) == 5
    assert _shard_bytes(parted.path) == _shard_bytes(local.path)
    assert _manifest_rows(parted.path) == _manifest_rows(local.path)
    assert sorted(os.listdir(parted.path)) == ["_COMPLETE", "manifest.duckdb", "shards"]
    assert build_dataset(a, **args, steps=PartSteps()).skipped


def test_draw_buckets_cut_the_md5_range_in_order():
    from storage.build_assemble import _draw_buckets

    con = duckdb.connect()
    con.execute("CREATE TABLE i AS SELECT md5(CAST(range AS VARCHAR)) AS draw FROM range(20000)")
    for n_rows, per, expect in ((10, 100, 1), (1000, 100, 10), (10 ** 9, 1, 4096)):
        buckets = _draw_buckets(n_rows, per)
        assert len(buckets) == expect
        parts = [con.execute(f"SELECT min(draw), max(draw), count(*) FROM i WHERE true{w}").fetchall()[0]
                 for w in buckets]
        assert sum(p[2] for p in parts) == 20000  # every draw in exactly one bucket
        non_empty = [p for p in parts if p[2]]
        assert all(x[1] < y[0] for x, y in zip(non_empty, non_empty[1:]))  # in draw order
        if expect == 10:
            assert all(1700 <= p[2] <= 2300 for p in parts)  # an md5 spreads evenly
    # A ramp first -- about 1,000 rows, then 4 times more each -- while a bucket is under the
    # bucket size and under half of what is left; then the rest as before.
    for n_rows, per, lead, ramp, expect in ((20000, 100_000, 1000, [1000, 4000], 3), (20000, 5000, 1000, [1000, 4000], 6),
                                            (20000, 100_000, 12000, [], 1), (20000, 1500, 1000, [1000], 14),
                                            (20000, 100_000, 0, [], 1)):
        buckets = _draw_buckets(n_rows, per, lead_rows=lead)
        assert len(buckets) == expect, (n_rows, per, lead)
        parts = [con.execute(f"SELECT min(draw), max(draw), count(*) FROM i WHERE true{w}").fetchall()[0]
                 for w in buckets]
        assert sum(p[2] for p in parts) == 20000
        assert all(x[1] < y[0] for x, y in zip(parts, parts[1:]))
        for want, p in zip(ramp, parts):
            assert 0.8 * want <= p[2] <= 1.2 * want, (n_rows, per, lead, parts)
        assert all(p[2] <= 1.2 * per for p in parts)


def test_two_images_with_one_sample_key_is_a_clear_error(root, monkeypatch):
    """An unsafe image key is cleaned and given a hash; an image whose raw key is exactly that
    cleaned name collides with it -- caught whether they fall in one chunk of the plan or not."""
    import hashlib

    digest = hashlib.sha1(b"coco-a b").hexdigest()[:10]
    write_source(root, "coco", "c1", [{"id": "a b", "captions": ["a red circle"]},
                                      {"id": f"a_b-{digest}", "captions": ["a blue square"]},
                                      {"id": "c", "captions": ["a green star"]}])
    with pytest.raises(CCRKError, match=f"two images map to the sample key 'coco-a_b-{digest}'"):
        build_dataset(root, name="k", sources=["coco"], langs="en", shard_size=10)
    monkeypatch.setenv("CCRK_PLAN_BUCKET_ROWS", "1")
    with pytest.raises(CCRKError, match=f"two images map to the sample key 'coco-a_b-{digest}'.*image keys must be unique"):
        build_dataset(root, name="k", sources=["coco"], langs="en", shard_size=1)


def test_build_memory_setting_is_checked(root, monkeypatch):
    tiny_corpus(root)
    monkeypatch.setenv("CCRK_BUILD_MEMORY", "lots")
    with pytest.raises(CCRKError, match=r"build memory 'lots' \(--memory or CCRK_BUILD_MEMORY\) is not a DuckDB memory size"):
        build_dataset(root, **ARGS)
    monkeypatch.setenv("CCRK_BUILD_MEMORY", "")
    monkeypatch.setenv("CCRK_PLAN_BUCKET_ROWS", "many")
    with pytest.raises(CCRKError, match="CCRK_PLAN_BUCKET_ROWS='many' is not a whole number"):
        build_dataset(root, **ARGS)


def test_build_progress_gets_the_sample_total_before_the_shards(root):
    """``ccrk build``'s progress bar learns the number of samples from the plan task, then counts
    the written ones up to it."""
    from contextlib import contextmanager

    from flows.build import build_flow

    tiny_corpus(root)
    events = []

    @contextmanager
    def progress(description, total, unit):  # a storage.progress.Progress, as the command line's bar
        def advance(n=1):
            events.append(("advance", n))

        advance.set_total = lambda n: events.append(("total", n))
        yield advance

    result = build_flow({**ARGS, "langs": ARGS["langs"].split(","), "shards_per_task": 1}, root=root,
                        progress=progress)
    assert result["n_samples"] == 5
    assert events[0] == ("total", 5)
    assert sum(n for kind, n in events if kind == "advance") == 5


def test_a_root_with_glob_characters_finds_its_images_and_translations(tmp_path):
    """A data root named like ``br[1]``: every file search below it escapes the root, so its source
    tars, translation parts and staged shards are found as under any other name."""
    root = str(tmp_path / "br[1]" / "data")
    captions = [f"a red circle number {i}" for i in range(3)]
    write_source(root, "coco", "c1", [{"id": i, "captions": [c]} for i, c in enumerate(captions)])
    write_translations(root, MODEL, DECODE, "es", {c: (f"es {i}", True) for i, c in enumerate(captions)})
    built = build_dataset(root, name="globby", sources=["coco"], langs="en,es")
    assert built.n_samples == 3 and built.captions_by_lang == {"en": 3, "es": 3}
