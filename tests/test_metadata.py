"""--metadata resolution: local files and directories, real HTTP downloads from a loopback server, safe archives."""
import functools
import io
import os
import socket
import stat
import tarfile
import threading
import zipfile
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest

from storage.demo.corpus import demo_archives, generate_demo_corpus, write_demo_metadata
from storage.errors import CCRKError
from storage.metadata import extract_archive, resolve_metadata
from storage.sources import prepare_source


class _Handler(SimpleHTTPRequestHandler):
    """Files under the served directory, plus /status/<code>, /loop/<file> and /truncated/<file> bad cases."""

    hits: dict

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.hits[self.path] = self.hits.get(self.path, 0) + 1
        if self.path.startswith("/status/"):
            self.send_response(int(self.path.rsplit("/", 1)[1]))
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if self.path.startswith("/loop/"):
            self.send_response(302)
            self.send_header("Location", self.path)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if self.path.startswith("/truncated/"):
            body = b'{"images": ['
            self.send_response(200)
            self.send_header("Content-Length", str(len(body) + 1000))
            self.end_headers()
            self.wfile.write(body)
            self.wfile.flush()
            self.close_connection = True
            return
        super().do_GET()


@pytest.fixture
def server(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    hits: dict = {}
    handler = functools.partial(type("H", (_Handler,), {"hits": hits}), directory=str(served))
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield {"url": f"http://127.0.0.1:{httpd.server_address[1]}", "dir": served, "hits": hits}
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("demo"))
    generate_demo_corpus(d, n_train=12, n_heldout=2, image_px=48)
    return {"paths": write_demo_metadata(d, "http://127.0.0.1:1"), "archives": demo_archives(d)}


def _put(directory, name, data: bytes) -> str:
    path = os.path.join(str(directory), name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return path


def _zip(path, members: dict[str, bytes], modes: dict[str, int] | None = None) -> str:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            info = zipfile.ZipInfo(name)
            if modes and name in modes:
                info.external_attr = modes[name] << 16
            zf.writestr(info, data)
    return str(path)


def _tar(path, build) -> str:
    with tarfile.open(path, "w:gz") as tf:
        build(tf)
    return str(path)


def _file_member(tf, name, data=b"x"):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def _files_under(d):
    return sorted(os.path.relpath(os.path.join(p, n), d) for p, _, ns in os.walk(d) for n in ns)


# --------------------------------------------------------------------------- local paths


def test_local_file_resolves_to_itself(tmp_path):
    path = _put(tmp_path, "captions_train2017.json", b"{}")
    assert resolve_metadata([path], str(tmp_path / "cache")) == [path]


def test_local_directory_resolves_to_the_files_under_it(tmp_path):
    a = _put(tmp_path / "vg", "image_data.json", b"[]")
    b = _put(tmp_path / "vg", "sub/region_descriptions.json", b"[]")
    assert resolve_metadata([str(tmp_path / "vg")], str(tmp_path / "cache")) == [a, b]


def test_missing_local_metadata_is_an_error_naming_it(tmp_path):
    with pytest.raises(CCRKError, match="metadata not found: .*nowhere.tsv"):
        resolve_metadata([str(tmp_path / "nowhere.tsv")], str(tmp_path / "cache"))


# --------------------------------------------------------------------------- urls


def test_url_downloads_into_the_cache_once(server, tmp_path):
    _put(server["dir"], "GCC-training.tsv", b"a cat\thttp://example.com/a.jpg\n")
    url = server["url"] + "/GCC-training.tsv"
    first = resolve_metadata([url], str(tmp_path / "cache"))
    second = resolve_metadata([url], str(tmp_path / "cache"))
    assert first == second and os.path.basename(first[0]) == "GCC-training.tsv"
    assert open(first[0], "rb").read() == b"a cat\thttp://example.com/a.jpg\n"
    assert server["hits"]["/GCC-training.tsv"] == 1


@pytest.mark.parametrize("code", [404, 500])
def test_failed_download_is_an_error_naming_the_url(server, tmp_path, code):
    url = f"{server['url']}/status/{code}"
    with pytest.raises(CCRKError, match=f"could not download metadata {url}: HTTP {code}"):
        resolve_metadata([url], str(tmp_path / "cache"))
    assert not any(n for n in _files_under(tmp_path / "cache") if not n.startswith("."))


def test_unreachable_host_is_an_error_naming_the_url(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/captions_train2017.json"
    with pytest.raises(CCRKError, match=f"could not download metadata {url}"):
        resolve_metadata([url], str(tmp_path / "cache"))


def test_redirect_loop_is_an_error_naming_the_url(server, tmp_path):
    url = server["url"] + "/loop/image_data.json"
    with pytest.raises(CCRKError, match=f"could not download metadata {url}: too many redirects"):
        resolve_metadata([url], str(tmp_path / "cache"))


def test_truncated_download_is_an_error_and_leaves_nothing_behind(server, tmp_path):
    url = server["url"] + "/truncated/captions_train2017.json"
    with pytest.raises(CCRKError, match="could not download metadata .*truncated"):
        resolve_metadata([url], str(tmp_path / "cache"))
    assert _files_under(tmp_path / "cache") == []


def test_metadata_url_of_another_scheme_is_refused(tmp_path):
    with pytest.raises(CCRKError, match="must be http"):
        resolve_metadata(["ftp://example.com/GCC-training.tsv"], str(tmp_path / "cache"))


def test_official_archive_downloaded_from_a_url_feeds_the_adapter(server, demo, root):
    with open(demo["archives"]["coco"][0], "rb") as f:
        _put(server["dir"], "annotations/annotations_trainval2017.zip", f.read())
    with open(demo["archives"]["coco"][1], "rb") as f:
        _put(server["dir"], "deepimagesent/caption_datasets.zip", f.read())
    urls = [server["url"] + "/annotations/annotations_trainval2017.zip",
            server["url"] + "/deepimagesent/caption_datasets.zip"]
    from_url = prepare_source("coco", urls, root)
    from_files = prepare_source("coco", demo["paths"]["coco"], root)
    assert from_url.version == from_files.version and from_url.n_captions == 9
    assert os.path.isdir(os.path.join(root, "downloads"))


# --------------------------------------------------------------------------- archives


def test_zip_is_extracted_once(tmp_path, demo):
    archive = demo["archives"]["vg"][0]
    first = resolve_metadata([archive], str(tmp_path / "cache"))
    assert [os.path.basename(f) for f in first] == ["image_data.json"]
    with open(first[0], "rb") as got, open(demo["paths"]["vg"][0], "rb") as want:
        assert got.read() == want.read()
    stamp = os.stat(first[0]).st_mtime_ns
    assert resolve_metadata([archive], str(tmp_path / "cache")) == first
    assert os.stat(first[0]).st_mtime_ns == stamp


def test_tar_gz_is_extracted_with_its_directories(tmp_path, demo):
    files = resolve_metadata([demo["archives"]["sbu"][1]], str(tmp_path / "cache"))
    assert [f.split(os.sep)[-2:] for f in files] == [["dataset", "SBU_captioned_photo_dataset_captions.txt"],
                                                      ["dataset", "SBU_captioned_photo_dataset_urls.txt"]]


def test_keep_patterns_extract_only_the_wanted_members(tmp_path):
    archive = _zip(tmp_path / "annotations_trainval2017.zip", {
        "annotations/captions_train2017.json": b"{}", "annotations/instances_train2017.json": b"{}"})
    files = resolve_metadata([archive], str(tmp_path / "cache"), keep=["captions_*.json"])
    assert [os.path.basename(f) for f in files] == ["captions_train2017.json"]
    assert len(_files_under(tmp_path / "cache")) == 1


@pytest.mark.parametrize("name", ["../evil.json", "a/../../evil.json", "/abs/evil.json", "C:/evil.json"])
def test_zip_member_escaping_the_target_is_refused(tmp_path, name):
    archive = _zip(tmp_path / "bad.zip", {"ok.json": b"{}", name: b"{}"})
    with pytest.raises(CCRKError, match=f"unsafe member '{name}' in archive .*bad.zip"):
        resolve_metadata([archive], str(tmp_path / "cache"))
    assert not os.path.exists(tmp_path / "evil.json") and _files_under(tmp_path / "cache") == []


def test_zip_symlink_member_is_refused(tmp_path):
    archive = _zip(tmp_path / "link.zip", {"image_data.json": b"/etc/passwd"},
                   modes={"image_data.json": stat.S_IFLNK | 0o777})
    with pytest.raises(CCRKError, match="unsafe member 'image_data.json'.*links"):
        resolve_metadata([archive], str(tmp_path / "cache"))


@pytest.mark.parametrize("kind", ["symlink", "hardlink", "chardev", "fifo", "dotdot", "absolute"])
def test_tar_member_that_is_a_link_device_or_escapes_is_refused(tmp_path, kind):
    def build(tf):
        _file_member(tf, "dataset/ok.txt")
        info = tarfile.TarInfo("dataset/bad.txt")
        if kind == "symlink":
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        elif kind == "hardlink":
            info.type, info.linkname = tarfile.LNKTYPE, "dataset/ok.txt"
        elif kind == "chardev":
            info.type, info.devmajor, info.devminor = tarfile.CHRTYPE, 1, 3
        elif kind == "fifo":
            info.type = tarfile.FIFOTYPE
        else:
            _file_member(tf, "../bad.txt" if kind == "dotdot" else "/tmp/bad.txt")
            return
        tf.addfile(info)

    archive = _tar(tmp_path / "bad.tar.gz", build)
    with pytest.raises(CCRKError, match="unsafe member '.*bad.txt' in archive .*bad.tar.gz"):
        resolve_metadata([archive], str(tmp_path / "cache"))
    assert _files_under(tmp_path / "cache") == []


def test_corrupt_archive_is_an_error_naming_it(tmp_path):
    archive = _put(tmp_path, "region_descriptions.json.zip", b"PK\x03\x04 this is not a zip")
    with pytest.raises(CCRKError, match="cannot read metadata archive .*region_descriptions.json.zip"):
        extract_archive(archive, str(tmp_path / "cache"))
