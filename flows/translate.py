"""Prefect flow for ``ccrk translate``: English captions of acquired sources -> the translation store.

Thin: :mod:`translation.collect` gathers and deduplicates the texts, :mod:`translation.pipeline`
plans the missing parts and translates one part per task (each part written atomically, so a
killed run resumes where it stopped); devices are an engine pool, one worker per device. With
``executor="ray"`` the parts run on a Ray cluster through prefect-ray's task runner, one task per
part on one GPU each (CPU when there is none), each written by the same part writer. A
:class:`TranslateStage` run by :func:`storage.stage.run_stage`: the summary goes to the catalog (kind
``translation``, parents = the source versions) and a Prefect table artifact. Callable from Python: ``translate_flow(root="data", langs=["es", "ru"])``.
"""
from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.exceptions import MissingContextError
from prefect.futures import as_completed
from prefect.logging import get_run_logger
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.task_runners import ThreadPoolTaskRunner

from flows.artifacts import publish_markdown, publish_table
from flows.executors import ray_cluster, ray_task_runner
from storage import layout
from storage.errors import CCRKError
from storage.progress import Progress, or_silent
from storage.stage import Outcome, StagePlan, run_stage
from storage.versioning import content_version
from translation import m2m, store
from translation.collect import collect_texts, covered_texts
from translation.imports import import_report, import_translations
from translation.pipeline import EnginePool, cached_engine, decode_settings, ids_for, plan_parts, translate_part
from translation.spec import ImportSpec, TranslateSpec

log = logging.getLogger("ccrk.translate")


@task(name="translate-part", cache_policy=NO_CACHE)
def translate_part_task(pool, job, model_id: str, decode_id: str):
    with pool.take() as engine:
        return translate_part(engine, job, model_id, decode_id)


@task(name="translate-part", cache_policy=NO_CACHE)
def translate_part_on_worker_task(model: str | None, engine: str, device: str, engine_kwargs: dict, job,
                                  model_id: str, decode_id: str):
    """One part on a Ray worker: the model is resolved there (the demo model ships with the code) and
    the worker's engine is kept for its next part."""
    return translate_part(cached_engine(engine, resolve_model(model), device=device, **engine_kwargs),
                          job, model_id, decode_id)


def _parts_on_ray(jobs, model: str | None, engine: str, device: str, engine_kwargs: dict, model_id: str,
                  decode_id: str, ray_address: str | None):
    """Run every part as a Ray task (prefect-ray's task runner); yield the results as they finish."""
    from prefect_ray.context import remote_options  # optional dependency (the ray extra)

    with ray_cluster(ray_address) as ray, ray_task_runner(ray_address) as runner:
        gpus = ray.cluster_resources().get("GPU", 0)
        gpu = device.startswith("cuda") or (device == "auto" and gpus > 0)
        if gpu and not gpus:
            raise CCRKError(f"--device {device} asked for a GPU but the Ray cluster has none; use --device cpu or auto")
        # Ray gives each task its own GPU as cuda:0 (CUDA_VISIBLE_DEVICES).
        worker_device = "cuda:0" if gpu else "cpu"
        with _api_url_pinned(), remote_options(**({"num_gpus": 1} if gpu else {"num_cpus": 1})):
            futures = [runner.submit(translate_part_on_worker_task,
                                     {"model": model, "engine": engine, "device": worker_device,
                                      "engine_kwargs": engine_kwargs, "job": job, "model_id": model_id,
                                      "decode_id": decode_id}) for job in jobs]
        for done in as_completed(futures):
            yield done.result()


@contextmanager
def _api_url_pinned():
    """Submit with this run's Prefect API url in the settings the Ray workers receive: without one
    (the CLI's temporary server) each worker would start a Prefect server of its own."""
    if PREFECT_API_URL.value():
        yield
        return
    with get_client(sync_client=True) as client:
        url = str(client.api_url)
    with temporary_settings({PREFECT_API_URL: url}):
        yield


IMPORTS_ONLY = ("none", "imports-only")  # (model_id, decode_id) of a run that translates no language


def resolve_model(model: str | None) -> str:
    """``None`` or ``demo`` -> the committed demo translator; else the path given."""
    return m2m.check_model_dir(m2m.DEMO_MODEL_DIR if model in (None, "", "demo") else model)


@flow(name="translate", task_runner=ThreadPoolTaskRunner(max_workers=8))
def translate_flow(spec: TranslateSpec | None = None, root: str | None = None,
                   progress: Progress | None = None) -> dict:
    """Import the spec's existing translations, then translate the missing texts; returns the summary
    (per-language counts, samples, ids).

    ``spec``: a :class:`translation.spec.TranslateSpec` (or its dict; every default is the spec's).
    Its ``executor``: ``local`` (an engine pool on this machine's devices, ``device: auto`` = every
    visible GPU, else the CPU) or ``ray`` (one Ray task per part on the cluster at ``ray_address``, or
    on a local cluster started for the run). Same store either way. ``progress``: a
    :data:`storage.progress.Progress` (the command line's bar), else silent.
    """
    t_start = time.perf_counter()
    spec = TranslateSpec.parse(spec)
    root = layout.data_root(root)
    if spec.executor == "ray" and "://" not in root:
        root = os.path.abspath(root)  # Ray workers do not share the driver's working directory
    return run_stage(TranslateStage(spec, root, progress, t_start), root)


class TranslateStage:
    """``translate`` as a :class:`storage.stage.Stage`: plan = resolve the model, collect the texts and
    version them; execute = import the spec's translations, then translate the missing parts
    (resumable, so never ``completed``); publish = the summary table and the sample translations."""

    def __init__(self, spec: TranslateSpec, root: str, progress: Progress | None, t_start: float):
        self.spec, self.root, self.progress, self.t_start = spec, root, progress, t_start

    def plan(self) -> StagePlan:
        spec = self.spec
        self.settings = settings = decode_settings(**spec.decode_params())
        if spec.langs:
            self.model_dir = model_dir = resolve_model(spec.model)
            m2m.check_langs(list(spec.langs), m2m.load_tokenizer(model_dir))
            model_id, decode_id = ids_for(model_dir, settings, spec.thresholds)
        else:  # imports only (e.g. CCR6: every language from the authors' release): no model is loaded
            self.model_dir, (model_id, decode_id) = None, IMPORTS_ONLY
        self.collected = collected = collect_texts(self.root, spec.sources)
        params = {"model_id": model_id, "decode_id": decode_id, "langs": sorted(spec.langs),
                  "settings": settings.__dict__, "sources": sorted(f"{a.name}@{a.version}" for a in collected.sources),
                  "thresholds": spec.thresholds.version_params()}
        parents = [a.version for a in collected.sources]
        return StagePlan(kind="translation", name=f"{model_id}/{decode_id}",
                         version=content_version("translation", parents, params),
                         path=layout.join(self.root, "translations", model_id, decode_id), params=params,
                         parents=parents)

    def completed(self, plan: StagePlan) -> Outcome | None:
        return None  # the parts resume themselves: a complete store translates nothing

    def execute(self, plan: StagePlan) -> Outcome:
        spec, root, collected = self.spec, self.root, self.collected
        model_id, decode_id = plan.params["model_id"], plan.params["decode_id"]
        imports = [self._import(item) for item in spec.imports]  # e.g. CCLM's de/fr/cs/ja/zh, so K reaches 10
        warnings = [w for report in imports for w in report["warnings"]]
        langs = list(spec.langs)
        jobs, cached = plan_parts(root, collected.texts, langs, model_id, decode_id, spec.part_size, spec.thresholds)
        tally = _Tally(langs, len(collected.texts), cached, collected.empty)
        if jobs:
            self._translate(jobs, tally, model_id, decode_id)
        samples = tally.samples if any(tally.samples.values()) else _stored_samples(root, langs, model_id, decode_id)
        rows = tally.rows()
        stats = {"captions": collected.captions, "unique_texts": len(collected.texts),
                 "skipped_empty": collected.empty, "per_lang": {r["lang"]: r for r in rows}, "engine": spec.engine,
                 "device": spec.device, "compute_type": spec.compute_type, "executor": spec.executor,
                 "imports": imports, "warnings": warnings}
        summary = {"version": plan.version, "model_id": model_id, "decode_id": decode_id,
                   "model_dir": self.model_dir, "path": plan.path, "captions": collected.captions,
                   "unique_texts": len(collected.texts), "skipped_empty": collected.empty, "per_lang": rows,
                   "samples": samples, "sources": plan.params["sources"], "parts": len(jobs),
                   "imports": imports, "warnings": warnings, "wall_s": round(time.perf_counter() - self.t_start, 2)}
        return Outcome(summary, stats)

    def _import(self, item: ImportSpec) -> dict:
        """Import one file (matched to the captions of the sources it names, if any); its report, whose
        warnings (a source under the item's min_match_rate) also go to the run's log."""
        covered = covered_texts(self.collected, item.source, f"import {item.name}") if item.source else None
        stats = import_translations(self.root, item.path, item.name, langs=item.langs, sources=covered)
        report = import_report(item.name, item.path, stats, item.min_match_rate)
        for warning in report["warnings"]:
            _logger().warning(warning)
        return report

    def _translate(self, jobs, tally: _Tally, model_id: str, decode_id: str) -> None:
        spec = self.spec
        engine_kwargs = dict(compute_type=spec.compute_type, settings=self.settings, token_budget=spec.token_budget,
                             max_batch_size=spec.max_batch_size, threads=spec.threads,
                             cache_dir=os.path.join(self.root, "cache"))
        with or_silent(self.progress)("translate", sum(len(j.shas) for j in jobs), "texts") as advance:
            if spec.executor == "ray":
                results = _parts_on_ray(jobs, spec.model, spec.engine, spec.device, engine_kwargs, model_id,
                                        decode_id, spec.ray_address)
            else:
                results = _parts_on_pool(EnginePool(spec.engine, self.model_dir, device=spec.device, **engine_kwargs),
                                         jobs, model_id, decode_id)
            for result in results:
                tally.add(result)
                advance(result.translated)

    def publish(self, plan: StagePlan, summary: dict) -> None:
        model_id, decode_id = plan.params["model_id"], plan.params["decode_id"]
        publish_table(f"translate-{model_id}-{decode_id}", summary["per_lang"],
                      description=f"Translation summary: {plan.name} ({plan.version})")
        matches = [{"import": r["name"], **m, "unmatched_examples": "; ".join(m["unmatched_examples"])}
                   for r in summary.get("imports", []) for m in r["sources"]]
        if matches:
            publish_table(f"translate-imports-{model_id}-{decode_id}", matches,
                          description="Imported translations: match rate per covered source")
        publish_markdown(f"translate-samples-{model_id}-{decode_id}", _samples_markdown(summary["samples"]),
                         description="Sample translations with their scores")


def _logger():
    try:
        return get_run_logger()
    except MissingContextError:
        return log


class _Tally:
    """Per-language counts and the first few sample translations, as the parts finish."""

    def __init__(self, langs, n_texts: int, cached: dict, empty: int):
        self.per_lang = {lang: {"lang": lang, "texts": n_texts, "already_stored": cached[lang], "translated": 0,
                                "skipped_empty": empty, "flagged": 0, "truncated": 0, "seconds": 0.0}
                         for lang in langs}
        self.samples: dict[str, list[dict]] = {lang: [] for lang in langs}

    def add(self, result) -> None:
        row = self.per_lang[result.lang]
        row["translated"] += result.translated
        row["flagged"] += result.flagged
        row["truncated"] += result.truncated
        row["seconds"] += result.seconds
        self.samples[result.lang] = (self.samples[result.lang] + result.samples)[:3]

    def rows(self) -> list[dict]:
        for row in self.per_lang.values():
            row["captions_per_s"] = round(row["translated"] / row["seconds"], 1) if row["seconds"] else 0.0
            row["seconds"] = round(row["seconds"], 2)
        return list(self.per_lang.values())


def _parts_on_pool(pool, jobs, model_id: str, decode_id: str):
    """Every part as a Prefect task on this machine's engine pool; yields the results as they finish.
    No more parts are submitted at once than there are devices: each worker pulls the next part."""
    pending = list(jobs)
    running = [translate_part_task.submit(pool, pending.pop(0), model_id, decode_id)
               for _ in range(min(len(pool), len(pending)))]
    while running:
        done = next(as_completed(running))
        running.remove(done)
        yield done.result()
        if pending:
            running.append(translate_part_task.submit(pool, pending.pop(0), model_id, decode_id))


def _stored_samples(root: str, langs, model_id: str, decode_id: str, n: int = 3) -> dict[str, list[dict]]:
    out = {}
    for lang in langs:
        table = store.read_dir(store.lang_dir(root, model_id, decode_id, lang))
        out[lang] = table.slice(0, n).to_pylist()
    return out


def _samples_markdown(samples: dict[str, list[dict]]) -> str:
    lines = ["| lang | source | translation | ok | uniformity | copy_sim | len_ratio |", "|---|---|---|---|---|---|---|"]
    for lang, rows in samples.items():
        for r in rows:
            lines.append(f"| {lang} | {r['src_text']} | {r['tgt_text']} | {r['ok']} | {r['uniformity']:.2f} | "
                         f"{r['copy_sim']:.2f} | {r['len_ratio']:.2f} |")
    return "\n".join(lines)
