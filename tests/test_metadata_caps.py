"""Bounded metadata downloads (issue 26): caps on the wire, on decompression (gzip, zip, tar), a total
deadline, and url file names that never leave their own cache directory -- against the loopback server."""
import gzip
import io
import os
import tarfile
import time
import zipfile

import pytest

from storage.demo.server import serve
from storage.errors import CCRKError
from storage.metadata import MetadataLimits, resolve_metadata

KIB = 1 << 10
SMALL = MetadataLimits(max_download_bytes=64 * KIB, max_unpacked_bytes=256 * KIB, deadline_s=1.5)
BOMB = 8 << 20  # zeros: a few KB compressed, 32 times the small decompression cap


@pytest.fixture
def server(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    with serve(str(served)) as s:
        yield s


@pytest.fixture
def cache(tmp_path):
    """A download cache already holding another url's file (which no failure may touch or read)."""
    d = tmp_path / "downloads"
    (d / "url-0123456789abcdef").mkdir(parents=True)
    (d / "url-0123456789abcdef" / "GCC-training.tsv").write_bytes(b"a cat\thttp://example.com/a.jpg\n")
    return d


def _cache_files(cache) -> dict[str, bytes]:
    return {os.path.relpath(os.path.join(p, n), cache): open(os.path.join(p, n), "rb").read()
            for p, _, names in os.walk(cache) for n in names}


def _refused(url, cache, match, limits=SMALL) -> CCRKError:
    """The download of ``url`` fails with ONE line matching ``match``; the cache is as it was."""
    before = _cache_files(cache)
    with pytest.raises(CCRKError, match=match) as info:
        resolve_metadata([url], str(cache), limits=limits)
    assert "\n" not in str(info.value)
    assert _cache_files(cache) == before
    return info.value


def _zip_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _tar_gz_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


# --------------------------------------------------------------------------- the wire and gzip


def test_a_gzip_encoded_body_within_the_caps_is_stored_decoded(server, cache):
    body = b"a cat\thttp://example.com/a.jpg\n" * 1000
    with open(os.path.join(server.directory, "GCC-training.tsv"), "wb") as f:
        f.write(gzip.compress(body))
    [path] = resolve_metadata([server.url + "/bad/gzip-encoded/GCC-training.tsv"], str(cache), limits=SMALL)
    assert open(path, "rb").read() == body


def test_a_gzip_bomb_is_cut_at_the_decompressed_cap(server, cache):
    with open(os.path.join(server.directory, "captions.json"), "wb") as f:
        f.write(gzip.compress(bytes(BOMB), 9))
    url = server.url + "/bad/gzip-encoded/captions.json"
    _refused(url, cache, f"^metadata download {url} passed the metadata cap of 256 KiB decompressed "
                         r"\(raise it with CCRK_METADATA_MAX_UNPACKED_BYTES\)$")


def test_an_oversized_body_is_refused_at_the_wire_cap(server, cache):
    with open(os.path.join(server.directory, "GCC-training.tsv"), "wb") as f:
        f.write(os.urandom(100 * KIB))
    url = server.url + "/GCC-training.tsv"
    _refused(url, cache, f"^metadata download {url} .*passed the metadata cap of 64 KiB on the wire "
                         r"\(raise it with CCRK_METADATA_MAX_DOWNLOAD_BYTES\)$")


def test_a_one_byte_per_second_body_is_cut_at_the_deadline(server, cache):
    with open(os.path.join(server.directory, "image_data.json"), "wb") as f:
        f.write(b"[" + b" " * 100 + b"]")
    url = server.url + "/bad/dribble/image_data.json"
    start = time.monotonic()
    _refused(url, cache, f"^metadata download {url} ran past the metadata deadline of 1.5 s "
                         r"\(raise it with CCRK_METADATA_DEADLINE_S\)$")
    assert time.monotonic() - start < SMALL.deadline_s + 1.5  # one more byte at most, not 100 s


# --------------------------------------------------------------------------- archives


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_an_archive_bomb_member_is_refused_before_it_is_written(server, cache, kind):
    build = _zip_bytes if kind == "zip" else _tar_gz_bytes
    name = f"caption_datasets.{kind}"
    data = build({"dataset_coco.json": bytes(BOMB)})
    assert len(data) < SMALL.max_download_bytes
    with open(os.path.join(server.directory, name), "wb") as f:
        f.write(data)
    url = f"{server.url}/{name}"
    before = _cache_files(cache)
    with pytest.raises(CCRKError, match=f"^member 'dataset_coco.json' \\(8 MiB\\) of archive .*{name} passed "
                                        r"the metadata cap of 256 KiB decompressed \(raise it with "
                                        r"CCRK_METADATA_MAX_UNPACKED_BYTES\)$"):
        resolve_metadata([url], str(cache), limits=SMALL)
    extracted = {k for k in set(_cache_files(cache)) - set(before) if not k.endswith(name)}
    assert extracted == set() and not any(n.startswith(("extract-", ".extract-")) for n in os.listdir(cache))


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_archive_members_are_capped_in_total(tmp_path, cache, kind):
    build = _zip_bytes if kind == "zip" else _tar_gz_bytes
    archive = tmp_path / f"annotations.{kind}"
    archive.write_bytes(build({f"captions_{i}.json": bytes(100 * KIB) for i in range(3)}))  # each under, all over
    with pytest.raises(CCRKError, match=f"^archive .*annotations.{kind} passed the metadata cap of 256 KiB "
                                        r"decompressed in total \(raise it with CCRK_METADATA_MAX_UNPACKED_BYTES\)$"):
        resolve_metadata([str(archive)], str(cache), limits=SMALL)
    assert not any(n.startswith(("extract-", ".extract-")) for n in os.listdir(cache))
    assert len(resolve_metadata([str(archive)], str(cache),
                                limits=MetadataLimits(max_unpacked_bytes=300 * KIB))) == 3  # raised: it fits


def test_caps_are_raised_by_environment_variables(tmp_path, cache, monkeypatch):
    archive = tmp_path / "caption_datasets.zip"
    archive.write_bytes(_zip_bytes({"dataset_coco.json": bytes(512 * KIB)}))
    monkeypatch.setenv("CCRK_METADATA_MAX_UNPACKED_BYTES", str(256 * KIB))
    with pytest.raises(CCRKError, match="cap of 256 KiB decompressed"):
        resolve_metadata([str(archive)], str(cache))
    monkeypatch.setenv("CCRK_METADATA_MAX_UNPACKED_BYTES", str(1 << 20))
    [path] = resolve_metadata([str(archive)], str(cache))
    assert os.path.getsize(path) == 512 * KIB
    monkeypatch.setenv("CCRK_METADATA_DEADLINE_S", "soon")
    with pytest.raises(CCRKError, match="^CCRK_METADATA_DEADLINE_S='soon' is not a number of seconds$"):
        resolve_metadata([str(archive)], str(cache))


# --------------------------------------------------------------------------- file names from urls


@pytest.mark.parametrize("tail", ["%2e%2e", "%2E%2E", "%2e", "", "x%5c..%5c..%5cGCC-training.tsv", "a%0d%0ab.json",
                                  "%00", ".part-abc"])
def test_a_url_file_name_never_leaves_or_aliases_its_cache_directory(server, cache, tail):
    url = f"{server.url}/bad/html/{tail}"
    before = _cache_files(cache)
    first = resolve_metadata([url], str(cache), limits=SMALL)
    second = resolve_metadata([url], str(cache), limits=SMALL)  # the old code read the whole cache here
    assert first == second and len(first) == 1
    [path] = first
    assert os.path.basename(path) == "download"
    assert os.path.dirname(os.path.dirname(path)) == str(cache) and os.path.basename(os.path.dirname(path)).startswith("url-")
    assert b"not an image" in open(path, "rb").read()
    assert {k: v for k, v in _cache_files(cache).items() if k in before} == before
    assert sum(server.hits.values()) == 1  # downloaded once, then read from the cache


# --------------------------------------------------------------------------- where a metadata host redirects


def test_a_redirect_to_an_internal_address_or_to_ftp_is_refused(server, cache):
    from urllib.parse import quote

    with open(os.path.join(server.directory, "c.tsv"), "wb") as f:
        f.write(b"a cat\thttp://x.org/a.jpg\n")
    with serve(server.directory) as internal:  # another loopback service: not the url's own pair
        for target in (internal.url + "/c.tsv", "http://2130706433:" + internal.address.split(":")[1] + "/c.tsv",
                       "ftp://127.0.0.1:21/c.tsv"):
            err = _refused(f"{server.url}/redirect/{quote(target, safe='')}", cache, "redirects to .*: refused")
            assert "loopback" in str(err) or "http(s) only" in str(err)
        assert sum(internal.hits.values()) == 0


def test_a_redirect_within_the_urls_own_host_and_port_is_followed(server, cache):
    from urllib.parse import quote

    with open(os.path.join(server.directory, "c.tsv"), "wb") as f:
        f.write(b"a cat\thttp://x.org/a.jpg\n")
    (path,) = resolve_metadata([f"{server.url}/redirect/{quote(server.url + '/c.tsv', safe='')}"], str(cache),
                               limits=SMALL)
    assert open(path, "rb").read() == b"a cat\thttp://x.org/a.jpg\n"
