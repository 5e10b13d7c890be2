"""Prefect flow for ``ccrk pretrain``: one task, the training run (thin: calls ccrk.trainer.train).

The run directory defaults to ``<root>/runs/<run id>`` (run id = hash of dataset version, config
and seed); a finished run is returned as is, an interrupted one resumes from its last checkpoint.
"""
from __future__ import annotations

import json
import os
from typing import Callable

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from ccrk.model import latest_checkpoint
from ccrk.trainer import dataset_version, load_config, run_id, train
from flows.artifacts import publish_link, publish_table
from storage import layout


def resolve_run(config: dict, dataset_dir: str, root: str | None, run_dir: str | None = None) -> tuple[str, str, dict | None]:
    """(run id, run dir, the finished run's summary or None)."""
    root = layout.data_root(root)
    version = run_id(config, dataset_version(dataset_dir, root)[0])
    run_dir = os.path.abspath(run_dir) if run_dir else layout.run_dir(root, version)
    summary_path = os.path.join(run_dir, "summary.json")
    if os.path.exists(summary_path):
        with open(summary_path, encoding="utf-8") as f:
            done = json.load(f)
        if done.get("run_id") == version and done.get("steps") == done.get("total_steps"):
            return version, run_dir, done
    return version, run_dir, None


@task(name="pretrain", cache_policy=NO_CACHE)
def train_task(config: dict, dataset_dir: str, run_dir: str, resume: bool, root: str | None,
               progress: Callable | None = None) -> dict:
    return train(config, dataset_dir, run_dir, resume=resume, root=root, progress=progress)


@flow(name="pretrain")
def pretrain_flow(config: dict | str, dataset_dir: str, run_dir: str | None = None, resume: bool = False,
                  root: str | None = None, progress: Callable | None = None) -> dict:
    """Train one run (``config`` a dict or a YAML path); a finished run is skipped and says so.

    ``progress``: the training loop's ``progress(step, total, row)`` (ccrk.trainer.StepProgress), e.g. the
    CLI's bar; without one the loop logs to the ``ccrk.trainer`` logger.
    """
    if isinstance(config, str):
        config = load_config(config)
    dataset_dir = os.path.abspath(dataset_dir)
    version, run_dir, done = resolve_run(config, dataset_dir, root, run_dir)
    if done is not None:
        done.update(run_dir=run_dir, skipped=True)
        if done.get("loss_curve"):  # where it is now (the summary has the path of when it was written)
            done["loss_curve"] = os.path.join(run_dir, os.path.basename(done["loss_curve"]))
        return done
    resume = resume or latest_checkpoint(run_dir) is not None
    summary = train_task(config, dataset_dir, run_dir, resume, root, progress)
    summary.update(run_dir=run_dir, skipped=False)
    publish_table("pretrain-summary", [{"metric": k, "value": str(v)} for k, v in summary.items()],
                  description=f"pre-training run {summary.get('run_id')}")
    if summary.get("loss_curve"):
        publish_link("pretrain-loss-curve", summary["loss_curve"], description="loss and held-out R@1")
    return summary
