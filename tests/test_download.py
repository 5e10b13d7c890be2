"""img2dataset behind a loopback server that answers every bad case: each counted by class, run completes.

One real download of a small images.parquet (good urls and one url per bad response class), then
``retry_failed``: only the retryable failures (5xx, timeouts, connection errors) are requested again.
"""
from __future__ import annotations

import glob
import json
import os
import tarfile
from types import SimpleNamespace

import pandas as pd
import pytest
from PIL import Image

from storage.demo.server import serve
from storage.download import FAILURE_CLASSES, RETRYABLE, check_shard, classify_error, download_images

GOOD = 4
# (path under the server, expected failure class); flaky/1 fails once, then serves the image.
BAD = [
    ("/bad/404/img/0.jpg", "not_found_404"),
    ("/bad/500/img/0.jpg", "server_error_5xx"),
    ("/flaky/1/img/3.jpg", "server_error_5xx"),
    ("/bad/slow/img/0.jpg", "timeout"),
    ("/bad/redirect-loop/img/0.jpg", "redirect_loop"),
    ("/bad/empty/img/0.jpg", "empty_body"),
    ("/bad/html/img/0.jpg", "not_an_image"),
    ("/bad/truncated/img/1.jpg", "truncated_image"),
    ("/bad/huge/img/0.jpg", "too_large"),
    ("/noai/img/2.jpg", "opt_out_noai"),
    (None, "connection_error"),  # a closed port
]


def _tar_keys(version_dir: str) -> list[str]:
    keys = []
    for path in sorted(glob.glob(os.path.join(version_dir, "shards", "*.tar"))):
        with tarfile.open(path) as tar:
            keys += [json.load(tar.extractfile(m))["image_key"] for m in tar if m.name.endswith(".json")]
    return keys


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("download")
    os.makedirs(d / "img")
    os.makedirs(d / "v")
    for i in range(GOOD):
        Image.new("RGB", (64, 48), (40 * i, 120, 60)).save(d / "img" / f"{i}.jpg")
    with serve(str(d), slow_seconds=4) as server:
        rows = [(f"t-good{i}", f"{server.url}/img/{i}.jpg", None) for i in range(GOOD)]
        rows += [(f"t-bad{i}", f"{server.url}{p}" if p else "http://127.0.0.1:9/x.jpg", cls)
                 for i, (p, cls) in enumerate(BAD)]
        table = pd.DataFrame(rows, columns=["image_key", "url", "expected"])
        table[["image_key", "url"]].to_parquet(d / "v" / "images.parquet")
        prepared = SimpleNamespace(source="cc3m", version="v", directory=str(d / "v"),
                                   images_path=str(d / "v" / "images.parquet"), rows_read=len(rows) + 2,
                                   rejected={"bad_url_scheme": 2})
        # The loopback server and the closed port: allowed by their exact pairs (every other
        # loopback target would be blocked_address).
        opts = dict(timeout=1, number_sample_per_shard=8, thread_count=8, progress=False,
                    allow_addresses=[server.address, "127.0.0.1:9"])
        first = download_images(prepared, **opts)
        hits_first = dict(server.hits)
        second = download_images(prepared, retry_failed=True, **opts)
        hits_second = dict(server.hits)
    return SimpleNamespace(dir=str(d / "v"), table=table, first=first, second=second, url=server.url,
                           hits_first=hits_first, hits_second=hits_second)


def test_every_bad_response_is_counted_by_class_and_the_run_completes(runs):
    s = runs.first
    expected = {c: sum(cls == c for _, cls in BAD) for c in FAILURE_CLASSES}
    assert s["failures"] == expected
    assert s["images_ok"] == GOOD
    assert s["images"] == s["images_ok"] + s["images_failed"] == GOOD + len(BAD)
    assert s["not_attempted"] == 0 and s["shards_incomplete"] == 0
    assert s["rows_read"] == GOOD + len(BAD) + 2 and s["rows_rejected"] == {"bad_url_scheme": 2}
    assert s["bytes"] > 0 and s["images_per_s"] > 0 and s["wall_s"] > 0
    assert json.load(open(os.path.join(runs.dir, "summary.json"))) == runs.second


def test_status_file_gives_each_image_its_class(runs):
    status = pd.read_parquet(os.path.join(runs.dir, "download_status.parquet")).set_index("image_key")
    # After the retry the flaky image is a success; every other bad row keeps its class.
    for key, expected in zip(runs.table["image_key"], runs.table["expected"]):
        if key == "t-bad2":
            assert status.loc[key, "status"] == "success"
        else:
            assert status.loc[key, "error_class"] == expected, key


def test_opt_out_header_is_honoured(runs):
    noai = runs.table[runs.table["expected"] == "opt_out_noai"]["image_key"].item()
    assert noai not in _tar_keys(runs.dir)
    assert runs.hits_first["/noai/img/2.jpg"] == 1  # requested, then refused on the header


def test_shards_hold_each_success_once_with_its_image_key(runs):
    keys = _tar_keys(runs.dir)
    assert len(keys) == len(set(keys))
    assert set(keys) == {f"t-good{i}" for i in range(GOOD)} | {"t-bad2"}


def test_retry_failed_requests_only_retryable_failures_again(runs):
    retryable_paths = {p for p, cls in BAD if p and cls in RETRYABLE}
    for path, count in runs.hits_second.items():
        before = runs.hits_first.get(path, 0)
        if path in retryable_paths:
            assert count == before + 1, path
        else:
            assert count == before, f"{path} was requested again"
    s = runs.second
    assert s["retried"] == runs.first["retryable_failures"] == 4
    assert s["recovered_by_retry"] == 1 and s["superseded_failures"] == 4
    assert s["images_ok"] == GOOD + 1
    assert s["failures"]["server_error_5xx"] == 1
    assert s["images"] == s["images_ok"] + s["images_failed"]
    assert s["shards"] == runs.first["shards"] + 1  # the retry is a new shard in the same version


def test_retry_shard_keys_do_not_collide_with_earlier_shards(runs):
    status = pd.read_parquet(os.path.join(runs.dir, "download_status.parquet"))
    assert status["key"].is_unique


@pytest.mark.parametrize("message, cls", [
    ("HTTP Error 404: Not Found", "not_found_404"),
    ("HTTP Error 503: Service Unavailable", "server_error_5xx"),
    ("timed out", "timeout"),
    ("<urlopen error timed out>", "timeout"),
    ("The read operation timed out", "timeout"),
    ("HTTP Error 302: The HTTP server returned a redirect error that would lead to an infinite loop.", "redirect_loop"),
    ("<urlopen error [Errno 111] Connection refused>", "connection_error"),
    ("Remote end closed connection without response", "connection_error"),
    ("empty body", "empty_body"),
    ("truncated image (Image decoding error)", "truncated_image"),
    ("not an image (Image decoding error)", "not_an_image"),
    ("image area too large", "too_large"),
    ("Use of image disallowed by X-Robots-Tag directive", "opt_out_noai"),
    ("use of image reserved by tdm-reservation: 1", "opt_out_tdm"),
    ("<urlopen error blocked address: 2130706433:80 is 127.0.0.1 (loopback); allow this exact pair ...>",
     "blocked_address"),
    ("HTTP Error 302: blocked address: a redirect to a ftp url (http(s) only)", "blocked_address"),
    ("deadline exceeded: no whole image within 60 s", "deadline_exceeded"),
    ("too many bytes: the body is over the cap of 50000000", "too_many_bytes"),
    ("image area too large (from the header, not decoded)", "too_large"),
    ("not in mirror", "not_in_mirror"),
    ("file not found: flickr30k-images/1.jpg", "file_not_found"),
    ("image too small", "other"),
    (None, None),
])
def test_classify_error(message, cls):
    assert classify_error(message) == cls


def _shard(tmp_path, n_images: int, stats_successes: int, stats_count: int) -> dict:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    tar_path = tmp_path / "00000.tar"
    with tarfile.open(tar_path, "w") as tar:
        for i in range(n_images):
            for ext, data in (("jpg", b"\xff\xd8\xff" + bytes(2000)), ("json", b"{}")):
                info = tarfile.TarInfo(f"{i:09d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    pq.write_table(pa.table({"key": [str(i) for i in range(stats_count)]}), tmp_path / "00000.parquet")
    (tmp_path / "00000_stats.json").write_text(json.dumps({"count": stats_count, "successes": stats_successes}))
    return {"tar": str(tar_path), "parquet": str(tmp_path / "00000.parquet"),
            "stats": str(tmp_path / "00000_stats.json")}


def test_a_consistent_shard_passes_the_check(tmp_path):
    assert check_shard(_shard(tmp_path, 3, 3, 5)) is None


def test_a_cut_tar_with_stats_present_is_inconsistent(tmp_path):
    files = _shard(tmp_path, 3, 3, 5)
    with open(files["tar"], "r+b") as f:
        f.truncate(2600)  # inside the second image
    assert "tar" in check_shard(files)


def test_missing_images_or_rows_or_stats_are_inconsistent(tmp_path):
    assert "2 images" in check_shard(_shard(tmp_path, 2, 3, 5))
    files = _shard(tmp_path, 3, 3, 6)
    pd.DataFrame({"key": ["a"]}).to_parquet(files["parquet"])
    assert "rows" in check_shard(files)
    (tmp_path / "00000_stats.json").write_text('{"count": 5, "succ')  # killed while writing stats
    assert "stats" in check_shard(files)


def test_a_busy_demo_port_is_one_clear_error(tmp_path):
    from storage.errors import CCRKError

    with serve(str(tmp_path)) as server:
        port = int(server.url.rsplit(":", 1)[1])
        with pytest.raises(CCRKError, match=f"127.0.0.1:{port}: the port is in use .*corpus.port"):
            with serve(str(tmp_path), port=port):
                pass
