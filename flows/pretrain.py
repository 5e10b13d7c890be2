"""Prefect flow for ``ccrk pretrain``: one task, the training run (thin: calls ccrk.trainer.train)."""
from __future__ import annotations

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from flows.artifacts import publish_link, publish_table


@task(name="pretrain", cache_policy=NO_CACHE)
def train_task(config: dict, dataset_dir: str, run_dir: str, resume: bool, root: str | None) -> dict:
    from ccrk.trainer import train

    return train(config, dataset_dir, run_dir, resume=resume, root=root)


@flow(name="pretrain")
def pretrain_flow(config: dict, dataset_dir: str, run_dir: str, resume: bool = False, root: str | None = None) -> dict:
    summary = train_task(config, dataset_dir, run_dir, resume, root)
    publish_table("pretrain-summary", [{"metric": k, "value": str(v)} for k, v in summary.items()],
                  description=f"pre-training run {summary.get('run_id')}")
    if summary.get("loss_curve"):
        publish_link("pretrain-loss-curve", summary["loss_curve"], description="loss and held-out R@1")
    return summary
