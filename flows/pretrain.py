"""Prefect flow for ``ccrk pretrain``: one stage (:class:`PretrainStage` through
:func:`storage.stage.run_stage`), whose work is one task, the training run (thin: calls ccrk.trainer).

The run directory defaults to ``<root>/runs/<run id>`` (run id = hash of dataset version, config
and seed); a finished run is returned as is, an interrupted one resumes from its last checkpoint.
Under torchrun every rank calls the flow (ranks > 0 its function, ``pretrain_flow.fn``); only rank 0
records the run and publishes.
"""
from __future__ import annotations

import json
import os
from typing import Callable

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext

from ccrk.model import latest_checkpoint
from ccrk.trainer import dataset_version, load_config, normalise_config, pretrain, run_id
from flows.artifacts import publish_link, publish_table
from storage import layout
from storage.stage import Outcome, StagePlan, run_stage


def _read_json(path: str) -> dict | None:
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _finished(run_dir: str, version: str) -> dict | None:
    """The summary of the finished run ``version`` in ``run_dir``, else None."""
    done = _read_json(os.path.join(run_dir, "summary.json"))
    if done is not None and done.get("run_id") == version and done.get("steps") == done.get("total_steps"):
        return done
    return None


@task(name="pretrain", cache_policy=NO_CACHE)
def train_task(config: dict, dataset_dir: str, run_dir: str, resume: bool, root: str | None,
               progress: Callable | None = None) -> tuple[dict, dict]:
    return pretrain(config, dataset_dir, run_dir, resume=resume, root=root, progress=progress)


def _stats(summary: dict) -> dict:
    """What the catalog keeps of a run's summary."""
    return {k: v for k, v in summary.items() if k not in ("run_dir", "skipped")}


class PretrainStage:
    """One pre-training run as a :class:`storage.stage.Stage` (kind ``run``, version = run id)."""

    def __init__(self, config: dict, dataset_dir: str, run_dir: str | None, resume: bool, root: str | None,
                 progress: Callable | None = None):
        self.config, self.dataset_dir, self.run_dir = config, os.path.abspath(dataset_dir), run_dir
        self.resume, self.root, self.progress = resume, layout.data_root(root), progress

    def plan(self) -> StagePlan:
        ds_ver, ds_known = dataset_version(self.dataset_dir, self.root)
        version = run_id(self.config, ds_ver)
        run_dir = os.path.abspath(self.run_dir) if self.run_dir else layout.run_dir(self.root, version)
        params = {"config": normalise_config(self.config), "dataset": self.dataset_dir, "dataset_version": ds_ver}
        return StagePlan("run", self.config["name"], version, run_dir, params, [ds_ver] if ds_known else [])

    def completed(self, plan: StagePlan) -> Outcome | None:
        done = _finished(plan.path, plan.version)
        if done is None:
            return None
        done["run_dir"] = plan.path
        if done.get("loss_curve"):  # where it is now (the summary has the path of when it was written)
            done["loss_curve"] = os.path.join(plan.path, os.path.basename(done["loss_curve"]))
        plan.params["config"] = _read_json(os.path.join(plan.path, "config.json")) or plan.params["config"]
        return Outcome(done, _stats(done))

    def execute(self, plan: StagePlan) -> Outcome:
        resume = self.resume or latest_checkpoint(plan.path) is not None
        args = (self.config, self.dataset_dir, plan.path, resume, self.root, self.progress)
        # In a flow run, a Prefect task; outside one (torchrun's ranks > 0 call pretrain_flow.fn), a plain call.
        summary, config = train_task(*args) if FlowRunContext.get() is not None else train_task.fn(*args)
        plan.params["config"] = config  # with train.total_steps, known once the job is built
        summary["run_dir"] = plan.path
        return Outcome(summary, _stats(summary))

    def publish(self, plan: StagePlan, summary: dict) -> None:
        if summary.get("skipped"):
            return
        publish_table("pretrain-summary", [{"metric": k, "value": str(v)} for k, v in summary.items()],
                      description=f"pre-training run {summary.get('run_id')}")
        if summary.get("loss_curve"):
            publish_link("pretrain-loss-curve", summary["loss_curve"], description="loss and held-out R@1")


@flow(name="pretrain")
def pretrain_flow(config: dict | str, dataset_dir: str, run_dir: str | None = None, resume: bool = False,
                  root: str | None = None, progress: Callable | None = None) -> dict:
    """Train one run (``config`` a dict or a YAML path); a finished run is skipped and says so.

    ``progress``: the training loop's ``progress(step, total, row)`` (ccrk.trainer.StepProgress), e.g. the
    CLI's bar; without one the loop logs to the ``ccrk.trainer`` logger.
    """
    if isinstance(config, str):
        config = load_config(config)
    stage = PretrainStage(config, dataset_dir, run_dir, resume, root, progress)
    return run_stage(stage, stage.root)
