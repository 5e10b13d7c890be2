"""Multi30K as a pre-training source: the published layout (data/task1/raw/<split>.en.gz aligned with
image_splits/<split>.txt) read into images / captions, its Flickr30K images from a local folder
into shards of the download's contracts, then the demo chain: translate (the demo translator) and
build en + es, as CL2CM's setting needs."""
from __future__ import annotations

import glob
import gzip
import json
import os
import shutil

import pandas as pd
import pytest

from ccrk.app.cli import main as ccrk
from storage.demo.corpus import generate_demo_corpus, load_manifest
from storage.demo.multi30k import TASK1, flickr_id, write_multi30k_layout
from storage.download import latest_status
from storage.errors import CCRKError
from storage.manifest import summary as manifest_summary
from storage.sources import prepare_source

ARGS = ["--source", "multi30k", "--image-size", "32", "--shard-size", "8"]


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    d = tmp_path_factory.mktemp("multi30k")
    generate_demo_corpus(str(d / "corpus"), n_train=20, n_heldout=4, image_px=48)
    out = write_multi30k_layout(str(d / "corpus"), str(d / "multi30k"))
    return {"d": d, "corpus": str(d / "corpus"), **out}


def _lines(path: str) -> list[str]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f]


def test_the_source_reads_the_published_layout_line_by_line(layout, tmp_path):
    prepared = prepare_source("multi30k", [layout["metadata"]], str(tmp_path / "data"))
    images = pd.read_parquet(prepared.images_path)
    captions = pd.read_parquet(prepared.captions_path)
    task1 = os.path.join(layout["metadata"], TASK1)
    for split in ("train", "val"):
        names = _lines(os.path.join(task1, "image_splits", f"{split}.txt"))
        texts = _lines(os.path.join(task1, "raw", f"{split}.en.gz"))
        got = captions[captions["split"] == split].sort_values("row")
        assert got["caption"].tolist() == texts
        assert got["image_key"].tolist() == [f"multi30k-{os.path.splitext(n)[0]}" for n in names]
    assert len(images) == layout["splits"]["train"] + layout["splits"]["val"] == 20
    assert images["url"].isna().all() and (images["file"] == images["source_id"] + ".jpg").all()
    heldout = {flickr_id(im) for im in load_manifest(layout["corpus"])["images"] if im["split"] == "heldout"}
    assert not heldout & set(images["source_id"])  # the test split is evaluation data: never read


def test_files_that_do_not_align_are_one_clear_error(layout, tmp_path):
    bad = tmp_path / "m30k"
    shutil.copytree(os.path.join(layout["metadata"], "data"), bad / "data")
    split_file = bad / TASK1 / "image_splits" / "train.txt"
    split_file.write_text("".join(name + "\n" for name in _lines(str(split_file))[:-1]))  # one image short
    with pytest.raises(CCRKError, match="must align line by line"):
        prepare_source("multi30k", [str(bad)], str(tmp_path / "data"))


def test_multi30k_needs_its_image_folder(layout, tmp_path, capsys):
    code = ccrk(["acquire", *ARGS, "--metadata", layout["metadata"], "--root", str(tmp_path / "data")])
    err = capsys.readouterr().err
    assert code != 0 and "--images" in err and len(err.strip().splitlines()) == 1


def test_a_missing_image_file_is_a_counted_failure(layout, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(layout["images"], images)
    gone = sorted(os.listdir(images))[3]
    os.unlink(images / gone)
    root = str(tmp_path / "data")
    assert ccrk(["acquire", *ARGS, "--metadata", layout["metadata"], "--images", str(images), "--root", root]) == 0
    (version_dir,) = glob.glob(os.path.join(root, "sources", "multi30k", "*"))
    summary = json.load(open(os.path.join(version_dir, "summary.json")))
    assert (summary["images_ok"], summary["failures"]["file_not_found"]) == (19, 1)
    status = latest_status(os.path.join(version_dir, "shards"))
    assert status.loc[status["status"] != "success", "image_key"].tolist() == [f"multi30k-{gone[:-4]}"]


@pytest.fixture(scope="module")
def chain(layout):
    pytest.importorskip("translation.pipeline")
    from translation.m2m import DEMO_MODEL_DIR
    if not os.path.exists(os.path.join(DEMO_MODEL_DIR, "config.json")):
        pytest.skip("the translation stage's demo model is not in the tree yet")
    root = str(layout["d"] / "data")
    acquired = ccrk(["acquire", "--source", "multi30k", "--image-size", "64", "--shard-size", "8",
                     "--metadata", layout["metadata"], "--images", layout["images"], "--root", root])
    translated = ccrk(["translate", "--root", root, "--sources", "multi30k", "--langs", "es", "--threads", "1"])
    built = ccrk(["build", "--root", root, "--name", "m30k", "--sources", "multi30k", "--langs", "en,es",
                  "--shard-size", "8"])
    return root, (acquired, translated, built)


def test_acquire_translate_build_gives_en_es_tuples_of_every_image(chain, layout):
    from storage.reader import KLingualDataset

    root, codes = chain
    assert codes == (0, 0, 0)
    (path,) = glob.glob(os.path.join(root, "datasets", "m30k", "*"))
    assert ccrk(["verify", path]) == 0
    ds = KLingualDataset(path)
    assert ds.samples() == 20
    image, captions = next(iter(ds))
    assert image.size == (64, 64) and set(captions[0]) == {"en", "es"}


def test_a_cl2cm_config_trains_on_the_multi30k_dataset(chain, tmp_path):
    from ccrk.trainer import load_config, train

    root, _ = chain
    (path,) = glob.glob(os.path.join(root, "datasets", "m30k", "*"))
    config = load_config(os.path.join(os.path.dirname(__file__), "..", "configs", "cl2cm-demo.yaml"))
    config["langs"] = ["en", "es"]
    config["cl2cm"]["target_lang"] = "es"  # CL2CM's setting: one target language, machine-translated
    config["train"].update({"batch_size": 4, "steps": 2, "epochs": None, "log_every": 1, "eval_every": 1000,
                            "checkpoint_every": 1000, "heldout": 4})
    summary = train(config, path, str(tmp_path / "run"), root=root)
    assert summary["steps"] == 2



def test_the_repository_archive_of_sources_yaml_reads_as_the_checkout(layout, tmp_path):
    """configs/sources.yaml points at GitHub's zip of the repository (``dataset-master/data/task1/...``,
    Task 2's files beside): it prepares the same source, same version, as the checkout folder."""
    import zipfile

    from storage.sources import default_metadata

    assert default_metadata("multi30k") == ["https://github.com/multi30k/dataset/archive/refs/heads/master.zip"]
    archive = tmp_path / "master.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for path in glob.glob(os.path.join(layout["metadata"], "**", "*"), recursive=True):
            if os.path.isfile(path):
                z.write(path, os.path.join("dataset-master", os.path.relpath(path, layout["metadata"])))
        z.writestr("dataset-master/data/task2/raw/train.en.gz", gzip.compress(b"not task 1\n"))
        z.writestr("dataset-master/data/task2/image_splits/train.txt", "1.jpg\n")
    root = str(tmp_path / "data")
    from_zip = prepare_source("multi30k", [str(archive)], root)
    from_folder = prepare_source("multi30k", [layout["metadata"]], root)
    assert from_zip.version == from_folder.version and from_zip.n_captions == from_folder.n_captions > 0


def test_the_cl2cm_multi30k_demo_config_runs_as_shipped_on_a_smaller_corpus(tmp_path):
    """configs/cl2cm-multi30k-demo.yaml, its corpus and schedule cut down: the demo in Multi30K's layout
    is acquired as the multi30k source (images from its folder), translated, built en + es with the
    demo benchmark excluded, CL2CM trained on es, and scored in en and es."""
    import yaml

    from flows.reproduce import reproduce_flow

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(repo, "configs", "cl2cm-multi30k-demo.yaml"), encoding="utf-8") as f:
        config = yaml.safe_load(f)
    config["corpus"].update(n_train=40, n_heldout=8, port=0)
    (run,) = config["pretrain"]["runs"]
    run["config"] = os.path.join(repo, run["config"])
    run["overrides"]["train"] = {"epochs": 1, "heldout": 8}
    path = tmp_path / "cl2cm-multi30k-demo.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    out = reproduce_flow(str(path), root=str(tmp_path / "data"))
    assert list(out["sources"]) == ["multi30k"]
    summary = manifest_summary(out["dataset"])
    assert summary["n_samples"] == 40 and summary["benchmark_overlap"] == {"demo": 0}
    assert summary["lang_counts"] == {2: 40}
    with open(os.path.join(out["report"], "compare.json"), encoding="utf-8") as f:
        (row,) = json.load(f)["rows"]
    assert row["run"] == "cl2cm-multi30k-es" and row["MRV langs"] == "en,es" and 0 <= row["es"] <= 100


def test_an_image_name_that_is_no_plain_file_name_is_a_counted_reject(layout, tmp_path):
    bad = tmp_path / "m30k"
    shutil.copytree(os.path.join(layout["metadata"], "data"), bad / "data")
    split_file = bad / TASK1 / "image_splits" / "train.txt"
    names = _lines(str(split_file))
    crafted = ["../../etc/passwd", "..", "/dev/zero", "a\\b.jpg"]
    split_file.write_text("".join(n + "\n" for n in crafted + names[len(crafted):]))
    prepared = prepare_source("multi30k", [str(bad)], str(tmp_path / "data"))
    assert prepared.rejected["malformed_row"] == len(crafted)
    files = pd.read_parquet(prepared.images_path)["file"].tolist()
    assert not set(crafted) & set(files)
    assert len(files) == layout["splits"]["train"] + layout["splits"]["val"] - len(crafted)
