"""Failures the user can act on are one line and exit status 2, not a traceback: a full disk (naming
the file being written), a checkpoint whose safetensors file is garbage (naming it), and a COCO id
too large for the tables (a counted malformed row)."""
import errno
import json
import os
import shutil
import stat
import subprocess
import sys

import pytest

from ccrk.app.cli import error_line
from klingual_fixtures import ensure_normalize, tiny_corpus
from storage import atomic
from storage.errors import CCRKError

ensure_normalize()


def _env(root: str, **extra) -> dict:
    from prefect.settings import PREFECT_API_URL

    return {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PREFECT_LOGGING_LEVEL": "WARNING",
            "CCRK_ROOT": root, **extra}


def _can_mount_tmpfs(where: str) -> bool:
    """A private mount namespace (unprivileged, through a user namespace) may mount a tmpfs here."""
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=16k tmpfs '{where}'"],
                           capture_output=True)
    return probe.returncode == 0


def test_a_build_on_a_full_disk_is_one_line_naming_the_file(root):
    """A real full disk: ``ccrk build`` with its datasets/ on a 16 KiB tmpfs (in a private mount
    namespace, so nothing outside the test sees it)."""
    tiny_corpus(root)
    datasets = os.path.join(root, "datasets")
    os.makedirs(datasets)
    if not _can_mount_tmpfs(datasets):
        pytest.skip("no unprivileged mount namespace here (unshare -rm) to make a small full disk")
    build = (f"mount -t tmpfs -o size=16k tmpfs '{datasets}' && exec '{sys.executable}' -m ccrk.app.cli build "
             f"--root '{root}' --name t --sources coco,vg --langs en,es,ru --shard-size 1")
    out = subprocess.run(["unshare", "-rm", "sh", "-c", build], env=_env(root), capture_output=True, text=True,
                         timeout=150)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr + out.stdout and "leaked" not in out.stderr
    last = out.stderr.rstrip().splitlines()[-1]
    assert last.startswith(f"ccrk build: error: no space left on device writing {datasets}{os.sep}t{os.sep}"), last
    assert last.endswith("free some space, then run the same command again to resume")


def test_a_full_disk_names_the_file_an_atomic_write_was_writing(tmp_path):
    """The ENOSPC of a real write (to /dev/full) inside an atomic write names the file it was for."""
    if not (os.path.exists("/dev/full") and stat.S_ISCHR(os.stat("/dev/full").st_mode)):
        pytest.skip("no /dev/full device here")
    target = str(tmp_path / "out" / "table.json")
    with pytest.raises(OSError) as caught:
        with atomic.atomic_path(target):
            with open("/dev/full", "wb") as f:
                f.write(b"x" * (1 << 16))
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == target
    assert error_line(caught.value).startswith(f"no space left on device writing {target}: ")
    assert not os.path.exists(target) and os.listdir(tmp_path / "out") == []


def test_the_error_line_of_a_full_disk_says_so_whoever_raised_it():
    """pyarrow and DuckDB report a full disk in their own exception types, naming no file."""
    import duckdb

    arrow = OSError(errno.ENOSPC, "Error writing bytes to file. Detail: [errno 28] No space left on device")
    assert error_line(arrow) == ("no space left on device ([Errno 28] Error writing bytes to file. Detail: [errno 28] "
                                 "No space left on device): free some space, then run the same command again to resume")
    db = duckdb.IOException('IO Error: Could not write file "/d/manifest.duckdb": No space left on device')
    assert error_line(db).startswith('no space left on device (IO Error: Could not write file "/d/manifest.duckdb"')
    assert error_line(ValueError("a bug")) is None  # its traceback is shown


@pytest.fixture(scope="module")
def damaged_run(tmp_path_factory):
    """A tiny run directory (checkpoint and tokenizer) whose model.safetensors is random bytes."""
    import torch

    from ccrk.model import build_model, save_model
    from ccrk.trainer import load_config

    torch.manual_seed(0)
    config = load_config(os.path.join(os.path.dirname(__file__), "..", "configs", "tiny.yaml"))
    model, tok = build_model(config)
    run = tmp_path_factory.mktemp("damaged") / "run"
    ckpt = run / "checkpoints" / "step-0000001"
    save_model(model, config, str(ckpt))
    tok.save_pretrained(str(run / "tokenizer"))
    weights = ckpt / "model.safetensors"
    weights.write_bytes(os.urandom(4096))
    return str(run), str(weights), model


def test_a_garbage_safetensors_checkpoint_is_one_line_naming_it(damaged_run):
    from ccrk.model import load_pretrained

    run, weights, _ = damaged_run
    with pytest.raises(CCRKError) as caught:
        load_pretrained(run)
    message = str(caught.value)
    assert message.startswith(f"{weights} is not a readable safetensors file (") and "\n" not in message
    with pytest.raises(CCRKError, match="is not a readable safetensors file"):
        load_pretrained(run, vision={"image_size": 64})  # the resized load reads it too


def test_evaluating_a_garbage_checkpoint_is_one_line_naming_it(damaged_run, tmp_path, root):
    from ccrk.evaluation.demo_benchmark import write_demo_benchmark
    from storage.demo.corpus import generate_demo_corpus

    run, weights, _ = damaged_run
    generate_demo_corpus(str(tmp_path / "corpus"), n_train=4, n_heldout=4, image_px=32)
    write_demo_benchmark(str(tmp_path / "corpus"), str(tmp_path / "bench"), langs=("en", "es"))
    out = subprocess.run([sys.executable, "-m", "ccrk.app.cli", "evaluate", "--checkpoint", run, "--benchmark", "demo",
                          "--data", str(tmp_path / "bench"), "--langs", "en,es", "--root", root, "--device", "cpu"],
                         env=_env(root), capture_output=True, text=True, timeout=150)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr + out.stdout and "leaked" not in out.stderr
    assert out.stderr.rstrip().splitlines()[-1].startswith(
        f"ccrk evaluate: error: {weights} is not a readable safetensors file (")


def test_resuming_from_a_garbage_checkpoint_is_one_line_naming_it(damaged_run):
    import torch

    from ccrk import distributed
    from ccrk.trainer import load_checkpoint

    run, weights, model = damaged_run
    ckpt = os.path.dirname(weights)
    info = distributed.DistInfo(rank=0, world=1, local_rank=0, device=torch.device("cpu"))
    opt = torch.optim.AdamW(model.parameters())
    with pytest.raises(CCRKError, match=f"^{weights} is not a readable safetensors file"):
        load_checkpoint(ckpt, model, opt, info)


def test_a_coco_id_beyond_int64_is_a_counted_malformed_row(tmp_path, root):
    from storage.sources import prepare_source

    big = 2 ** 70
    data = {"images": [{"id": big, "coco_url": "http://images.test/a.jpg", "width": 8, "height": 8},
                       {"id": 5, "coco_url": "http://images.test/b.jpg", "width": 8, "height": 2 ** 64},
                       {"id": 6, "coco_url": "http://images.test/c.jpg", "width": 8, "height": 8}],
            "annotations": [{"id": 1, "image_id": big, "caption": "a cat"},
                            {"id": big, "image_id": 6, "caption": "a dog"},
                            {"id": 3, "image_id": 6, "caption": "a dog again"}]}
    path = tmp_path / "captions_val2017.json"
    path.write_text(json.dumps(data))
    p = prepare_source("coco", [str(path)], root, settings={"all_official_images": True})
    assert p.rejected == {"malformed_row": 4}
    assert p.n_images == 1 and p.n_captions == 1


def test_a_visual_genome_id_beyond_int64_is_a_counted_malformed_row(tmp_path, root):
    from storage.sources import prepare_source

    big = 2 ** 64
    images = [{"image_id": 1, "url": "http://images.test/1.jpg", "width": 10, "height": 10, "coco_id": big},
              {"image_id": big, "url": "http://images.test/2.jpg", "width": 10, "height": 10},
              {"image_id": 3, "url": "http://images.test/3.jpg", "width": 10, "height": 10}]
    region = {"region_id": 5, "image_id": 3, "phrase": "a red ball", "x": 1, "y": 2, "width": 3, "height": 4}
    regions = [{"id": 3, "regions": [region, dict(region, region_id=big), dict(region, region_id=6, x=float(big))]}]
    (tmp_path / "image_data.json").write_text(json.dumps(images))
    (tmp_path / "region_descriptions.json").write_text(json.dumps(regions))
    p = prepare_source("vg", [str(tmp_path / "image_data.json"), str(tmp_path / "region_descriptions.json")], root)
    assert p.rejected == {"malformed_row": 4}
    assert p.n_images == 1 and p.n_captions == 1
