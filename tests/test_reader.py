"""Reading a built dataset: our training reader (exact resume) and plain webdataset / wids."""
import glob
import os

import pytest

from klingual_fixtures import ensure_normalize, tiny_corpus
from storage.build import build_dataset
from storage.reader import KLingualDataset

ensure_normalize()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("reader"))
    tiny_corpus(root)
    return build_dataset(root, name="tiny", sources=["coco", "vg"], langs="en,es,ru", shard_size=2)


def _texts(items):
    return [caps[0]["en"] for _, caps in items]


def test_reader_yields_rgb_images_and_caption_dicts(dataset):
    ds = KLingualDataset(dataset.path)
    items = list(ds)
    assert ds.samples() == len(items) == 5
    for image, captions in items:
        assert image.mode == "RGB" and image.size == (24, 24)
        assert captions and all(set(c) == {"en", "es", "ru"} for c in captions)
    assert sorted(_texts(items)) == sorted(["a red circle", "a blue square", "an orange triangle",
                                            "a yellow star", "a black square"])


def test_langs_selects_languages(dataset):
    _, captions = next(iter(KLingualDataset(dataset.path, langs=["ru"])))
    assert all(set(c) == {"ru"} for c in captions)


def test_shuffle_is_a_seeded_permutation_and_resume_is_exact(dataset):
    plain = _texts(KLingualDataset(dataset.path))
    a = KLingualDataset(dataset.path, shuffle_seed=3)
    order = _texts(a)
    assert order == _texts(KLingualDataset(dataset.path, shuffle_seed=3))
    assert sorted(order) == sorted(plain)
    assert any(_texts(KLingualDataset(dataset.path, shuffle_seed=s)) != plain for s in range(4))
    for offset in range(6):
        assert _texts(a.iter_from(offset)) == order[offset:]
    a.set_epoch(1)
    assert sorted(_texts(a)) == sorted(plain)


def test_worker_parts_split_the_order_exactly(dataset):
    ds = KLingualDataset(dataset.path, shuffle_seed=0)
    order = _texts(ds)
    parts = [_texts(ds.iter_from(1, part=p, parts=2)) for p in range(2)]
    assert parts == [order[1::2], order[2::2]]


def test_plain_webdataset_reads_the_shards(dataset):
    import webdataset as wds

    urls = sorted(glob.glob(os.path.join(dataset.path, "shards", "shard-*.tar")))
    got = list(wds.WebDataset(urls, shardshuffle=False).decode("pil").to_tuple("__key__", "jpg", "json"))
    assert len(got) == 5
    for key, image, meta in got:
        assert "." not in key and image.size == (24, 24)
        assert meta["image_key"] == key and meta["captions"][0]["es"].startswith("ES ")
    ours = [KLingualDataset(dataset.path).metadata(i)["image_key"] for i in range(5)]
    assert [k for k, _, _ in got] == ours


def test_wids_reads_the_shard_index(dataset):
    wids = pytest.importorskip("wids")
    ds = wids.ShardListDataset(os.path.join(dataset.path, "shards", "wids-index.json"))
    assert len(ds) == 5
    sample = ds[3]
    assert ".jpg" in sample and ".json" in sample
