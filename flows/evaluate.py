"""Prefect flows for ``ccrk evaluate`` and ``ccrk finetune``: thin wrappers over ccrk.evaluation.protocols.

One task per coarse unit: a fine-tune, an evaluation (all languages of a benchmark share one image
encoding pass), a report. A new report is published here as markdown + table artifacts.
``progress`` parameters are callables the caller supplies (the CLI's bars); Prefect passes them
through without storing them.
"""
from __future__ import annotations

from typing import Callable

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from ccrk.evaluation import protocols
from flows.artifacts import publish_markdown, publish_table


@task(name="evaluate-benchmark", cache_policy=NO_CACHE)
def evaluate_task(**kwargs) -> dict:
    out = protocols.run_evaluation(**kwargs)
    if "table" in out:  # a new report (one found already written is not published again)
        key = f"report-{out['metrics']['benchmark']}-{out['report_id']}"
        publish_markdown(key, out["markdown"], description="evaluation report")
        publish_table(f"{key}-table", out["table"], description="recall per language")
    return {k: out[k] for k in ("report_id", "run_version", "dir", "metrics")}


@task(name="finetune", cache_policy=NO_CACHE)
def finetune_task(**kwargs) -> dict:
    return protocols.run_finetune(**kwargs)


@flow(name="evaluate")
def evaluate_flow(root: str | None, checkpoint: str, benchmark: str, data_dir: str, langs: list[str] | None = None,
                  mrv_langs: list[str] | None = None, k_test: int | None = None, itc_only: bool = False,
                  images: str | None = None, coco_images: str | None = None, skip_missing: bool = False,
                  batch_size: int = 64, device: str = "cpu", progress: Callable | None = None) -> dict:
    """``progress``: ``progress(set_name)`` as each retrieval set is scored."""
    return evaluate_task(root=root, checkpoint=checkpoint, benchmark=benchmark, data_dir=data_dir, langs=langs,
                         mrv_langs=mrv_langs, k_test=k_test, itc_only=itc_only, images=images,
                         coco_images=coco_images, skip_missing=skip_missing, batch_size=batch_size, device=device,
                         progress=progress)


@flow(name="finetune")
def finetune_flow(root: str | None, checkpoint: str, benchmark: str, data_dir: str, mode: str = "zero-shot",
                  lang: str | None = None, shots: int | None = None, epochs: int | None = None,
                  batch_size: int | None = None, lr: float | None = None, seed: int | None = None,
                  images: str | None = None, coco_images: str | None = None, skip_missing: bool = False,
                  evaluate: bool = True, langs: list[str] | None = None, mrv_langs: list[str] | None = None,
                  k_test: int | None = None, itc_only: bool = False, device: str = "cpu", num_workers: int = 0,
                  progress: Callable | None = None) -> dict:
    """Fine-tune (zero-shot / few-shot / single-language), then evaluate the protocol's languages.

    ``progress``: the training loop's ``progress(step, total, row)`` (ccrk.trainer.StepProgress).
    """
    plan = protocols.plan_finetune(mode, benchmark, data_dir, lang, shots, langs)
    run = finetune_task(root=root, checkpoint=checkpoint, benchmark=benchmark, data_dir=data_dir, mode=mode,
                        lang=lang, shots=shots, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, images=images,
                        coco_images=coco_images, skip_missing=skip_missing, device=device, num_workers=num_workers,
                        progress=progress)
    out = {"run": run}
    if evaluate:
        out["report"] = evaluate_task(root=root, checkpoint=run["run_dir"], benchmark=benchmark, data_dir=data_dir,
                                      langs=plan.eval_langs, mrv_langs=mrv_langs, k_test=k_test, itc_only=itc_only,
                                      images=images, coco_images=coco_images, skip_missing=skip_missing,
                                      device=device)
    return out
