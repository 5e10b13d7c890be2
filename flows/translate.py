"""Prefect flow for ``ccrk translate``: English captions of acquired sources -> the translation store.

Thin: :mod:`translation.collect` gathers and deduplicates the texts, :mod:`translation.pipeline`
plans the missing parts and translates one part per task (each part written atomically, so a
killed run resumes where it stopped); devices are an engine pool, one worker per device. With
``executor="ray"`` the parts run on a Ray cluster through prefect-ray's task runner, one task per
part on one GPU each (CPU when there is none), each written by the same part writer. The
summary goes to a Prefect table artifact and the catalog (kind ``translation``, parents = the
source versions). Callable from Python: ``translate_flow(root="data", langs=["es", "ru"])``.
"""
from __future__ import annotations

import time
from contextlib import contextmanager

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed
from prefect.task_runners import ThreadPoolTaskRunner

from flows.artifacts import publish_markdown, publish_table


@task(name="translate-part", cache_policy=NO_CACHE)
def translate_part_task(pool, job, model_id: str, decode_id: str):
    from translation.pipeline import translate_part

    with pool.take() as engine:
        return translate_part(engine, job, model_id, decode_id)


@task(name="translate-part", cache_policy=NO_CACHE)
def translate_part_on_worker_task(model: str | None, engine: str, device: str, engine_kwargs: dict, job,
                                  model_id: str, decode_id: str):
    """One part on a Ray worker: the model is resolved there (the demo model ships with the code) and
    the worker's engine is kept for its next part."""
    from translation.pipeline import cached_engine, translate_part

    return translate_part(cached_engine(engine, resolve_model(model), device=device, **engine_kwargs),
                          job, model_id, decode_id)


def _parts_on_ray(jobs, model: str | None, engine: str, device: str, engine_kwargs: dict, model_id: str,
                  decode_id: str, ray_address: str | None):
    """Run every part as a Ray task (prefect-ray's task runner); yield the results as they finish."""
    from prefect_ray.context import remote_options

    from flows.executors import ray_cluster, ray_task_runner
    from storage.errors import CCRKError

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
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if PREFECT_API_URL.value():
        yield
        return
    with get_client(sync_client=True) as client:
        url = str(client.api_url)
    with temporary_settings({PREFECT_API_URL: url}):
        yield


def resolve_model(model: str | None) -> str:
    """``None`` or ``demo`` -> the committed demo translator; else the path given."""
    from translation.m2m import DEMO_MODEL_DIR, check_model_dir

    return check_model_dir(DEMO_MODEL_DIR if model in (None, "", "demo") else model)


@flow(name="translate", task_runner=ThreadPoolTaskRunner(max_workers=8))
def translate_flow(root: str | None = None, langs: list[str] | None = None, model: str | None = None,
                   sources: list[str] | None = None, engine: str = "ctranslate2", device: str = "cpu",
                   compute_type: str = "auto", beam_size: int = 1, max_len_a: float = 1.5, max_len_b: int = 10,
                   max_input_tokens: int | None = None, part_size: int = 20_000, token_budget: int = 4096,
                   max_batch_size: int = 256, threads: int = 0, progress: bool = False, executor: str = "local",
                   ray_address: str | None = None) -> dict:
    """Translate the missing texts; returns the summary (per-language counts, samples, ids).

    ``executor``: ``local`` (an engine pool on this machine's devices) or ``ray`` (one Ray task per part
    on the cluster at ``ray_address``, or on a local cluster started for the run). Same store either way.
    """
    import os

    from flows.executors import check_executor

    from storage import layout
    from storage.catalog import Artifact, Catalog
    from storage.languages import TRANSLATED
    from storage.versioning import content_version
    from translation import m2m
    from translation.collect import collect_texts
    from translation.pipeline import EnginePool, decode_settings, ids_for, plan_parts

    t_start = time.perf_counter()
    check_executor(executor)
    root = layout.data_root(root)
    if executor == "ray" and "://" not in root:
        root = os.path.abspath(root)  # Ray workers do not share the driver's working directory
    langs = list(langs or TRANSLATED)
    model_dir = resolve_model(model)
    m2m.check_langs(langs, m2m.load_tokenizer(model_dir))
    settings = decode_settings(beam_size, max_len_a, max_len_b, max_input_tokens)
    model_id, decode_id = ids_for(model_dir, settings)
    collected = collect_texts(root, sources)
    jobs, cached = plan_parts(root, collected.texts, langs, model_id, decode_id, part_size)

    per_lang = {lang: {"lang": lang, "texts": len(collected.texts), "already_stored": cached[lang],
                       "translated": 0, "skipped_empty": collected.empty, "flagged": 0, "truncated": 0,
                       "seconds": 0.0} for lang in langs}
    samples: dict[str, list[dict]] = {lang: [] for lang in langs}
    if jobs:
        from ccrk.app.console import progress_bar

        engine_kwargs = dict(compute_type=compute_type, settings=settings, token_budget=token_budget,
                             max_batch_size=max_batch_size, threads=threads, cache_dir=os.path.join(root, "cache"))
        total = sum(len(j.shas) for j in jobs)
        with progress_bar("translate", total if progress else None, unit="texts") as advance:
            def record(result) -> None:
                row = per_lang[result.lang]
                row["translated"] += result.translated
                row["flagged"] += result.flagged
                row["truncated"] += result.truncated
                row["seconds"] += result.seconds
                samples[result.lang] = (samples[result.lang] + result.samples)[:3]
                advance(result.translated)

            if executor == "ray":
                for result in _parts_on_ray(jobs, model, engine, device, engine_kwargs, model_id, decode_id,
                                            ray_address):
                    record(result)
            else:
                pool = EnginePool(engine, model_dir, device=device, **engine_kwargs)
                # Submit no more parts at once than there are devices: each worker pulls the next part.
                pending = list(jobs)
                running = [translate_part_task.submit(pool, pending.pop(0), model_id, decode_id)
                           for _ in range(min(len(pool), len(pending)))]
                while running:
                    done = next(as_completed(running))
                    running.remove(done)
                    record(done.result())
                    if pending:
                        running.append(translate_part_task.submit(pool, pending.pop(0), model_id, decode_id))
    for row in per_lang.values():
        row["captions_per_s"] = round(row["translated"] / row["seconds"], 1) if row["seconds"] else 0.0
        row["seconds"] = round(row["seconds"], 2)
    if not any(samples.values()):
        samples = _stored_samples(root, langs, model_id, decode_id)

    store_path = layout.join(root, "translations", model_id, decode_id)
    parents = [a.version for a in collected.sources]
    params = {"model_id": model_id, "decode_id": decode_id, "langs": sorted(langs), "settings": settings.__dict__,
              "sources": sorted(f"{a.name}@{a.version}" for a in collected.sources)}
    version = content_version("translation", parents, params)
    stats = {"captions": collected.captions, "unique_texts": len(collected.texts), "skipped_empty": collected.empty,
             "per_lang": per_lang, "engine": engine, "device": device, "compute_type": compute_type, "executor": executor}
    Catalog(root).record(Artifact(version=version, kind="translation", name=f"{model_id}/{decode_id}",
                                  path=store_path, params=params, stats=stats, parents=parents))
    rows = list(per_lang.values())
    publish_table(f"translate-{model_id}-{decode_id}", rows,
                  description=f"Translation summary: {model_id} {decode_id} ({version})")
    publish_markdown(f"translate-samples-{model_id}-{decode_id}", _samples_markdown(samples),
                     description="Sample translations with their scores")
    return {"version": version, "model_id": model_id, "decode_id": decode_id, "model_dir": model_dir,
            "path": store_path, "captions": collected.captions, "unique_texts": len(collected.texts),
            "skipped_empty": collected.empty, "per_lang": rows, "samples": samples,
            "sources": params["sources"], "parts": len(jobs), "wall_s": round(time.perf_counter() - t_start, 2)}


def _stored_samples(root: str, langs, model_id: str, decode_id: str, n: int = 3) -> dict[str, list[dict]]:
    from translation import store

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
