"""Prefect flows for ``ccrk evaluate`` and ``ccrk finetune``: thin wrappers over ccrk.evaluation.protocols.

One task per coarse unit: a fine-tune, an evaluation (all languages of a benchmark share one image
encoding pass), a report. Both are stages (:class:`EvaluateStage`, ``protocols.FinetuneStage``) run
through storage.stage.run_stage, which records them in the catalog; a new report is published here
as markdown + table artifacts.
Each flow takes its stage's spec (:class:`ccrk.specs.EvaluateSpec`, :class:`ccrk.specs.FinetuneSpec`)
or its dict: ``evaluate_flow({"checkpoint": run_dir, "benchmark": "demo", "data": bench}, root="data")``.
``progress`` parameters are callables the caller supplies (the CLI's bars); Prefect passes them
through without storing them.
"""
from __future__ import annotations

from typing import Callable

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from ccrk.evaluation import protocols, reports
from ccrk.specs import BenchmarkSpec, EvaluateSpec, FinetuneSpec, resolve_device
from flows.artifacts import publish_markdown, publish_table
from storage.errors import CCRKError
from storage.stage import Outcome, StagePlan, run_stage


class EvaluateStage:
    """An evaluation through storage.stage's contract: plan = the report's id, params and parent run;
    completed = the report already written; execute = score the checkpoint and write ``reports/<id>/``;
    publish = the new report's markdown + table artifacts. ``setup``: ``protocols.evaluation_setup``'s
    keywords besides root."""

    def __init__(self, root: str | None, batch_size: int = 64, device: str = "cpu",
                 progress: Callable[[str], None] | None = None, **setup):
        self.root, self.batch_size, self.device, self.progress, self.setup_args = (root, batch_size, device,
                                                                                   progress, setup)

    def plan(self) -> StagePlan:
        self.setup = protocols.evaluation_setup(self.root, **self.setup_args)
        params = self.setup.params
        rid, run_version, out_dir = reports.report_target(self.root, self.setup.ckpt_path, params)
        return StagePlan("report", params["benchmark"], rid, out_dir, params, [run_version] if run_version else [])

    def completed(self, plan: StagePlan) -> Outcome | None:
        done = reports.existing_report(self.root, self.setup.ckpt_path, plan.params)
        return None if done is None else Outcome(done, reports.report_stats(done["metrics"]))

    def execute(self, plan: StagePlan) -> Outcome:
        m, results = protocols.score_checkpoint(self.setup, self.batch_size, self.device, self.progress)
        out = reports.write_report_dir(self.root, m, results, plan.params, title=f"{plan.name} retrieval")
        stats = out.pop("stats")
        return Outcome({**out, "metrics": m}, stats)

    def publish(self, plan: StagePlan, summary: dict) -> None:
        if summary["skipped"]:  # a report found already written is not published again
            return
        key = f"report-{summary['metrics']['benchmark']}-{summary['report_id']}"
        publish_markdown(key, summary["markdown"], description="evaluation report")
        publish_table(f"{key}-table", summary["table"], description="recall per language")


@task(name="evaluate-benchmark", cache_policy=NO_CACHE)
def evaluate_task(root: str | None = None, **kwargs) -> dict:
    out = run_stage(EvaluateStage(root, **kwargs), root)
    return {k: out[k] for k in ("report_id", "run_version", "dir", "metrics")}


@task(name="finetune", cache_policy=NO_CACHE)
def finetune_task(**kwargs) -> dict:
    return protocols.run_finetune(**kwargs)


def benchmark_args(spec: BenchmarkSpec, root: str | None) -> dict:
    """What every protocol call takes from a spec: root, checkpoint, benchmark files, concrete device."""
    missing = [name for name in ("checkpoint", "data") if not getattr(spec, name)]
    if missing:
        raise CCRKError(f"{type(spec).__name__}: {' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} "
                        f"required")
    return dict(root=root, checkpoint=spec.checkpoint, benchmark=spec.benchmark, data_dir=spec.data,
                images=spec.images, coco_images=spec.coco_images, skip_missing=spec.skip_missing,
                device=resolve_device(spec.device))


def finetune_args(spec: FinetuneSpec, root: str | None) -> dict:
    """``protocols.run_finetune``'s arguments from a :class:`FinetuneSpec` (the CLI's other torchrun
    ranks call it directly with these: the same stage, which only rank 0 records)."""
    return dict(**benchmark_args(spec, root), mode=spec.mode, lang=spec.lang, shots=spec.shots, epochs=spec.epochs,
                batch_size=spec.batch_size, lr=spec.lr, seed=spec.seed, num_workers=spec.num_workers)


@flow(name="evaluate")
def evaluate_flow(spec: EvaluateSpec | dict, root: str | None = None, progress: Callable | None = None) -> dict:
    """Evaluate ``spec.checkpoint`` on ``spec.benchmark`` (an :class:`EvaluateSpec` or its dict;
    ``checkpoint`` and ``data`` required; device ``auto``: a GPU when visible).

    ``progress``: ``progress(set_name)`` as each retrieval set is scored."""
    spec = EvaluateSpec.parse(spec, where="evaluate_flow")
    return evaluate_task(**benchmark_args(spec, root), langs=spec.langs, mrv_langs=spec.mrv_langs,
                         k_test=spec.k_test, itc_only=spec.itc_only, batch_size=spec.batch_size, progress=progress)


@flow(name="finetune")
def finetune_flow(spec: FinetuneSpec | dict, root: str | None = None, progress: Callable | None = None) -> dict:
    """Fine-tune (zero-shot / few-shot / single-language), then (``spec.evaluate``) evaluate the
    protocol's languages. ``spec``: a :class:`FinetuneSpec` or its dict (``checkpoint`` and ``data``
    required); its unset hyperparameters are the reference's (``FinetuneSpec.hyperparameters``).

    ``progress``: the training loop's ``progress(step, total, row)`` (ccrk.trainer.StepProgress).
    """
    spec = FinetuneSpec.parse(spec, where="finetune_flow")
    args = finetune_args(spec, root)
    plan = protocols.plan_finetune(spec.mode, spec.benchmark, spec.data, spec.lang, spec.shots, spec.langs)
    run = finetune_task(**args, progress=progress)
    out = {"run": run}
    if spec.evaluate:
        out["report"] = evaluate_task(**{**benchmark_args(spec, root), "checkpoint": run["run_dir"]},
                                      langs=plan.eval_langs, mrv_langs=spec.mrv_langs, k_test=spec.k_test,
                                      itc_only=spec.itc_only, batch_size=EvaluateSpec().batch_size)
    return out
