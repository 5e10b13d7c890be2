"""`--executor ray`: acquisition and translation on a local Ray cluster (loopback) give exactly what the
local executor gives: the same shards (keys, image bytes per key, counts) and the same translation rows."""
from __future__ import annotations

import glob
import hashlib
import json
import os
import tarfile
import time

import pytest

from storage.demo.corpus import generate_demo_corpus, write_demo_metadata
from storage.demo.server import serve

pytestmark = pytest.mark.slow  # a Ray cluster takes ~15 s to start here; the whole module ~1.5 min

CAPTIONS = ["a small red circle", "a  small red circle ", "a blue star on the left", "a large green heart",
            "a black square at the bottom", "two small yellow triangles on the right"]


@pytest.fixture(scope="module")
def cluster():
    """One private local cluster (2 CPUs, 127.0.0.1) for the module; the stages reuse a running one."""
    from flows.executors import ray_cluster

    with ray_cluster(num_cpus=2) as ray:
        assert ray.util.get_node_ip_address() == "127.0.0.1"
        yield ray
    assert not ray.is_initialized()


def _ray_tasks(ray, label: str) -> int:
    """How many tasks the cluster ran whose function or task name contains ``label`` (task events reach
    it within about a second)."""
    deadline = time.time() + 15
    while True:
        n = sum(1 for e in ray.timeline()
                if e.get("cat", "").startswith("task::") and (label in e.get("name", "") or label in e["cat"]))
        if n or time.time() > deadline:
            return n
        time.sleep(0.5)


def _shard_contents(version_dir: str) -> dict:
    """{shard name: {sample key: (image_key, sha256 of the jpg)}} of every tar."""
    out = {}
    for tar_path in sorted(glob.glob(os.path.join(version_dir, "shards", "*.tar"))):
        samples: dict[str, dict] = {}
        with tarfile.open(tar_path) as tar:
            for m in tar:
                key, ext = m.name.rsplit(".", 1)
                data = tar.extractfile(m).read()
                samples.setdefault(key, {})[ext] = data
        out[os.path.basename(tar_path)] = {k: (json.loads(v["json"])["image_key"], hashlib.sha256(v["jpg"]).hexdigest())
                                           for k, v in samples.items()}
    return out


def test_acquire_on_ray_writes_the_same_shards_as_the_local_executor(cluster, tmp_path):
    from flows.acquire import acquire_flow

    generate_demo_corpus(str(tmp_path / "corpus"), n_train=16, n_heldout=4, image_px=48)
    runs = {}
    with serve(str(tmp_path / "corpus")) as server:
        metadata = write_demo_metadata(str(tmp_path / "corpus"), server.url)["cc3m"]
        for executor in ("local", "ray"):
            runs[executor] = acquire_flow({"source": "cc3m", "metadata": metadata, "image_size": 32,
                                           "number_sample_per_shard": 2, "thread_count": 4, "executor": executor,
                                           "allow_addresses": [server.address]},
                                          root=str(tmp_path / executor))
    local, ray_run = runs["local"], runs["ray"]
    assert ray_run["version"] == local["version"], "the executor is not part of the source version"
    assert ray_run["images_ok"] == local["images_ok"] == local["images"] > 2
    for count in ("images", "images_failed", "shards", "shards_incomplete", "failures"):
        assert ray_run[count] == local[count], count
    contents = _shard_contents(ray_run["path"])
    assert len(contents) >= 2 and contents == _shard_contents(local["path"])
    assert _ray_tasks(cluster, "ray_download") == local["shards"], "one Ray task per shard"


def test_translate_on_ray_stores_the_same_rows_as_the_local_executor(cluster, tmp_path):
    from flows.translate import translate_flow
    from translation import store
    from translation_fixtures import write_source

    rows, summaries = {}, {}
    for executor in ("local", "ray"):
        root = str(tmp_path / executor)
        write_source(root, "coco", CAPTIONS)
        summaries[executor] = translate_flow({"langs": ["es", "ru"], "part_size": 2, "threads": 1, "device": "cpu",
                                              "executor": executor}, root=root)
        rows[executor] = sorted((r["tgt_lang"], r["text_sha"], json.dumps(r, sort_keys=True))
                                for m, d, lang in store.list_stores(root)
                                for r in store.read_dir(store.lang_dir(root, m, d, lang)).to_pylist())
        parts = sorted(os.path.relpath(p, root) for p in glob.glob(os.path.join(root, "translations", "**",
                                                                                "part-*.parquet"), recursive=True))
        summaries[executor]["part_files"] = parts
    local, ray_run = summaries["local"], summaries["ray"]
    assert len(rows["local"]) == 2 * 5  # five unique normalised texts, two languages
    assert rows["ray"] == rows["local"]
    assert ray_run["part_files"] == local["part_files"] and ray_run["parts"] == local["parts"] == 6
    assert ray_run["version"] == local["version"]
    assert [{k: r[k] for k in ("lang", "translated", "flagged")} for r in ray_run["per_lang"]] == \
        [{k: r[k] for k in ("lang", "translated", "flagged")} for r in local["per_lang"]]
    assert _ray_tasks(cluster, "translate-part") == ray_run["parts"], "one Ray task per part"


def test_part_tasks_on_ray_are_recorded_as_prefect_task_runs_of_the_flow(cluster, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, TaskRunFilter, TaskRunFilterName

    from flows.translate import translate_flow
    from translation_fixtures import write_source

    root = str(tmp_path / "data")
    write_source(root, "sbu", CAPTIONS[2:5])
    state = translate_flow({"langs": ["tr"], "part_size": 1, "threads": 1, "executor": "ray"}, root=root,
                           return_state=True)
    assert state.is_completed()
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id])),
            task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_="translate-part")))
    assert len(runs) == 3 and all(r.state.is_completed() for r in runs)


def test_asking_for_gpus_on_a_cluster_without_any_is_one_clear_error(cluster, tmp_path):
    from flows.translate import translate_flow
    from storage.errors import CCRKError
    from translation_fixtures import write_source

    root = str(tmp_path / "data")
    write_source(root, "coco", CAPTIONS[:2])
    with pytest.raises(CCRKError, match="the Ray cluster has none"):
        translate_flow({"langs": ["es"], "device": "cuda", "executor": "ray"}, root=root)


def test_an_unknown_executor_is_one_clear_error(root):
    from ccrk.app.cli import main as ccrk
    from flows.executors import check_executor
    from storage.errors import CCRKError

    with pytest.raises(CCRKError, match="unknown executor 'spark'"):
        check_executor("spark")
    assert ccrk(["translate", "--root", root, "--ray-address", "127.0.0.1:6379"]) == 2
