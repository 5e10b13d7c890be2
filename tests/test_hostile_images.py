"""`ccrk acquire` against hostile hosts: each image is bounded before it costs memory or time.

One real ``ccrk acquire`` (a child process, so its peak memory is its own) of two good images and
three hostile ones from the loopback server: a 20000x20000 RGBA PNG of 1.6 MB (rejected from its
header, never decoded: decoded, with img2dataset's float64 alpha matting, it needs many GB), a body
that never ends (read up to the byte cap only) and a picture of some KB sent at one byte a second
(cut at the total deadline, though every byte comes within the per-read timeout). The baseline of
memory is a child that imports what the acquire process and its download workers import.
"""
from __future__ import annotations

import glob
import json
import os
import random
import subprocess
import sys
import time
from types import SimpleNamespace

import pandas as pd
import pytest
from PIL import Image

from storage.demo.server import serve
from storage.download import TOO_LARGE_HEADER, TOO_MANY_BYTES, classify_error, fetch_image

DEADLINE_S = 3
CAP_BYTES = 4_000_000  # over the bomb PNG (1.6 MB), far under the endless body
HOSTILE = {"/bad/bomb-rgba/x.png": "too_large", "/bad/endless/x.jpg": "too_many_bytes",
           "/bad/dribble/images/0.jpg": "deadline_exceeded"}
# The peak RSS of the child process tree, as the wrapper's children report it (KiB on Linux).
_PEAK = "import resource, subprocess, sys; rc = subprocess.call(sys.argv[1:]); " \
        "print(rc, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"


def _peak_of(args: list[str], env: dict | None = None) -> tuple[int, float, int]:
    """Run ``args`` under a wrapper: exit code, wall seconds and the child tree's peak RSS in bytes."""
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", _PEAK, *args], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, text=True, timeout=240).stdout
    rc, peak_kib = out.split()[-2:]
    return int(rc), time.perf_counter() - t0, int(peak_kib) * 1024


def _acquire(tsv: str, root: str) -> tuple[int, float, int]:
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PREFECT_LOGGING_LEVEL": "WARNING"}
    ccrk_bin = os.path.join(os.path.dirname(sys.executable), "ccrk")
    return _peak_of([ccrk_bin, "acquire", "--source", "cc3m", "--metadata", tsv, "--root", root,
                     "--image-size", "32", "--threads", "8", "--timeout", "2", "--fetch-deadline", str(DEADLINE_S),
                     "--max-image-bytes", str(CAP_BYTES)], env)


def _tsv(path: str, urls: list[str]) -> str:
    with open(path, "w") as f:
        f.writelines(f"picture {i}\t{u}\n" for i, u in enumerate(urls))
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("hostile")
    images = d / "corpus" / "images"
    os.makedirs(images)
    for i in range(2):
        Image.new("RGB", (48, 40), (90 * i, 120, 60)).save(images / f"{i}.jpg")
    # Noise: a JPEG that would take hours at a byte a second.
    Image.frombytes("RGB", (160, 160), random.Random(0).randbytes(160 * 160 * 3)).save(images / "big.jpg")
    base = _peak_of([sys.executable, "-c", "import flows.acquire, img2dataset.main"])
    with serve(str(d / "corpus")) as server:
        urls = [f"{server.url}/images/{i}.jpg" for i in range(2)] + [server.url + p for p in HOSTILE]
        hostile = _acquire(_tsv(str(d / "hostile.tsv"), urls), str(d / "data"))
    (version_dir,) = glob.glob(str(d / "data" / "sources" / "cc3m" / "*"))
    summary = json.load(open(os.path.join(version_dir, "summary.json")))
    status = pd.read_parquet(os.path.join(version_dir, "download_status.parquet"))
    return SimpleNamespace(base=base, hostile=hostile, summary=summary, status=status,
                           dribble_bytes=os.path.getsize(images / "big.jpg"))


def test_each_hostile_image_is_counted_in_its_class(runs):
    summary, status = runs.summary, runs.status
    assert runs.base[0] == 0 and runs.hostile[0] == 0
    assert summary["images_ok"] == 2
    assert {c: n for c, n in summary["failures"].items() if n} == {c: 1 for c in HOSTILE.values()}
    by_path = {"/" + u.split("/", 3)[3]: c for u, c in zip(status["url"], status["error_class"]) if c}
    assert by_path == HOSTILE
    assert summary["settings"]["fetch_deadline"] == DEADLINE_S
    assert summary["settings"]["max_image_bytes"] == CAP_BYTES


def test_the_bomb_is_rejected_from_its_header_without_a_decode(runs):
    (message,) = runs.status.loc[runs.status["error_class"] == "too_large", "error_message"]
    assert message == TOO_LARGE_HEADER


def test_a_byte_a_second_host_costs_one_deadline_not_its_body(runs):
    _, wall, _ = runs.hostile
    assert runs.dribble_bytes > 5000  # unbounded, its fetch alone would take that many seconds
    assert wall < 120, wall  # start-up, imports and the deadline: a couple of minutes on a loaded machine


def test_peak_memory_stays_within_a_gigabyte_of_the_baseline(runs):
    (_, _, base_peak), (_, _, peak) = runs.base, runs.hostile
    assert peak - base_peak < 1 << 30, (base_peak, peak)


def test_a_declared_length_over_the_cap_is_refused_before_the_body(tmp_path):
    with serve(str(tmp_path)) as server:
        key, stream, err = fetch_image((0, server.url + "/bad/huge/x.png"), 2, None, None, deadline=5,
                                       max_bytes=1000)
    assert stream is None and err.startswith(TOO_MANY_BYTES)
    assert "Content-Length" in err and classify_error(err) == "too_many_bytes"


def test_the_deadline_covers_the_whole_fetch_not_each_read(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"\xff\xd8\xff" + bytes(100))
    with serve(str(tmp_path)) as server:
        t0 = time.perf_counter()
        _, stream, err = fetch_image((0, server.url + "/bad/dribble/a.jpg"), 2, None, None, deadline=2,
                                     max_bytes=CAP_BYTES)
        wall = time.perf_counter() - t0
    assert stream is None and classify_error(err) == "deadline_exceeded"
    assert 2 <= wall < 4.5, wall  # 103 bytes at one a second, each within the 2 s timeout
