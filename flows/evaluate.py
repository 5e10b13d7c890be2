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

import os
from typing import Callable

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from ccrk.evaluation import protocols, reports
from ccrk.specs import FINETUNE_KEYS, BenchmarkSpec, EvaluateSpec, FinetuneSpec, resolve_device
from flows.artifacts import publish_markdown, publish_table
from storage import layout
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


class CombineStage:
    """Several reports as one (``reports.combine_metrics``: each language from one fine-tuned model,
    MRV across them) through storage.stage's contract: plan = the combined report's id from its parts'
    report ids and languages; completed = already written; execute = write ``reports/<id>/``.
    ``parts``: ``(report directory or id, languages or None)``."""

    def __init__(self, root: str | None, parts, mrv_langs=None, title: str = ""):
        self.root, self.parts, self.mrv_langs, self.title = layout.data_root(root), list(parts), mrv_langs, title

    def plan(self) -> StagePlan:
        self.dirs = [(self._report_dir(ref), langs) for ref, langs in self.parts]
        ids = [reports.load_metrics(d).get("report_id") or os.path.basename(os.path.abspath(d)) for d, _ in self.dirs]
        params = {"combine": [[rid, langs] for rid, (_, langs) in zip(ids, self.dirs)], "mrv_langs": self.mrv_langs}
        rid = reports.report_id(None, params)
        return StagePlan("report", "combined", rid, layout.report_dir(self.root, rid), params,
                         [i for i in ids if i])

    def _report_dir(self, ref: str) -> str:
        if os.path.isdir(ref):
            return ref
        if layout.is_plain_name(ref):  # a report id; anything else is never joined under reports/
            candidate = layout.report_dir(self.root, ref)
            if os.path.isdir(candidate):
                return candidate
        raise CCRKError(f"report {ref!r} is neither a report directory nor a report id under {self.root}/reports")

    def completed(self, plan: StagePlan) -> Outcome | None:
        path = os.path.join(plan.path, "metrics.json")
        if not os.path.exists(path):
            return None
        m = reports.load_metrics(plan.path)
        return Outcome({"report_id": plan.version, "dir": plan.path, "metrics": m, "run_version": None},
                       reports.report_stats(m))

    def execute(self, plan: StagePlan) -> Outcome:
        m, ranks = reports.combine_metrics(self.dirs, self.mrv_langs)
        m.update(report_id=plan.version, run_version=None)
        out = reports.write_report(plan.path, m, ranks, self.title or f"{m['benchmark']}: one model per language")
        return Outcome({"report_id": plan.version, "dir": plan.path, "metrics": m, "run_version": None,
                        "markdown": out["markdown"]}, reports.report_stats(m))

    def publish(self, plan: StagePlan, summary: dict) -> None:
        if not summary["skipped"]:
            publish_markdown(f"report-combined-{plan.version}", summary["markdown"], description="combined report")


@flow(name="combine-reports")
def combine_flow(parts: list, root: str | None = None, mrv_langs: list[str] | None = None, title: str = "") -> dict:
    """One report from several (``parts``: ``"REPORT"`` or ``"REPORT:lang,lang"`` strings, or
    ``(report, langs)`` pairs): the languages' recalls as reported and MRV over their ranks together."""
    parsed = [reports.parse_part(p) if isinstance(p, str) else (p[0], p[1]) for p in parts]
    return run_stage(CombineStage(root, parsed, mrv_langs, title), root)


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
    return dict(**benchmark_args(spec, root), mode=spec.mode, lang=spec.lang, shots=spec.shots, langs=spec.langs,
                preset=spec.preset, settings={k: getattr(spec, k) for k in FINETUNE_KEYS + ("seed",)},
                k_test=spec.k_test, itc_only=spec.itc_only, num_workers=spec.num_workers)


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
    run = finetune_task(**args, progress=progress)
    out = {"run": run}
    if spec.evaluate:
        out["report"] = evaluate_task(**{**benchmark_args(spec, root), "checkpoint": run["selected"]},
                                      langs=run["eval_langs"], mrv_langs=spec.mrv_langs, k_test=spec.k_test,
                                      itc_only=spec.itc_only, batch_size=EvaluateSpec().batch_size)
    return out
