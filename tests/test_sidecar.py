"""Values cached beside the file they were computed from (storage/sidecar.py): used only while the
file is the very one they came from."""
import json
import os
import time

from storage.sidecar import cached_beside, sidecar_path


def _counting(fn):
    calls = []

    def compute(path):
        calls.append(path)
        return fn(path)

    return compute, calls


def _size_and_head(path):
    with open(path, "rb") as f:
        return {"head": f.read(8).decode(), "n": os.path.getsize(path)}


def test_computed_once_then_read_back(tmp_path):
    p = tmp_path / "part-00000.parquet"
    p.write_bytes(b"abcdefgh-1")
    compute, calls = _counting(_size_and_head)
    assert cached_beside(str(p), "t", compute) == {"head": "abcdefgh", "n": 10}
    assert cached_beside(str(p), "t", compute) == {"head": "abcdefgh", "n": 10}
    assert len(calls) == 1
    side = sidecar_path(str(p), "t")
    assert os.path.basename(side) == ".part-00000.parquet.t.json"  # hidden: no part-* glob sees it
    assert sorted(os.listdir(tmp_path)) == [".part-00000.parquet.t.json", "part-00000.parquet"]


def test_a_rewritten_file_is_computed_again_even_with_its_size_and_mtime_restored(tmp_path):
    p = tmp_path / "x.tar"
    p.write_bytes(b"abcdefgh-1")
    compute, calls = _counting(_size_and_head)
    cached_beside(str(p), "t", compute)
    st = os.stat(p)
    time.sleep(0.05)  # past the coarse clock tick that stamps ctime
    p.write_bytes(b"ABCDEFGH-1")
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(p).st_mtime_ns == st.st_mtime_ns and os.stat(p).st_size == st.st_size
    assert cached_beside(str(p), "t", compute) == {"head": "ABCDEFGH", "n": 10}
    assert len(calls) == 2
    # A copy (new inode) is computed afresh too, and a new format version ignores old sidecars.
    q = tmp_path / "y.tar"
    os.replace(p, q)
    cached_beside(str(q), "t", compute)
    cached_beside(str(q), "t", compute, version=2)
    assert len(calls) == 4


def test_a_damaged_or_rejected_sidecar_is_recomputed_and_replaced(tmp_path):
    p = tmp_path / "x.tar"
    p.write_bytes(b"abcdefgh-1")
    compute, calls = _counting(_size_and_head)
    cached_beside(str(p), "t", compute)
    side = sidecar_path(str(p), "t")
    with open(side, "w") as f:
        f.write('{"stamp": [1, 2')
    assert cached_beside(str(p), "t", compute)["n"] == 10
    assert json.load(open(side))["value"]["n"] == 10
    assert cached_beside(str(p), "t", compute, valid=lambda v: v["n"] == 11)["n"] == 10
    assert len(calls) == 3


def test_where_the_sidecar_cannot_be_written_the_value_is_still_returned(tmp_path):
    p = tmp_path / "x.tar"
    p.write_bytes(b"abcdefgh-1")
    os.makedirs(sidecar_path(str(p), "t"))  # neither readable nor replaceable as a file
    compute, calls = _counting(_size_and_head)
    assert cached_beside(str(p), "t", compute)["n"] == 10
    assert cached_beside(str(p), "t", compute)["n"] == 10
    assert len(calls) == 2
    assert sorted(os.listdir(tmp_path)) == [".x.tar.t.json", "x.tar"]  # no temporary file left


def test_a_file_changed_while_it_is_read_is_not_cached(tmp_path):
    p = tmp_path / "x.tar"
    p.write_bytes(b"abcdefgh-1")

    def changes_it(path):
        time.sleep(0.05)
        with open(path, "ab") as f:
            f.write(b"more")
        return "old"

    assert cached_beside(str(p), "t", changes_it) == "old"
    assert not os.path.exists(sidecar_path(str(p), "t"))
