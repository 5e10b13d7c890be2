"""Pre-training: exact resume, the CLI flow's outputs and catalog record, and that the tiny model learns."""
from __future__ import annotations

import json
import logging
import os

import pytest
import torch

from ccrk.trainer import load_config, train
from kshards import make_klingual_dataset

torch.set_num_threads(2)
CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "tiny.yaml")


def small_config(**train):
    config = load_config(CONFIG)
    config["train"].update({"batch_size": 8, "steps": 4, "epochs": None, "log_every": 1, "eval_every": 1000,
                            "checkpoint_every": 1000, "heldout": 8, "threads": 2, **train})
    return config


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_klingual_dataset(str(tmp_path_factory.mktemp("ds") / "dataset"), n_images=48, seed=3, drop_prob=0.3)


def _losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def test_resume_gives_the_uninterrupted_next_step_losses(dataset, tmp_path, root, caplog):
    config = small_config()
    with caplog.at_level(logging.INFO, logger="ccrk.trainer"):  # no progress given: the loop logs its rows
        train(config, dataset, str(tmp_path / "straight"), root=root)
    assert [r.getMessage().split(" loss")[0] for r in caplog.records if r.name == "ccrk.trainer"] == \
        [f"step {s}/4" for s in (1, 2, 3, 4)]
    train(config, dataset, str(tmp_path / "cut"), root=root, max_steps=2)  # checkpoint at step 2, then "killed"
    assert sorted(os.listdir(tmp_path / "cut" / "checkpoints")) == ["step-0000002"]
    summary = train(config, dataset, str(tmp_path / "cut"), resume=True, root=root)
    assert summary["resumed_from"].endswith("step-0000002")
    straight, resumed = _losses(tmp_path / "straight"), _losses(tmp_path / "cut")
    assert sorted(resumed) == [1, 2, 3, 4]
    for step in (3, 4):
        assert resumed[step] == pytest.approx(straight[step], rel=1e-5, abs=1e-6)


def test_cli_runs_the_flow_and_records_the_run(dataset, tmp_path, root, capsys):
    import yaml

    from ccrk.app.cli import main
    from ccrk.model import load_pretrained
    from storage.catalog import Catalog

    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(small_config(steps=2, checkpoint_every=1, keep_checkpoints=1)))
    out = tmp_path / "run"
    assert main(["pretrain", "--dataset", dataset, "--config", str(cfg_path), "--out", str(out)]) == 0
    assert "step 2/2 loss" in capsys.readouterr().out  # the CLI's progress: a line per row off a terminal
    ckpt = out / "checkpoints" / "step-0000002"
    assert sorted(os.listdir(out / "checkpoints")) == ["step-0000002"]  # keep_checkpoints: 1
    for name in ("model.safetensors", "config.json", "optimizer.safetensors", "trainer_state.json",
                 "rng-rank0.safetensors"):
        assert (ckpt / name).exists(), name
    assert (out / "loss_curve.png").stat().st_size > 1000 and (out / "tokenizer").is_dir()
    summary = json.loads((out / "summary.json").read_text())
    run = Catalog(root).get(summary["run_id"])
    assert run is not None and run.kind == "run" and run.path == str(out)
    assert run.params["dataset_version"]  # a hash of the shards: this test dataset is not in the catalog
    model, tok, config = load_pretrained(str(out))
    assert config["train"]["total_steps"] == 2 and len(tok) > 100
    # Same inputs, same run: a second call says so and trains nothing.
    assert main(["pretrain", "--dataset", dataset, "--config", str(cfg_path), "--out", str(out)]) == 0


def test_tiny_model_learns_retrieval(tmp_path, root):
    data = make_klingual_dataset(str(tmp_path / "learn"), n_images=160, seed=5)
    config = load_config(CONFIG)
    config["train"].update({"batch_size": 16, "steps": 150, "epochs": None, "log_every": 10, "eval_every": 150,
                            "checkpoint_every": 1000, "heldout": 32})
    summary = train(config, data, str(tmp_path / "run"), root=root)
    losses = _losses(tmp_path / "run")
    assert losses[150] < 0.8 * losses[10]
    assert summary["r1_i2t"] >= 4 * summary["chance"] and summary["r1_t2i"] >= 4 * summary["chance"]


def test_a_resumed_run_with_dropout_ends_on_the_uninterrupted_weights_bit_for_bit(dataset, tmp_path, root):
    """Dropout and drop path draw from torch's global generator: a resumed run must be at the same
    point of that stream as the uninterrupted one (the DataLoader's own seed draw kept out of it)."""
    from safetensors.torch import load_file

    config = small_config(steps=6)
    config["model"]["vision"]["drop_path"] = 0.1
    config["model"]["text"]["dropout"] = 0.1
    train(config, dataset, str(tmp_path / "straight"), root=root)
    train(config, dataset, str(tmp_path / "cut"), root=root, max_steps=3)  # a checkpoint at step 3, "killed"
    train(config, dataset, str(tmp_path / "cut"), resume=True, root=root)

    def final(run):
        (last,) = [d for d in os.listdir(tmp_path / run / "checkpoints") if d.endswith("06")]
        return load_file(str(tmp_path / run / "checkpoints" / last / "model.safetensors"))

    straight, resumed = final("straight"), final("cut")
    assert straight.keys() == resumed.keys()
    assert [k for k in straight if not torch.equal(straight[k], resumed[k])] == []
