"""`ccrk acquire` against a hostile web: every class of bad host bounded, refused or counted.

One real ``ccrk acquire`` (a child process, so its peak memory is its own) of good images and of
every hostile response the loopback server can give, in one tsv:

- images bounded before they cost memory or time: a 20000x20000 RGBA PNG of 1.6 MB (rejected from
  its header, never decoded: decoded, with img2dataset's float64 alpha matting, it needs many GB), a
  body that never ends (read up to the byte cap only) and a picture of some KB sent at one byte a
  second (cut at the total deadline, though every byte comes within the per-read timeout); and one
  accepted: the same RGBA picture at 6000x6000, under the area limit, composited on white in
  integers (storage.image_prep; img2dataset's own matting took 2.4 GB above the baseline for it);
- targets refused (``blocked_address``): a second, "internal" loopback server, not on the allow-list,
  reached directly, by the decimal, octal and IPv6-mapped spellings of its address and by a redirect
  from the allowed server; a redirect to ``ftp://``; private, link-local, multicast and unspecified
  addresses. The internal server must never see a request;
- opt-outs honoured: ``X-Robots-Tag: noai`` and ``tdm-reservation: 1``;
- captions with terminal escapes and other control characters: kept, cleaned, counted as fixed;
- nothing written outside the data root.

The allowed server is allowed the way a user allows one: ``--allow-address HOST:PORT``, its one pair.
The baseline of memory is a child that imports what the acquire process and its download workers import.
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

from storage.addresses import allowed
from storage.demo.server import serve
from storage.download import TOO_LARGE_HEADER, TOO_MANY_BYTES, classify_error, fetch_image

DEADLINE_S = 3
CAP_BYTES = 4_000_000  # over the bomb PNG (1.6 MB), far under the endless body
# On the allowed server: path -> the class it must be counted in.
HOSTILE = {"/bad/bomb-rgba/x.png": "too_large", "/bad/endless/x.jpg": "too_many_bytes",
           "/bad/dribble/images/big.jpg": "deadline_exceeded", "/noai/images/0.jpg": "opt_out_noai",
           "/tdm/images/1.jpg": "opt_out_tdm"}
# Targets refused as blocked_address ({internal}: the internal server's port); none is ever connected to.
BLOCKED = ["http://127.0.0.1:{internal}/images/0.jpg",   # the internal server, directly
           "http://2130706433:{internal}/images/0.jpg",  # 127.0.0.1 as one decimal number
           "http://0177.0.0.1:{internal}/images/0.jpg",  # ... in octal
           "http://[::ffff:127.0.0.1]:{internal}/images/0.jpg",  # ... IPv6-mapped
           "http://[::1]:{internal}/images/0.jpg",
           "http://0.0.0.0:{internal}/images/0.jpg",
           "http://10.11.12.13/x.jpg", "http://192.168.0.1/x.jpg", "http://169.254.169.254/latest/meta-data/",
           "http://224.0.0.1/x.jpg", "http://100.64.0.1/x.jpg"]
# Redirects from the allowed server, refused at the redirect.
REDIRECTS = ["http://127.0.0.1:{internal}/images/1.jpg", "ftp://127.0.0.1:{internal}/images/1.jpg"]
CAPTIONS = ["a \x1b[31mred\x1b[0m picture", "a bell\x07 and a \x9b csi"]  # control characters in two captions
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


def _acquire(tsv: str, root: str, allow: str) -> tuple[int, float, int]:
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PREFECT_LOGGING_LEVEL": "WARNING"}
    env.pop("CCRK_ALLOW_ADDRESSES", None)
    ccrk_bin = os.path.join(os.path.dirname(sys.executable), "ccrk")
    return _peak_of([ccrk_bin, "acquire", "--source", "cc3m", "--metadata", tsv, "--root", root,
                     "--image-size", "32", "--threads", "8", "--timeout", "2", "--fetch-deadline", str(DEADLINE_S),
                     "--max-image-bytes", str(CAP_BYTES), "--allow-address", allow], env)


def _tsv(path: str, urls: list[str], captions: list[str] = ()) -> str:
    with open(path, "w") as f:
        f.writelines(f"{captions[i] if i < len(captions) else f'picture {i}'}\t{u}\n" for i, u in enumerate(urls))
    return path


def _files_under(path) -> set[str]:
    return {os.path.relpath(os.path.join(dp, f), path) for dp, _, files in os.walk(path) for f in files}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from urllib.parse import quote

    d = tmp_path_factory.mktemp("hostile")
    images = d / "corpus" / "images"
    os.makedirs(images)
    for i in range(2):
        Image.new("RGB", (48, 40), (90 * i, 120, 60)).save(images / f"{i}.jpg")
    # Noise: a JPEG that would take hours at a byte a second.
    Image.frombytes("RGB", (160, 160), random.Random(0).randbytes(160 * 160 * 3)).save(images / "big.jpg")
    base = _peak_of([sys.executable, "-c", "import flows.acquire, img2dataset.main"])
    with serve(str(d / "corpus")) as server, serve(str(d / "corpus")) as internal:
        port = internal.address.rsplit(":", 1)[1]
        blocked = [u.format(internal=port) for u in BLOCKED]
        blocked += [f"{server.url}/redirect/{quote(u.format(internal=port), safe='')}" for u in REDIRECTS]
        urls = [f"{server.url}/images/{i}.jpg" for i in range(2)] + [server.url + "/bad/rgba-6000/x.png"]
        urls += [server.url + p for p in HOSTILE] + blocked
        before = _files_under(d)
        hostile = _acquire(_tsv(str(d / "hostile.tsv"), urls, CAPTIONS), str(d / "data"), server.address)
        internal_hits = sum(internal.hits.values())
    written_outside = {f for f in _files_under(d) - before if not f.startswith("data" + os.sep)} - {"hostile.tsv"}
    (version_dir,) = glob.glob(str(d / "data" / "sources" / "cc3m" / "*"))
    summary = json.load(open(os.path.join(version_dir, "summary.json")))
    status = pd.read_parquet(os.path.join(version_dir, "download_status.parquet"))
    captions = pd.read_parquet(os.path.join(version_dir, "captions.parquet"))
    return SimpleNamespace(base=base, hostile=hostile, summary=summary, status=status, captions=captions,
                           blocked=blocked, internal_hits=internal_hits, written_outside=written_outside,
                           dribble_bytes=os.path.getsize(images / "big.jpg"))


def test_each_hostile_image_is_counted_in_its_class(runs):
    summary, status = runs.summary, runs.status
    assert runs.base[0] == 0 and runs.hostile[0] == 0
    assert summary["images_ok"] == 3  # the two pictures and the 6000x6000 RGBA PNG, under the area limit
    expected = {**{c: 1 for c in HOSTILE.values()}, "blocked_address": len(runs.blocked)}
    assert {c: n for c, n in summary["failures"].items() if n} == expected
    by_url = dict(zip(status["url"], status["error_class"]))
    assert {u: by_url[u] for u in runs.blocked} == {u: "blocked_address" for u in runs.blocked}
    assert summary["settings"]["fetch_deadline"] == DEADLINE_S
    assert summary["settings"]["max_image_bytes"] == CAP_BYTES


def test_no_request_reaches_an_address_not_allowed(runs):
    assert runs.internal_hits == 0
    messages = runs.status.loc[runs.status["error_class"] == "blocked_address", "error_message"]
    assert messages.str.contains("blocked address").all()
    assert messages.str.contains("allow-address").sum() == len(BLOCKED) + 1  # all but the ftp redirect
    assert messages.str.contains("http\\(s\\) only").sum() == 1


def test_control_characters_in_captions_are_cleaned_and_counted(runs):
    assert runs.summary["rows_fixed"] == {"control_characters": len(CAPTIONS)}
    text = "".join(runs.captions["caption"])
    assert not any(ord(c) < 32 or 127 <= ord(c) < 160 for c in text)
    assert "red" in text and "csi" in text


def test_nothing_is_written_outside_the_root(runs):
    assert runs.written_outside == set()


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
                                       max_bytes=1000, allow=allowed([server.address]))
    assert stream is None and err.startswith(TOO_MANY_BYTES)
    assert "Content-Length" in err and classify_error(err) == "too_many_bytes"


def test_the_deadline_covers_the_whole_fetch_not_each_read(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"\xff\xd8\xff" + bytes(100))
    with serve(str(tmp_path)) as server:
        t0 = time.perf_counter()
        _, stream, err = fetch_image((0, server.url + "/bad/dribble/a.jpg"), 2, None, None, deadline=2,
                                     max_bytes=CAP_BYTES, allow=allowed([server.address]))
        wall = time.perf_counter() - t0
    assert stream is None and classify_error(err) == "deadline_exceeded"
    assert 2 <= wall < 4.5, wall  # 103 bytes at one a second, each within the 2 s timeout


# --------------------------------------------------------------------------- the address rules, one by one


@pytest.mark.parametrize("ip,why", [("127.0.0.1", "loopback"), ("::1", "loopback"), ("10.0.0.1", "private"),
                                    ("172.16.5.4", "private"), ("192.168.1.1", "private"),
                                    ("169.254.169.254", "link-local"), ("fe80::1", "link-local"),
                                    ("224.0.0.1", "multicast"), ("ff02::1", "multicast"),
                                    ("0.0.0.0", "unspecified"), ("240.0.0.1", "reserved"),
                                    ("::ffff:127.0.0.1", "loopback"), ("::ffff:10.0.0.1", "private"),
                                    ("100.64.0.1", "not global"), ("8.8.8.8", None), ("2606:4700::1111", None)])
def test_refusal_names_why_an_address_is_not_fetched_from(ip, why):
    from storage.addresses import refusal

    assert refusal(ip) == why


def test_the_allow_list_is_exact_pairs_from_the_setting_and_the_environment(monkeypatch):
    from storage.addresses import parse_pair
    from storage.errors import CCRKError

    monkeypatch.setenv("CCRK_ALLOW_ADDRESSES", "LocalHost:8000, [::1]:9000")
    assert allowed(["127.0.0.1:80"]) == {("127.0.0.1", 80), ("localhost", 8000), ("::1", 9000)}
    for bad in ("127.0.0.0/8", "127.0.0.1", "127.0.0.1:*", "::1:80", "host:0", "host:70000"):
        with pytest.raises(CCRKError, match="is not HOST:PORT"):
            parse_pair(bad, "allow_addresses")


def test_a_range_given_to_allow_address_is_one_line_exit_2(tmp_path):
    out = subprocess.run([os.path.join(os.path.dirname(sys.executable), "ccrk"), "acquire", "--source", "cc3m",
                          "--metadata", _tsv(str(tmp_path / "m.tsv"), ["http://example.com/a.jpg"]),
                          "--root", str(tmp_path / "data"), "--allow-address", "127.0.0.0/8"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "127.0.0.0/8" in out.stderr and "no ranges" in out.stderr


def test_a_pair_allows_its_port_only(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"\xff\xd8\xff" + bytes(100))
    with serve(str(tmp_path)) as server:
        other = "127.0.0.1:" + str(int(server.address.rsplit(":", 1)[1]) + 1)
        _, stream, err = fetch_image((0, server.url + "/a.jpg"), 2, None, None, deadline=5, max_bytes=CAP_BYTES,
                                     allow=allowed([other]))
        assert stream is None and classify_error(err) == "blocked_address"
        _, stream, err = fetch_image((0, server.url + "/a.jpg"), 2, None, None, deadline=5, max_bytes=CAP_BYTES,
                                     allow=allowed([server.address]))
        assert err is None and stream.read(3) == b"\xff\xd8\xff"
