"""Kill -9 in the middle of `ccrk acquire`, run it again: the shards equal an uninterrupted run's.

Also covers a shard img2dataset would count as done (stats present) whose tar is cut short: redone.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import signal
import subprocess
import sys
import tarfile
import time

import pytest
from PIL import Image

from ccrk.app.cli import main as ccrk
from storage.demo.server import serve

N_URLS = 300
SHARD = 20
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write_corpus(d: str, base_url: str) -> str:
    """30 small JPEGs behind 300 distinct slow-ish urls, as a CC3M training tsv."""
    os.makedirs(os.path.join(d, "images"), exist_ok=True)
    for i in range(30):
        Image.new("RGB", (48, 40), (8 * i, 255 - 8 * i, (37 * i) % 256)).save(os.path.join(d, "images", f"{i}.jpg"))
    tsv = os.path.join(d, "Train_GCC-training.tsv")
    with open(tsv, "w") as f:
        for n in range(N_URLS):
            f.write(f"a picture number {n}\t{base_url}/delay/40/images/{n % 30}.jpg?n={n}\n")
    return tsv


def _command(tsv: str, root: str) -> list[str]:
    return ["acquire", "--source", "cc3m", "--metadata", tsv, "--root", root, "--image-size", "32",
            "--shard-size", str(SHARD), "--threads", "4", "--timeout", "5"]


def _version_dir(root: str) -> str:
    dirs = glob.glob(os.path.join(root, "sources", "cc3m", "*", "shards"))
    return os.path.dirname(dirs[0]) if dirs else ""


def _shard_contents(version_dir: str) -> dict[str, str]:
    """image_key -> sha256 of the stored image, over every shard tar (no key twice)."""
    out: dict[str, str] = {}
    for path in sorted(glob.glob(os.path.join(version_dir, "shards", "*.tar"))):
        members: dict[str, dict[str, bytes]] = {}
        with tarfile.open(path) as tar:
            for m in tar:
                stem, ext = m.name.rsplit(".", 1)
                members.setdefault(stem, {})[ext] = tar.extractfile(m).read()
        for stem, files in members.items():
            key = json.loads(files["json"])["image_key"]
            assert key not in out, f"{key} stored twice"
            out[key] = hashlib.sha256(files["jpg"]).hexdigest()
    return out


def _stats_files(version_dir: str) -> list[str]:
    return sorted(glob.glob(os.path.join(version_dir, "shards", "*_stats.json"))) if version_dir else []


@pytest.mark.slow
def test_kill_and_resume_gives_the_uninterrupted_shards(tmp_path, monkeypatch):
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PREFECT_LOGGING_LEVEL": "WARNING"}
    ccrk_bin = os.path.join(os.path.dirname(sys.executable), "ccrk")
    with serve(str(tmp_path / "corpus")) as server:
        # The loopback server, allowed by its exact pair (in this process and the killed children).
        monkeypatch.setenv("CCRK_ALLOW_ADDRESSES", server.address)
        env["CCRK_ALLOW_ADDRESSES"] = server.address
        tsv = _write_corpus(str(tmp_path / "corpus"), server.url)

        # The uninterrupted reference run.
        assert ccrk(_command(tsv, str(tmp_path / "ref"))) == 0
        ref_dir = _version_dir(str(tmp_path / "ref"))
        reference = _shard_contents(ref_dir)
        assert len(reference) == N_URLS

        # The same command, killed with SIGKILL once a few shards are written.
        root = str(tmp_path / "killed")
        log = open(tmp_path / "killed.log", "w")
        proc = subprocess.Popen([ccrk_bin, *_command(tsv, root)], env=env, cwd=REPO, stdout=log, stderr=log)
        deadline = time.time() + 240
        while len(_stats_files(_version_dir(root))) < 3 and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        version_dir = _version_dir(root)
        done = _stats_files(version_dir)
        assert 3 <= len(done) < N_URLS // SHARD, "the kill must land mid-run"
        time.sleep(1.0)  # the workers die with their parent: nothing more gets written
        assert _stats_files(version_dir) == done

        # A shard img2dataset counts as done (stats present) but whose tar is cut short.
        first_tar = done[0].replace("_stats.json", ".tar")
        with open(first_tar, "r+b") as f:
            f.truncate(os.path.getsize(first_tar) // 2)

        rerun = subprocess.run([ccrk_bin, *_command(tsv, root)], env=env, cwd=REPO, capture_output=True,
                               text=True, timeout=300)
        assert rerun.returncode == 0, rerun.stderr[-2000:]

    assert os.path.basename(version_dir) == os.path.basename(ref_dir)  # same inputs, same version
    summary = json.load(open(os.path.join(version_dir, "summary.json")))
    truncated_id = int(os.path.basename(first_tar).split(".")[0])
    assert truncated_id in summary["shards_redone"]
    assert summary["rows_attempted"] < N_URLS, "finished shards are not downloaded again"
    assert _shard_contents(version_dir) == reference
    ref_summary = json.load(open(os.path.join(ref_dir, "summary.json")))
    for k in ("images", "images_ok", "images_failed", "failures", "shards", "not_attempted"):
        assert summary[k] == ref_summary[k], k
    assert summary["images_ok"] == N_URLS and summary["shards"] == N_URLS // SHARD
