"""`ccrk verify`: every fault kind is caught and named; a clean dataset exits 0."""
import os
import shutil

import pytest

from ccrk.app.cli import main
from klingual_fixtures import ensure_normalize, tiny_corpus
from storage.build import build_dataset
from storage.shards import KLingualShardWriter
from storage.verify import verify_dataset

ensure_normalize()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("verify"))
    tiny_corpus(root)
    return build_dataset(root, name="tiny", sources=["coco", "vg"], langs="en,es,ru", shard_size=2).path


@pytest.fixture
def ds(built, tmp_path):
    """A private copy of the built dataset to damage."""
    return shutil.copytree(built, str(tmp_path / "ds"))


def shard(ds, i=1):
    return os.path.join(ds, "shards", f"shard-{i:05d}.tar")


def test_clean_dataset_verifies_with_exit_zero(ds, capsys):
    report = verify_dataset(ds)
    assert report.ok and report.n_shards == 3 and report.n_samples == 5
    assert main(["verify", ds]) == 0
    assert "ok: 3 shards, 5 samples" in capsys.readouterr().out


def test_missing_shard(ds):
    os.unlink(shard(ds))
    assert verify_dataset(ds).kinds() == {"missing_shard"}
    assert main(["verify", ds]) == 1


def test_unexpected_shard_and_leftover_temp_file(ds):
    shutil.copy(shard(ds), shard(ds, 7))
    open(os.path.join(ds, "shards", ".tmp-shard-00009.tar"), "wb").write(b"x")
    report = verify_dataset(ds)
    assert report.kinds() == {"unexpected_shard"}
    assert {p.shard for p in report.problems} == {"shard-00007.tar", ".tmp-shard-00009.tar"}
    assert main(["verify", ds]) == 1


def test_truncated_shard(ds):
    size = os.path.getsize(shard(ds))
    with open(shard(ds), "r+b") as f:
        f.truncate(700)
    assert size > 700
    assert "truncated" in verify_dataset(ds).kinds()
    assert main(["verify", ds]) == 1


def test_corrupted_tar_header(ds):
    with open(shard(ds), "r+b") as f:
        f.seek(100)                      # inside the first member's header (mode/uid/checksum)
        f.write(b"\xff" * 60)
    kinds = verify_dataset(ds).kinds()
    assert "corrupted" in kinds and "sha256_mismatch" in kinds
    assert main(["verify", ds]) == 1


def test_corrupted_image_bytes(ds):
    from storage.manifest import connect
    con = connect(ds)
    off, size = con.execute("SELECT jpg_offset, jpg_size FROM samples WHERE shard = 'shard-00001.tar' "
                            "ORDER BY idx LIMIT 1").fetchone()
    con.close()
    with open(shard(ds), "r+b") as f:
        f.seek(off)
        f.write(b"\x00" * size)        # same size, no longer a jpeg
    report = verify_dataset(ds)
    assert report.kinds() == {"corrupted", "sha256_mismatch"}
    assert "image does not decode" in next(p.detail for p in report.problems if p.kind == "corrupted")


def test_sha256_mismatch_alone(ds):
    with open(shard(ds), "rb") as f:
        data = bytearray(f.read())
    data[-1] = 1                        # the end-of-archive padding: still a valid tar
    with open(shard(ds), "wb") as f:
        f.write(bytes(data))
    assert verify_dataset(ds).kinds() == {"sha256_mismatch"}
    assert verify_dataset(ds, deep=False).kinds() == {"sha256_mismatch"}


def test_sample_count_mismatch(ds):
    import tarfile
    with tarfile.open(shard(ds)) as tar:
        first = tar.getmembers()[:2]
        jpg, meta = (tar.extractfile(m).read() for m in first)
    w = KLingualShardWriter(shard(ds))
    w.add(first[0].name[:-4], jpg, meta)  # the shard rewritten with one of its two samples
    w.close()
    kinds = verify_dataset(ds).kinds()
    assert "sample_count_mismatch" in kinds and "sha256_mismatch" in kinds


def test_incomplete_build_and_stale_index(ds):
    os.unlink(os.path.join(ds, "_COMPLETE"))
    with open(os.path.join(ds, "shards", "sizes.json"), "w") as f:
        f.write("{}")
    assert verify_dataset(ds).kinds() == {"incomplete", "index_mismatch"}


def test_not_a_dataset_is_a_clear_error(tmp_path, capsys):
    assert main(["verify", str(tmp_path)]) == 2
    assert "no manifest.duckdb" in capsys.readouterr().err


def test_rebuild_repairs_a_damaged_version(built, tmp_path):
    from storage.catalog import Catalog
    root = os.path.dirname(os.path.dirname(os.path.dirname(built)))
    os.unlink(shard(built, 2))
    again = build_dataset(root, name="tiny", sources=["coco", "vg"], langs="en,es,ru", shard_size=2)
    assert not again.skipped and again.path == built
    assert verify_dataset(built).ok
    assert Catalog(root).get(again.version) is not None


def test_a_jpeg_cut_short_inside_its_scan_does_not_decode(ds):
    """Verify decodes JPEGs at 1/8 scale; the whole entropy-coded stream is still read, so an image
    cut short inside its scan data is caught."""
    import tarfile
    with tarfile.open(shard(ds)) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    w = KLingualShardWriter(shard(ds))
    for (jpg_name, jpg), (_, meta) in zip(members[::2], members[1::2]):
        w.add(jpg_name[:-4], jpg[: len(jpg) * 2 // 3] if jpg_name == members[0][0] else jpg, meta)
    w.close()
    report = verify_dataset(ds)
    assert "corrupted" in report.kinds()
    assert "image does not decode" in next(p.detail for p in report.problems if p.kind == "corrupted")


def test_workers_check_shards_at_once_and_report_in_shard_order(ds, capsys):
    """Faults in several shards: the same problems, in the same order, with one worker or three;
    progress counts every shard once."""
    os.unlink(shard(ds, 0))
    with open(shard(ds, 2), "r+b") as f:
        f.truncate(700)
    with open(shard(ds, 1), "rb") as f:
        data = bytearray(f.read())
    data[-1] = 1
    with open(shard(ds, 1), "wb") as f:
        f.write(bytes(data))
    seen = []
    reports = [verify_dataset(ds, workers=w, progress=seen.append) for w in (1, 3)]
    as_rows = [[(p.kind, p.shard) for p in r.problems] for r in reports]
    assert as_rows[0] == as_rows[1]
    assert [s for _, s in as_rows[0]] == sorted(s for _, s in as_rows[0])  # shard order
    assert {k for k, _ in as_rows[0]} >= {"missing_shard", "sha256_mismatch", "truncated"}
    assert reports[0].bytes_read == reports[1].bytes_read and len(seen) == 2 * 3
    assert main(["verify", ds, "--workers", "2"]) == 1
    assert main(["verify", ds, "--workers", "0"]) == 2
    assert "--workers 0 must be at least 1" in capsys.readouterr().err


def test_contents_false_checks_presence_and_sizes_only(ds):
    with open(shard(ds), "rb") as f:
        data = bytearray(f.read())
    data[-1] = 1                        # same size, other bytes
    with open(shard(ds), "wb") as f:
        f.write(bytes(data))
    assert verify_dataset(ds, contents=False).ok
    assert verify_dataset(ds, deep=False).kinds() == {"sha256_mismatch"}
    with open(shard(ds), "r+b") as f:
        f.truncate(700)
    assert verify_dataset(ds, contents=False).kinds() == {"truncated"}
    os.unlink(shard(ds))
    assert verify_dataset(ds, contents=False).kinds() == {"missing_shard"}


def test_a_no_op_rebuild_reads_no_shard(built):
    """Building the same inputs again checks that every shard is there at its recorded size and
    reads none (at scale hashing them all takes minutes): a same-size change is left to ccrk verify."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(built)))
    with open(shard(built), "rb") as f:
        original = f.read()
    changed = bytearray(original)
    changed[-1] = 1
    try:
        with open(shard(built), "wb") as f:
            f.write(bytes(changed))
        again = build_dataset(root, name="tiny", sources=["coco", "vg"], langs="en,es,ru", shard_size=2)
        assert again.skipped and "ccrk verify" in again.message
        assert verify_dataset(built).kinds() == {"sha256_mismatch"}
    finally:
        with open(shard(built), "wb") as f:
            f.write(original)
    assert verify_dataset(built).ok
