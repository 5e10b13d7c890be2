"""Prefect flow for ``ccrk build``: resolve (inputs and version), plan (the DuckDB join), one task
per group of shards, finalize.

Thin: every step is a :mod:`storage.build` function; re-running after a kill redoes only the
shards that are not written yet, and a finished version is a no-op that says so. The shard tasks
do not wait for the whole plan: the plan task hands out each group of shards as soon as all their
samples are planned (``storage.build.plan_resolved(parts_dir=...)``), and the flow submits their
tasks while the plan goes on.
"""
from __future__ import annotations

import os
import threading
import uuid
from contextlib import contextmanager

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from flows.artifacts import publish_link, publish_markdown, publish_table
from storage import build
from storage.shards import drop_source_maps

_progress = None  # a callable(n_samples) while the CLI draws a progress bar


@contextmanager
def shard_progress(callback):
    """Report each written shard's sample count to ``callback`` while a build runs here (and the
    number of samples planned to ``callback.set_total``, when it has one, as soon as it is known)."""
    global _progress
    _progress = callback
    try:
        yield
    finally:
        _progress = None


@task(name="resolve-dataset", cache_policy=NO_CACHE)
def resolve_task(**kwargs) -> build.ResolvedBuild:
    return build.resolve_build(**kwargs)


@task(name="plan-dataset", cache_policy=NO_CACHE)
def plan_task(resolved: build.ResolvedBuild, parts_dir: str | None = None, memory: str | None = None) -> build.BuildPlan:
    total = getattr(_progress, "set_total", None)
    return build.plan_resolved(resolved, parts_dir=parts_dir, on_total=total, memory=memory)


@task(name="write-shards", cache_policy=NO_CACHE)
def shards_task(dataset_path: str, shard_ids: list[int], part: str | None = None) -> list[dict]:
    """``part``: the plan rows of these shards (a file of ``parts_dir``); else ``_build/plan.parquet``."""
    plan = None
    if part is not None:
        import pyarrow.parquet as pq

        plan = pq.read_table(part, filters=[("shard", "in", list(shard_ids))]).sort_by("idx")
    done = build.write_shard_group(dataset_path, shard_ids, progress=_progress, plan=plan)
    return [{k: v for k, v in d.items() if k != "members"} for d in done]


@task(name="finalize-dataset", cache_policy=NO_CACHE)
def finalize_task(dataset_path: str, root: str) -> build.BuildResult:
    return build.finalize_build(dataset_path, root=root)


@flow(name="build-dataset")
def build_flow(root: str | None = None, name: str = "default", sources: list[str] = ("cc3m", "sbu", "vg", "coco"),
               langs: list[str] = ("en", "es", "id", "ru", "tr"), min_langs: int | None = None,
               drop_flagged: bool = False, shard_size: int = 1000, seed: int = 0,
               source_versions: dict | None = None, translations: list[str] | None = None,
               shards_per_task: int = 16, memory: str | None = None) -> dict:
    resolved = resolve_task(root=root, name=name, sources=list(sources), langs=list(langs), min_langs=min_langs,
                            drop_flagged=drop_flagged, shard_size=shard_size, seed=seed,
                            source_versions=source_versions, translations=translations)
    plan = resolved.plan
    if plan.skipped:
        result = build.skipped_result(plan)
    else:
        plan = _plan_and_write_shards(resolved, shards_per_task, memory)
        result = finalize_task(plan.path, plan.root)
    publish_table(f"dataset-{name}-drops", result.drops or [{"unit": "-", "reason": "none", "lang": None, "count": 0}],
                  description="rows dropped by the language policy and the join, by reason")
    publish_markdown(f"dataset-{name}-summary",
                     f"**{result.message}**\n\n| samples | shards | bytes |\n|---|---|---|\n"
                     f"| {result.n_samples} | {result.n_shards} | {result.bytes} |\n\n"
                     + "\n".join(f"- {lang}: {n} captions" for lang, n in result.captions_by_lang.items()))
    publish_link(f"dataset-{name}", result.path, description=f"dataset {name} {result.version}")
    return result.as_dict()


def _plan_and_write_shards(resolved: build.ResolvedBuild, shards_per_task: int,
                           memory: str | None = None) -> build.BuildPlan:
    """The plan task, and the shard tasks of each group of shards as soon as the plan hands them out
    (its part files); returns the plan once it and every shard task are done."""
    path = resolved.plan.path
    parts = os.path.join(path, build.STAGING, f"parts-{uuid.uuid4().hex[:12]}")
    planned = threading.Event()
    plan_future = plan_task.submit(resolved, parts, memory)
    plan_future.add_done_callback(lambda _: planned.set())
    futures, taken = [], set()

    def submit_ready() -> None:
        for rows, shards in build.ready_parts(parts, taken):
            futures.extend(shards_task.submit(path, group, rows) for group in build.shard_groups(shards, shards_per_task))

    try:
        while not planned.wait(0.02):
            submit_ready()
        plan = plan_future.result()
        submit_ready()
    finally:
        for f in futures:  # written shards are kept (a re-run skips them), so let them finish
            f.wait()
        drop_source_maps()
    for f in futures:
        f.result()
    return plan

