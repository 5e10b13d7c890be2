"""The real chain on the demo corpus: acquire (img2dataset from the loopback server) -> translate
(the demo M2M-100 translator) -> build -> verify -> read. No fixtures stand in for other stages."""
import glob
import os

import pytest

from ccrk.app.cli import main as ccrk
from storage.demo.corpus import generate_demo_corpus, write_demo_metadata
from storage.demo.server import serve


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    pytest.importorskip("translation.pipeline")
    from translation.m2m import DEMO_MODEL_DIR
    if not os.path.exists(os.path.join(DEMO_MODEL_DIR, "config.json")):
        pytest.skip("the translation stage's demo model is not in the tree yet")
    d = tmp_path_factory.mktemp("demo_build")
    root = str(d / "data")
    generate_demo_corpus(str(d / "corpus"), n_train=10, n_heldout=2, image_px=48)
    with serve(str(d / "corpus")) as server:
        paths = write_demo_metadata(str(d / "corpus"), server.url)
        for source in ("coco", "vg"):
            args = ["acquire", "--source", source, "--root", root, "--image-size", "32", "--shard-size", "8",
                    "--allow-address", server.address]
            for p in paths[source]:
                args += ["--metadata", p]
            assert ccrk(args) == 0
    assert ccrk(["translate", "--root", root, "--sources", "coco,vg", "--langs", "es,ru", "--threads", "1"]) == 0
    return root


@pytest.mark.slow
def test_demo_sources_and_translations_build_into_a_verified_readable_dataset(demo_root, capsys):
    from storage.reader import KLingualDataset

    args = ["build", "--root", demo_root, "--name", "demo", "--sources", "coco,vg", "--langs", "en,es,ru",
            "--shard-size", "8"]
    assert ccrk(args) == 0
    (path,) = glob.glob(os.path.join(demo_root, "datasets", "demo", "*"))
    assert ccrk(["verify", path]) == 0
    ds = KLingualDataset(path)
    assert ds.samples() > 0
    image, captions = next(iter(ds))
    assert image.mode == "RGB" and captions and set(captions[0]) == {"en", "es", "ru"}
    assert ccrk(args) == 0 and "nothing to do" in capsys.readouterr().out
