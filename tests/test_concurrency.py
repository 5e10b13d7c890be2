"""Runs at once on one data root: the artifact being produced is locked (a second run waits, naming
the holder's pid, then finds it built; with --no-wait it stops in one line), the catalog is waited
for (a program holding it open is one line), and temporary files are unique per process -- a live
run's are never deleted. Real ``ccrk`` processes against the session's Prefect server."""
import glob
import os
import shutil
import subprocess
import sys
import threading

import pytest

from klingual_fixtures import ensure_normalize, tiny_corpus
from storage import locks
from storage.build import build_dataset, resolve_build
from storage.catalog import Catalog
from storage.verify import verify_dataset

ensure_normalize()
ARGS = dict(name="t", sources=["coco", "vg"], langs="en,es,ru", shard_size=1)
BUILD = ["build", "--name", "t", "--sources", "coco,vg", "--langs", "en,es,ru", "--shard-size", "1"]
TIMEOUT = 150
# A process holding the dataset's artifact lock until its stdin closes; prints the dataset path.
HOLD_DATASET = """
import sys
from storage.build import resolve_build
from storage.locks import artifact_lock
path = resolve_build(sys.argv[1], name="t", sources=["coco", "vg"], langs="en,es,ru", shard_size=1).plan.path
with artifact_lock(sys.argv[1], path, "the test's hold"):
    print(path, flush=True)
    sys.stdin.read()
"""
# A program (not ccrk) holding the catalog open for writing until its stdin closes.
HOLD_CATALOG = """
import duckdb, sys
con = duckdb.connect(sys.argv[1])
print("held", flush=True)
sys.stdin.read()
"""


def _env(root: str, **extra) -> dict:
    from prefect.settings import PREFECT_API_URL

    return {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PREFECT_LOGGING_LEVEL": "WARNING",
            "CCRK_ROOT": root, **extra}


def _ccrk(*args: str) -> list[str]:
    return [sys.executable, "-m", "ccrk.app.cli", *args]


def _holder(code: str, *args: str) -> tuple[subprocess.Popen, str]:
    """A child running ``code``; returns it once it printed its first line (and that line)."""
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    return proc, proc.stdout.readline().strip()


def _shard_bytes(path: str) -> dict:
    d = os.path.join(path, "shards")
    return {f: open(os.path.join(d, f), "rb").read() for f in sorted(os.listdir(d))}


def test_two_builds_at_once_build_the_dataset_once_and_both_succeed(root, tmp_path):
    tiny_corpus(root)
    env = _env(root)
    procs = [subprocess.Popen(_ccrk(*BUILD, "--root", root), env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=TIMEOUT) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    # One built it; the other found it built (after waiting for it, or after it was done).
    assert sorted("built dataset t" in out for out, _ in outs) == [False, True]
    assert sum("nothing to do" in out for out, _ in outs) == 1
    (path,) = glob.glob(os.path.join(root, "datasets", "t", "*"))
    assert verify_dataset(path).ok
    assert not [f for f in os.listdir(os.path.join(path, "shards")) if f.startswith(".tmp-")]
    assert os.listdir(os.path.join(root, locks.LOCKS_DIR)) == ["catalog.lock"]  # no artifact lock left behind
    assert [a.path for a in Catalog(root).list("dataset")] == [path]
    alone = str(tmp_path / "alone")
    tiny_corpus(alone)
    assert _shard_bytes(path) == _shard_bytes(build_dataset(alone, **ARGS).path)


def test_a_build_waits_for_the_run_holding_its_dataset_or_stops_with_no_wait(root):
    tiny_corpus(root)
    env = _env(root)
    holder, path = _holder(HOLD_DATASET, root)
    try:
        out = subprocess.run(_ccrk(*BUILD, "--root", root, "--no-wait"), env=env, capture_output=True, text=True,
                             timeout=TIMEOUT)
        assert out.returncode == 2, out.stderr[-2000:]
        assert "Traceback" not in out.stderr + out.stdout
        last = out.stderr.rstrip().splitlines()[-1]
        assert last.startswith("ccrk build: error: dataset t ") and f"pid {holder.pid}" in last
        assert "--no-wait" in last and not os.path.exists(os.path.join(path, "_COMPLETE"))

        waiting = subprocess.Popen(_ccrk(*BUILD, "--root", root), env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
        said, err_lines = threading.Event(), []

        def read_stderr():
            for line in waiting.stderr:
                err_lines.append(line)
                if line.startswith(f"waiting for pid {holder.pid}, which is producing dataset t "):
                    said.set()

        reader = threading.Thread(target=read_stderr, daemon=True)
        reader.start()
        assert said.wait(TIMEOUT), "".join(err_lines)[-2000:]
        assert waiting.poll() is None and not os.path.exists(os.path.join(path, "_COMPLETE"))
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    stdout = waiting.stdout.read()
    assert waiting.wait(timeout=TIMEOUT) == 0, "".join(err_lines)[-2000:]
    reader.join(timeout=30)
    assert "built dataset t" in stdout and verify_dataset(path).ok
    assert sum(line.startswith("waiting for ") for line in err_lines) == 1


def test_the_catalog_held_open_by_another_program_is_waited_for_then_one_line(root):
    tiny_corpus(root)  # records its sources in the catalog
    catalog = Catalog(root).path
    holder, _ = _holder(HOLD_CATALOG, catalog)
    try:
        out = subprocess.run(_ccrk(*BUILD, "--root", root), env=_env(root, CCRK_CATALOG_WAIT="1"),
                             capture_output=True, text=True, timeout=TIMEOUT)
        assert out.returncode == 2, out.stderr[-2000:]
        assert "Traceback" not in out.stderr + out.stdout
        last = out.stderr.rstrip().splitlines()[-1]
        assert last.startswith(f"ccrk build: error: the catalog {catalog} is held open by pid {holder.pid} ")
        # Released while a command waits: the command goes on.
        listing = subprocess.Popen(_ccrk("catalog", "--root", root), env=_env(root), stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
        threading.Timer(2.0, holder.stdin.close).start()
        stdout, stderr = listing.communicate(timeout=TIMEOUT)
        assert listing.returncode == 0, stderr
        assert "catalog (2 artifacts)" in stdout
    finally:
        if not holder.stdin.closed:
            holder.stdin.close()
        holder.wait(timeout=30)


def test_a_killed_writers_temporary_files_go_and_a_live_runs_stay(root):
    tiny_corpus(root)
    path = resolve_build(root, **ARGS).plan.path
    shards = os.path.join(path, "shards")
    os.makedirs(shards)
    live = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    try:
        names = {"live": f".tmp-{live.pid}-0a1b2c3d-shard-00000.tar", "gone": f".tmp-{gone.pid}-0a1b2c3d-shard-00001.tar",
                 "older ccrk": ".tmp-shard-00002.tar", "gone, unwritten shard": f".tmp-{gone.pid}-0a1b2c3d-shard-00099.tar"}
        for name in names.values():
            open(os.path.join(shards, name), "wb").write(b"half a shard")
        result = build_dataset(root, **ARGS)
        left = {f for f in os.listdir(shards) if f.startswith(".tmp-")}
        assert left == {names["live"]}
        assert [p.kind for p in verify_dataset(result.path).problems] == ["unexpected_shard"]  # shown, not deleted
    finally:
        live.stdin.close()
        live.wait()


def test_the_artifact_lock_names_its_holder_and_is_removed_on_release(tmp_path):
    root = str(tmp_path)
    with locks.artifact_lock(root, os.path.join(root, "datasets", "x", "v1"), "dataset x v1"):
        lock = locks.lock_file(root, "datasets/x/v1")
        assert locks.holder_pid(lock) == os.getpid()
        with locks.artifact_lock(root, os.path.join(root, "datasets", "x", "v1"), "dataset x v1"):
            pass  # taken again by its holder: no wait
        code = ("import sys\nfrom storage.locks import artifact_lock\n"
                "with artifact_lock(sys.argv[1], sys.argv[2], 'dataset x v1', wait=False):\n    pass\n")
        other = subprocess.run([sys.executable, "-c", code, root, os.path.join(root, "datasets", "x", "v1")],
                               capture_output=True, text=True)
        assert other.returncode == 1 and f"is being produced by pid {os.getpid()}" in other.stderr
    assert not os.path.exists(lock)
    assert locks.lock_file(root, "a/" * 200) != locks.lock_file(root, "a/" * 201)
    assert len(os.path.basename(locks.lock_file(root, "a/" * 200))) < 200
    with locks.artifact_lock("s3://bucket/root", "s3://bucket/root/datasets/x/v1", "remote"):
        pass  # remote roots are not locked


def test_a_read_only_root_is_read_without_locks(root):
    """No lock file can be made there: the catalog is read as before locks (in a private mount
    namespace the root is bound read-only)."""
    tiny_corpus(root)
    shutil.rmtree(os.path.join(root, locks.LOCKS_DIR))
    read_only = f"mount --bind '{root}' '{root}' && mount -o remount,ro,bind '{root}'"
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "sh", "-c", read_only]).returncode:
        pytest.skip("no unprivileged mount namespace here (unshare -rm) to bind the root read-only")
    listing = f"{read_only} && exec '{sys.executable}' -m ccrk.app.cli catalog --root '{root}'"
    out = subprocess.run(["unshare", "-rm", "sh", "-c", listing], capture_output=True, text=True, timeout=TIMEOUT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "catalog (2 artifacts)" in out.stdout and not os.path.exists(os.path.join(root, locks.LOCKS_DIR))
