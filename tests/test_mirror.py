"""`ccrk acquire --from-webdataset`: a local mirror in pixparse/cc3m-wds's layout (tars of
{key}.jpg / {key}.txt / {key}.json made here from demo images) acquired into the same source artifact
as a web download of the same CC3M metadata, and composed with --retry-failed.

The metadata: 12 CC3M rows (rows 9-11 answer 404 on the web; rows 6 and 7 share one caption). The
mirror: three tars holding rows 0-5 and 8-11 (row 1's url spelled differently, rows 4 and 5 without a
url: matched by caption), row 6 without a url (its caption is ambiguous), a sample of an image the
metadata does not list, and a second copy of row 0. Row 7 is not in it.
"""
from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time

import pandas as pd
import pytest
from PIL import Image

from ccrk.app.cli import main as ccrk
from storage.demo.corpus import generate_demo_corpus, load_manifest
from storage.demo.server import serve
from storage.download import latest_status
from storage.mirror import list_mirror, normalize_url
from storage.sources import _load_prepared, prepare_source

N_ROWS = 12
WEB_404 = (9, 10, 11)
SHARED_CAPTION = "two shapes share this caption"
MIRROR_PX = 40  # the mirror maker's own resize
ARGS = ["--source", "cc3m", "--image-size", "32", "--shard-size", "4"]
SETTINGS = {"image_size": 32, "resize_mode": "border", "resize_only_if_bigger": False,
            "max_image_area": 89_478_485, "encode_quality": 95, "number_sample_per_shard": 4, "processes": 1}


def _caption(i: int, manifest: dict) -> str:
    return SHARED_CAPTION if i in (6, 7) else f"picture {i}: {manifest['images'][i]['captions'][0]['en']}"


def _metadata(d, base_url: str, manifest: dict) -> tuple[str, list[str]]:
    urls = [f"{base_url}/{'bad/404/' if i in WEB_404 else ''}images/demo{i:05d}.jpg" for i in range(N_ROWS)]
    path = str(d / "Train_GCC-training.tsv")
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(f"{_caption(i, manifest)}\t{u}\n" for i, u in enumerate(urls))
    return path, urls


def _member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(data), 1577836800
    tar.addfile(info, io.BytesIO(data))


def _write_tar(path: str, samples: list[dict]) -> None:
    """One tar in the pixparse layout: {key}.jpg, {key}.json (img2dataset's fields), {key}.txt."""
    with tarfile.open(path, "w") as tar:
        for s in samples:
            _member(tar, f"{s['key']}.jpg", s["jpg"])
            if s.get("json") is not None:
                _member(tar, f"{s['key']}.json", json.dumps(s["json"], indent=4).encode())
            _member(tar, f"{s['key']}.txt", s["txt"].encode())


def _mirror(out_dir: str, corpus: str, manifest: dict, urls: list[str]) -> list[str]:
    def sample(n: int, i: int, url: str | None, json_too: bool = True, caption: str | None = None) -> dict:
        im = Image.open(os.path.join(corpus, manifest["images"][i]["file"])).resize((MIRROR_PX, MIRROR_PX))
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=90)
        jpg, key, txt = buf.getvalue(), f"{n:09d}", caption or _caption(i, manifest)
        meta = {"caption": txt, "key": key, "status": "success", "error_message": None, "width": MIRROR_PX,
                "height": MIRROR_PX, "original_width": 48, "original_height": 48, "exif": "{}",
                "sha256": hashlib.sha256(jpg).hexdigest()}
        if url is not None:
            meta = {"url": url, **meta}
        return {"key": key, "jpg": jpg, "txt": txt, "json": meta if json_too else None}

    shouted = "HTTP" + urls[1][len("http"):] + "#top"  # another spelling of row 1's url
    tars = [
        [sample(0, 0, urls[0]), sample(1, 1, shouted), sample(2, 2, urls[2]), sample(3, 3, urls[3])],
        [sample(4, 4, None), sample(5, 5, None, json_too=False), sample(6, 6, None, json_too=False),
         sample(7, 12, urls[0].replace("demo00000", "demo00012")), sample(8, 0, urls[0])],
        [sample(n, i, urls[i]) for n, i in zip(range(9, 13), (8, 9, 10, 11))],
    ]
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for k, samples in enumerate(tars):
        paths.append(os.path.join(out_dir, f"cc3m-train-{k:04d}.tar"))
        _write_tar(paths[-1], samples)
    return paths


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("mirror")
    corpus = str(d / "corpus")
    generate_demo_corpus(corpus, n_train=16, n_heldout=0, image_px=48)
    manifest = load_manifest(corpus)
    with serve(corpus) as server:
        tsv, urls = _metadata(d, server.url, manifest)
        mirror_dir = str(d / "cc3m-wds")
        tars = _mirror(mirror_dir, corpus, manifest, urls)
        web_root = str(d / "web")
        allow = ["--allow-address", server.address]  # the loopback server (storage.addresses)
        assert ccrk(["acquire", *ARGS, "--metadata", tsv, "--root", web_root, *allow]) == 0
        (web_dir,) = glob.glob(os.path.join(web_root, "sources", "cc3m", "*"))
        web_before = _json(web_dir, "summary.json")
        web_files = {p: os.path.getmtime(p) for p in glob.glob(os.path.join(web_dir, "shards", "*"))}
        mirror_root = str(d / "mirrored")
        code = ccrk(["acquire", *ARGS, "--metadata", tsv, "--root", mirror_root, "--from-webdataset", mirror_dir])
        (mirror_dir_v,) = glob.glob(os.path.join(mirror_root, "sources", "cc3m", "*"))
        fill_code = ccrk(["acquire", *ARGS, "--metadata", tsv, "--root", web_root, "--retry-failed",
                          "--from-webdataset", mirror_dir, *allow])
    return {"d": d, "tsv": tsv, "urls": urls, "mirror": mirror_dir, "tars": tars, "web": web_dir,
            "web_before": web_before, "web_files": web_files, "code": code, "dir": mirror_dir_v,
            "fill_code": fill_code, "corpus": corpus}


def _json(directory: str, name: str) -> dict:
    with open(os.path.join(directory, name)) as f:
        return json.load(f)


def _row_keys(directory: str) -> list[str]:
    return pd.read_parquet(os.path.join(directory, "images.parquet"))["image_key"].tolist()


def _ok_keys(directory: str) -> set[str]:
    st = latest_status(os.path.join(directory, "shards"))
    return set(st.loc[st["status"] == "success", "image_key"])


def _tar_images(directory: str) -> dict[str, Image.Image]:
    out = {}
    for path in sorted(glob.glob(os.path.join(directory, "shards", "*.tar"))):
        with tarfile.open(path) as tar:
            for m in tar:
                if m.name.endswith(".json"):
                    meta = json.load(tar.extractfile(m))
                    out[meta["image_key"]] = Image.open(tar.extractfile(m.name[:-5] + ".jpg"))
    return out


# --------------------------------------------------------------------------- mirror alone


def test_the_mirror_gives_the_same_source_version_and_image_keys_as_the_web(world):
    assert world["code"] == 0
    assert os.path.basename(world["dir"]) == os.path.basename(world["web"])
    keys = _row_keys(world["web"])
    assert _row_keys(world["dir"]) == keys
    assert _ok_keys(world["dir"]) == {keys[i] for i in range(N_ROWS) if i not in (6, 7)}


def test_matches_by_url_and_by_caption_and_counts_the_rest(world):
    m = _json(world["dir"], "summary.json")["mirror"]
    assert (m["samples"], m["matched_by_url"], m["matched_by_caption"]) == (13, 8, 2)
    assert (m["unmatched_url"], m["ambiguous_caption"], m["duplicate"], m["unmatched_caption"]) == (1, 1, 1, 0)
    assert (m["targets"], m["filled"], m["not_in_mirror"]) == (N_ROWS, 10, 2)


def test_official_rows_absent_from_the_mirror_fail_as_not_in_mirror(world):
    summary = _json(world["dir"], "summary.json")
    assert summary["images_ok"] == summary["images_from_mirror"] == 10
    assert summary["failures"]["not_in_mirror"] == 2 and summary["images_failed"] == 2
    assert summary["not_attempted"] == 0 and summary["shards_incomplete"] == 0
    status = pd.read_parquet(os.path.join(world["dir"], "download_status.parquet")).set_index("image_key")
    keys = _row_keys(world["dir"])
    assert set(status.index[status["error_class"] == "not_in_mirror"]) == {keys[6], keys[7]}


def test_mirror_images_are_resized_again_by_img2dataset_with_the_configured_size(world):
    images = _tar_images(world["dir"])
    assert len(images) == 10 and {im.size for im in images.values()} == {(32, 32)}
    st = pd.concat(pd.read_parquet(p) for p in sorted(glob.glob(os.path.join(world["dir"], "shards", "*.parquet"))))
    ok = st[st["status"] == "success"]
    assert set(ok["original_width"]) == {MIRROR_PX} and set(ok["width"]) == {32}
    # the shard contract: tar, parquet and stats per shard, keys unique, shards of at most 4 rows
    assert ok["key"].is_unique and st.groupby(st["key"].str[:5]).size().max() <= 4


def test_a_source_from_the_mirror_builds(world):
    root = os.path.dirname(os.path.dirname(os.path.dirname(world["dir"])))
    assert ccrk(["build", "--root", root, "--name", "m", "--sources", "cc3m", "--langs", "en", "--shard-size", "4"]) == 0
    (path,) = glob.glob(os.path.join(root, "datasets", "m", "*"))
    assert ccrk(["verify", path]) == 0
    from storage.reader import KLingualDataset

    assert KLingualDataset(path).samples() == 10


def test_running_the_same_mirror_again_reads_nothing(world):
    before = {p: os.path.getmtime(p) for p in glob.glob(os.path.join(world["dir"], "shards", "*"))}
    assert ccrk(["acquire", *ARGS, "--metadata", world["tsv"], "--root",
                 os.path.dirname(os.path.dirname(os.path.dirname(world["dir"]))),
                 "--from-webdataset", world["mirror"]]) == 0
    assert {p: os.path.getmtime(p) for p in glob.glob(os.path.join(world["dir"], "shards", "*"))} == before
    assert _json(world["dir"], "summary.json")["images_ok"] == 10


# --------------------------------------------------------------------------- composed with --retry-failed


def test_retry_failed_with_a_mirror_fills_only_what_the_web_lost(world):
    assert world["web_before"]["images_ok"] == 9 and world["web_before"]["failures"]["not_found_404"] == 3
    assert world["fill_code"] == 0
    summary = _json(world["web"], "summary.json")
    keys = _row_keys(world["web"])
    assert summary["images_ok"] == N_ROWS and summary["images_from_mirror"] == 3
    m = summary["mirror"]
    assert (m["targets"], m["filled"], m["not_needed"], m["not_in_mirror"]) == (3, 3, 8, 0)
    # the web download's shards are untouched; the new ones come after them and hold only the lost images
    assert all(os.path.getmtime(p) == t for p, t in world["web_files"].items())
    last_web = max(int(os.path.basename(p)[:5]) for p in world["web_files"])
    status = latest_status(os.path.join(world["web"], "shards"))
    filled = status[status["shard"] > last_web]
    assert set(filled["image_key"]) == {keys[i] for i in WEB_404} and set(filled["status"]) == {"success"}
    assert (status.set_index("image_key").loc[[keys[i] for i in WEB_404], "attempts"] == 2).all()


def test_a_mirror_without_retry_failed_does_not_mix_into_a_web_download(world, capsys):
    code = ccrk(["acquire", *ARGS, "--metadata", world["tsv"],
                 "--root", os.path.dirname(os.path.dirname(os.path.dirname(world["web"]))),
                 "--from-webdataset", world["mirror"]])
    assert code != 0 and "add --retry-failed" in capsys.readouterr().err


# --------------------------------------------------------------------------- resume after kill -9


def test_a_fill_killed_mid_mirror_resumes_to_the_same_shards_and_counts(world, tmp_path):
    """The third tar comes over HTTP from the loopback server, 4 s late (room for a loaded machine):
    the fill is killed -9 while it waits, after the first two tars' shards; the rerun reads on from there."""
    root = str(tmp_path / "data")
    prepared = prepare_source("cc3m", [world["tsv"]], root, download_params=_download_params())
    assert os.path.basename(prepared.directory) == os.path.basename(world["dir"])
    with serve(world["mirror"]) as server:
        specs = world["tars"][:2] + [f"{server.url}/delay/4000/cc3m-train-0002.tar"]
        code = ("import json, sys; from storage.mirror import fill_from_mirror; from storage.sources import "
                "_load_prepared; fill_from_mirror(_load_prepared(sys.argv[1]), json.loads(sys.argv[2]), "
                "json.loads(sys.argv[3]))")
        proc = subprocess.Popen([sys.executable, "-c", code, prepared.directory, json.dumps(specs),
                                 json.dumps(SETTINGS)], cwd=os.path.dirname(os.path.dirname(__file__)),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        state = os.path.join(prepared.directory, "mirror.json")
        deadline = time.time() + 60
        while time.time() < deadline and proc.poll() is None:
            if os.path.exists(state) and json.load(open(state))["fills"][-1]["next_tar"] >= 2:
                break
            time.sleep(0.02)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        fill = json.load(open(state))["fills"][-1]
        assert not fill["complete"] and fill["next_tar"] == 2
        from storage.mirror import fill_from_mirror

        fds = [(os.fstat(fd).st_dev, os.fstat(fd).st_ino) for fd in (1, 2)]
        summary = fill_from_mirror(_load_prepared(prepared.directory), specs, SETTINGS)
        # img2dataset's resizer dup2s fds 1 and 2 to /dev/null around OpenCV: they come back
        assert [(os.fstat(fd).st_dev, os.fstat(fd).st_ino) for fd in (1, 2)] == fds
    (fill,) = json.load(open(state))["fills"]
    assert fill["complete"] and fill["next_tar"] == 3 and fill["end"] == fill["next_shard"]
    reference = _json(world["dir"], "summary.json")
    assert {k: v for k, v in summary["mirror"].items() if k != "mirror"} == \
        {k: v for k, v in reference["mirror"].items() if k != "mirror"}
    got = pd.read_parquet(os.path.join(prepared.directory, "download_status.parquet"))
    want = pd.read_parquet(os.path.join(world["dir"], "download_status.parquet"))
    cols = ["image_key", "status", "error_class", "attempts"]
    assert got[cols].sort_values("image_key").values.tolist() == want[cols].sort_values("image_key").values.tolist()
    assert sorted(_tar_images(prepared.directory)) == sorted(_tar_images(world["dir"]))


def _download_params() -> dict:
    from storage.specs import AcquireSpec

    return AcquireSpec(source="cc3m", image_size=32, number_sample_per_shard=4).download_params()


# --------------------------------------------------------------------------- pieces


def test_url_normalisation_agrees_on_spellings_of_one_url():
    assert normalize_url(" HTTPS://Example.COM:443/a/B.jpg?x=1#frag ") == normalize_url("http://example.com/a/B.jpg?x=1")
    assert normalize_url("http://example.com/a/b.jpg") != normalize_url("http://example.com/a/B.jpg")


def test_a_mirror_is_listed_from_a_folder_a_glob_or_a_brace_range(world, tmp_path):
    tars = world["tars"]
    assert list_mirror([world["mirror"]]) == tars
    assert list_mirror([os.path.join(world["mirror"], "*-000[02].tar")]) == [tars[0], tars[2]]
    assert list_mirror([os.path.join(world["mirror"], "cc3m-train-{0001..0002}.tar")]) == tars[1:]
    from storage.errors import CCRKError

    with pytest.raises(CCRKError, match="mirror not found"):
        list_mirror([str(tmp_path / "nope")])
