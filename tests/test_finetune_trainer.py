"""Fine-tuning runs through the trainer's loop: its batches, exact step resume, its checkpoint
layout, two gloo ranks (DDP), and the CLI's progress lines."""
from __future__ import annotations

import json
import os
import shutil
import socket

import pytest
import torch
import torch.multiprocessing as mp
import yaml
from safetensors.torch import load_file

from ccrk.evaluation import protocols
from ccrk.evaluation.demo_benchmark import write_demo_benchmark
from ccrk.model import build_model, save_model
from storage.catalog import Artifact, Catalog
from storage.demo.corpus import generate_demo_corpus

torch.set_num_threads(1)
CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "tiny.yaml")
EPOCHS, BATCH = 2, 8  # 24 English pairs: 3 steps an epoch, 6 in all


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """A random-init tiny checkpoint (a recorded run under a template root) and a small demo benchmark."""
    base = tmp_path_factory.mktemp("ft")
    torch.manual_seed(0)
    with open(CONFIG, encoding="utf-8") as f:
        config = yaml.safe_load(f)
    model, _ = build_model(config)
    template = base / "root"
    save_model(model, config, str(template / "runs" / "pretrained" / "checkpoints" / "step-0000001"))
    Catalog(str(template)).record(Artifact("pre0001", "run", "tiny", str(template / "runs" / "pretrained")))
    generate_demo_corpus(str(base / "corpus"), n_train=8, n_heldout=4, image_px=64)
    write_demo_benchmark(str(base / "corpus"), str(base / "bench"), langs=("en", "es", "ru"))
    return str(template), str(base / "bench")


def _root(demo, path) -> str:
    """A data root of its own holding the pre-trained run (fine-tune run ids are content hashes)."""
    shutil.copytree(demo[0], path)
    return str(path)


def _finetune(root: str, bench: str, **kwargs) -> dict:
    kwargs.setdefault("settings", {"select": "last"})  # 8 train images: the demo benchmark has no val split
    kwargs = {"epochs": EPOCHS, "batch_size": BATCH, "lr": 1e-3, **kwargs}
    return protocols.run_finetune(root, os.path.join(root, "runs", "pretrained"), "demo", bench, **kwargs)


def _weights(run: dict) -> dict:
    return load_file(os.path.join(run["checkpoint"], "model.safetensors"))


def _losses(run_dir: str) -> dict:
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def test_batches_are_a_function_of_the_step_and_ranks_share_each_global_batch(demo):
    pairs, _ = protocols.loaders.training_pairs("demo", demo[1], "en")
    with open(CONFIG, encoding="utf-8") as f:
        config = yaml.safe_load(f)
    _, tok = build_model(config)
    one = protocols.PairBatches(pairs, config, tok, batch_size=10, seed=3)
    assert len(pairs) == 24 and one.per_epoch == 3
    assert [one.positions(s)[1] for s in range(3)] == [list(range(0, 10)), list(range(10, 20)), list(range(20, 24))]
    assert one.positions(4) == (1, list(range(10, 20)))
    a, b = one[4], protocols.PairBatches(pairs, config, tok, batch_size=10, seed=3)[4]
    assert all(torch.equal(a[k], b[k]) for k in a)  # no state: any step, in any order, in any process
    ranks = [protocols.PairBatches(pairs, config, tok, batch_size=5, seed=3, rank=r, world=2) for r in (0, 1)]
    assert ranks[0].per_epoch == 3
    shares = [[rk.positions(s)[1] for rk in ranks] for s in range(3)]
    assert shares[0] == [list(range(0, 5)), list(range(5, 10))]
    # The last global batch (4 pairs) is split evenly: every rank gathers as many rows.
    assert shares[2] == [[20, 21], [22, 23]]
    odd = [protocols.PairBatches(pairs[:23], config, tok, batch_size=5, seed=3, rank=r, world=2) for r in (0, 1)]
    assert [rk.positions(2)[1] for rk in odd] == [[20, 21], [22, 23]]  # 23 stands for the epoch's first pair
    assert odd[1][2]["image_ids"].shape == (2,)


def test_a_cut_finetune_resumes_to_the_uninterrupted_weights(demo, tmp_path):
    straight = _finetune(_root(demo, tmp_path / "a"), demo[1])
    root = _root(demo, tmp_path / "b")
    cut = _finetune(root, demo[1], max_steps=4)  # mid-epoch: checkpoints at 3 (epoch end) and 4
    assert cut["step"] == 4 and cut["checkpoint"].endswith("step-0000004")
    assert sorted(os.listdir(os.path.join(cut["run_dir"], "checkpoints"))) == ["step-0000003", "step-0000004"]
    resumed = _finetune(root, demo[1])
    assert resumed["resumed_from"].endswith("step-0000004") and resumed["run_id"] == straight["run_id"]
    assert resumed["step"] == straight["step"] == 6 and resumed["epochs"] == EPOCHS
    a, b = _weights(straight), _weights(resumed)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    rows, straight_rows = _losses(resumed["run_dir"]), _losses(straight["run_dir"])
    assert sorted(rows) == [3, 4, 6] and sorted(straight_rows) == [3, 6]  # the cut run logged its last step
    assert rows[3] == pytest.approx(straight_rows[3], rel=1e-6)
    for k in ("loss", "itc", "itm"):  # the last epoch's mean, from the rows
        assert resumed[k] == pytest.approx(straight[k], rel=1e-6)
    [ft] = [a for a in Catalog(root).list("run") if a.name == "finetune-demo-zero-shot"]
    assert ft.parents == ["pre0001"] and ft.stats["epochs"] == EPOCHS and ft.stats["pairs"] == 24


def test_finetune_runs_have_the_trainers_layout(demo, tmp_path):
    root = _root(demo, tmp_path / "r")
    run = _finetune(root, demo[1])
    ckpt = os.path.join(run["run_dir"], "checkpoints", "step-0000006")
    assert run["checkpoint"] == ckpt
    assert sorted(os.listdir(os.path.dirname(ckpt))) == ["step-0000003", "step-0000006"]  # one an epoch, 2 kept
    assert sorted(os.listdir(ckpt)) == ["config.json", "model.safetensors", "optimizer.safetensors",
                                        "rng-rank0.safetensors", "trainer_state.json"]
    with open(os.path.join(ckpt, "trainer_state.json"), encoding="utf-8") as f:
        state = json.load(f)
    assert state["step"] == state["position"] == 6 and state["world"] == 1
    with open(os.path.join(ckpt, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    assert config["finetune"]["steps_per_epoch"] == 3 and config["finetune"]["lr"] == 1e-3
    assert config["model"]["vision"]["image_size"] == 64  # the pre-trained config, fine-tuned
    for name in ("config.json", "tokenizer", "metrics.jsonl", "loss_curve.png"):
        assert os.path.exists(os.path.join(run["run_dir"], name)), name
    assert sorted(_losses(run["run_dir"])) == [3, 6]  # log_every 10; a row at every checkpoint
    # A finished run is complete: nothing is trained, its summary is read from its files.
    again = _finetune(root, demo[1])
    assert again["resumed_from"] == ckpt and again["step"] == 6 and again["loss"] == pytest.approx(run["loss"])
    assert again["skipped"] and not run["skipped"] and again["temp"] == pytest.approx(run["temp"])
    assert {k: again[k] for k in ("epochs", "pairs", "total_steps", "run_id")} == {
        k: run[k] for k in ("epochs", "pairs", "total_steps", "run_id")}


def _ddp_worker(rank: int, world: int, port: int, roots: list[str], bench: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    straight, cut = roots
    _finetune(straight, bench)
    _finetune(cut, bench, max_steps=1)
    _finetune(cut, bench)
    torch.distributed.destroy_process_group()


def test_two_gloo_ranks_finetune_one_model_and_resume_exactly(demo, tmp_path):
    roots = [_root(demo, tmp_path / "straight"), _root(demo, tmp_path / "cut")]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, roots, demo[1]), nprocs=2, join=True)
    runs = [[a for a in Catalog(r).list("run") if a.name == "finetune-demo-zero-shot"] for r in roots]
    assert [len(r) for r in runs] == [1, 1] and runs[0][0].version == runs[1][0].version
    ckpts = [os.path.join(r[0].path, "checkpoints") for r in runs]
    # 24 pairs, a global batch of 8 (2 ranks x 4, as the authors' --bs): 3 global steps an epoch.
    assert sorted(os.listdir(ckpts[0])) == ["step-0000003", "step-0000006"]
    last = [os.path.join(c, "step-0000006") for c in ckpts]
    assert {"rng-rank0.safetensors", "rng-rank1.safetensors"} <= set(os.listdir(last[0]))
    with open(os.path.join(last[1], "trainer_state.json"), encoding="utf-8") as f:
        assert json.load(f)["world"] == 2
    a, b = (load_file(os.path.join(p, "model.safetensors")) for p in last)
    assert all(torch.equal(a[k], b[k]) for k in a)  # cut at step 1 and resumed: the uninterrupted weights
    start = load_file(os.path.join(roots[0], "runs", "pretrained", "checkpoints", "step-0000001", "model.safetensors"))
    assert not torch.equal(a["vision_proj.weight"], start["vision_proj.weight"])


def test_cli_finetune_prints_the_loops_progress(demo, tmp_path, capsys):
    from ccrk.app.cli import main

    root = _root(demo, tmp_path / "cli")
    assert main(["finetune", "--checkpoint", os.path.join(root, "runs", "pretrained"), "--benchmark", "demo",
                 "--data", demo[1], "--epochs", "1", "--batch-size", "8", "--select", "last", "--no-evaluate", "--root", root,
                 "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "step 3/3 loss" in out and "samples/s" in out  # not a terminal: a line per logged row
    assert "fine-tuned run" in out


@pytest.fixture(scope="module")
def with_val(demo, tmp_path_factory):
    """A demo benchmark with a validation split (20 train images: 18 to train on, 2 to select on)."""
    base = tmp_path_factory.mktemp("ftval")
    generate_demo_corpus(str(base / "corpus"), n_train=20, n_heldout=4, image_px=64)
    write_demo_benchmark(str(base / "corpus"), str(base / "bench"), langs=("en", "es"))
    return str(base / "bench")


def test_selection_keeps_the_best_validation_epoch_and_survives_a_cut(demo, with_val, tmp_path):
    settings = {"select": "val", "start_eval": 1, "eval_interval": 1}
    kwargs = dict(epochs=4, settings=settings, itc_only=True, k_test=4)
    straight = _finetune(_root(demo, tmp_path / "a"), with_val, **kwargs)
    sel = straight["selection"]
    assert sel["on"] == "val" and sel["langs"] == ["en"]
    assert [h["epoch"] for h in sel["history"]] == [2, 3, 4]  # epochs 0-based >= start_eval 1
    best = max(sel["history"], key=lambda h: h["score"])
    assert sel["best"] == best and straight["selected"].endswith(os.path.join("checkpoints", "best"))
    # The kept model scores what the selection recorded for it.
    bench = protocols.bm.load_benchmark("demo", with_val, ["en"], split="val")
    model, tok, config = protocols.load_pretrained(straight["selected"])
    r = protocols.evaluate_benchmark(model, tok, protocols.image_transform(config, train=False), bench, k_test=4,
                                     itc_only=True, max_tokens=protocols._max_tokens(config))
    assert r["en"].mean_recall == pytest.approx(best["score"], abs=1e-9)
    # Cut after the first scoring, resumed: the same scores, the same selected weights.
    root = _root(demo, tmp_path / "b")
    cut = _finetune(root, with_val, max_steps=2 * straight["total_steps"] // 4, **kwargs)
    assert [h["epoch"] for h in cut["selection"]["history"]] == [2]
    resumed = _finetune(root, with_val, **kwargs)
    assert resumed["selection"]["history"] == sel["history"]
    a, b = (load_file(os.path.join(r["selected"], "model.safetensors")) for r in (straight, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # Without a validation split the default selection is a one-line error naming the file.
    with pytest.raises(protocols.CCRKError, match="no en validation file") as err:
        _finetune(_root(demo, tmp_path / "c"), demo[1], settings={})
    assert "\n" not in str(err.value)
