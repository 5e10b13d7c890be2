"""`ccrk acquire` end to end: demo corpus on the loopback server -> source tables, shards, summary, catalog."""
from __future__ import annotations

import glob
import json
import os
import tarfile

import pandas as pd
import pytest

from ccrk.app.cli import main as ccrk
from storage.catalog import Catalog
from storage.demo.corpus import generate_demo_corpus, write_demo_metadata
from storage.demo.server import serve


@pytest.fixture(scope="module")
def acquired(tmp_path_factory):
    d = tmp_path_factory.mktemp("acquire")
    root = str(d / "data")
    generate_demo_corpus(str(d / "corpus"), n_train=24, n_heldout=4, image_px=64)
    with serve(str(d / "corpus")) as server:
        paths = write_demo_metadata(str(d / "corpus"), server.url)
        args = ["acquire", "--source", "coco", "--root", root, "--image-size", "32", "--shard-size", "4",
                "--allow-address", server.address]
        for p in paths["coco"]:
            args += ["--metadata", p]
        code = ccrk(args)
    (version_dir,) = glob.glob(os.path.join(root, "sources", "coco", "*"))
    return root, version_dir, code


def test_cli_acquires_a_source_into_tables_and_shards(acquired):
    root, version_dir, code = acquired
    assert code == 0
    images = pd.read_parquet(os.path.join(version_dir, "images.parquet"))
    summary = json.load(open(os.path.join(version_dir, "summary.json")))
    assert summary["images"] == len(images) == 6  # 24 train images dealt over four sources
    assert summary["images_ok"] == len(images) and summary["images_failed"] == 0
    stored = set()
    for tar_path in sorted(glob.glob(os.path.join(version_dir, "shards", "*.tar"))):
        assert os.path.exists(tar_path[:-4] + "_stats.json") and os.path.exists(tar_path[:-4] + ".parquet")
        with tarfile.open(tar_path) as tar:
            stored |= {json.load(tar.extractfile(m))["image_key"] for m in tar if m.name.endswith(".json")}
    assert stored == set(images["image_key"])


def test_the_source_is_recorded_in_the_catalog_with_its_summary(acquired):
    root, version_dir, _ = acquired
    art = Catalog(root).latest("source", "coco")
    assert art is not None and art.version == os.path.basename(version_dir)
    assert art.stats["images_ok"] == 6


def test_the_summary_is_published_as_a_prefect_table(acquired):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["acquire-coco"])))
    assert arts and arts[0].type == "table"
    rows = arts[0].data if isinstance(arts[0].data, list) else json.loads(arts[0].data)
    assert {"metric": "images_ok", "value": 6} in rows


def test_running_again_downloads_nothing(acquired):
    root, version_dir, _ = acquired
    before = {p: os.path.getmtime(p) for p in glob.glob(os.path.join(version_dir, "shards", "*"))}
    from storage.download import download_images
    from storage.sources import _load_prepared

    summary = download_images(_load_prepared(version_dir), image_size=32, number_sample_per_shard=4, progress=False)
    assert summary["rows_attempted"] == 0 and summary["images_ok"] == 6
    assert {p: os.path.getmtime(p) for p in glob.glob(os.path.join(version_dir, "shards", "*"))} == before


def test_missing_metadata_is_one_clear_error(tmp_path, capsys):
    missing = str(tmp_path / "nope" / "captions_train2017.json")
    code = ccrk(["acquire", "--source", "coco", "--metadata", missing, "--root", str(tmp_path / "data")])
    err = capsys.readouterr().err
    assert code == 2
    assert "nope" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
