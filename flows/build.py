"""Prefect flow for ``ccrk build``: plan (the DuckDB join), one task per group of shards, finalize.

Thin: every step is a :mod:`storage.build` function; re-running after a kill redoes only the
shards that are not written yet, and a finished version is a no-op that says so.
"""
from __future__ import annotations

from contextlib import contextmanager

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from flows.artifacts import publish_link, publish_markdown, publish_table
from storage import build

_progress = None  # a callable(n_samples) while the CLI draws a progress bar


@contextmanager
def shard_progress(callback):
    """Report each written shard's sample count to ``callback`` while a build runs here."""
    global _progress
    _progress = callback
    try:
        yield
    finally:
        _progress = None


@task(name="plan-dataset", cache_policy=NO_CACHE)
def plan_task(**kwargs) -> build.BuildPlan:
    return build.plan_build(**kwargs)


@task(name="write-shards", cache_policy=NO_CACHE)
def shards_task(dataset_path: str, shard_ids: list[int]) -> list[dict]:
    done = build.write_shard_group(dataset_path, shard_ids, progress=_progress)
    return [{k: v for k, v in d.items() if k != "members"} for d in done]


@task(name="finalize-dataset", cache_policy=NO_CACHE)
def finalize_task(dataset_path: str, root: str) -> build.BuildResult:
    return build.finalize_build(dataset_path, root=root)


@flow(name="build-dataset")
def build_flow(root: str | None = None, name: str = "default", sources: list[str] = ("cc3m", "sbu", "vg", "coco"),
               langs: list[str] = ("en", "es", "id", "ru", "tr"), min_langs: int | None = None,
               drop_flagged: bool = False, shard_size: int = 1000, seed: int = 0,
               source_versions: dict | None = None, translations: list[str] | None = None,
               shards_per_task: int = 16) -> dict:
    plan = plan_task(root=root, name=name, sources=list(sources), langs=list(langs), min_langs=min_langs,
                     drop_flagged=drop_flagged, shard_size=shard_size, seed=seed,
                     source_versions=source_versions, translations=translations)
    if plan.skipped:
        result = build.skipped_result(plan)
    else:
        futures = [shards_task.submit(plan.path, group)
                   for group in build.shard_groups(plan.n_shards, shards_per_task)]
        for f in futures:
            f.result()
        result = finalize_task(plan.path, plan.root)
    publish_table(f"dataset-{name}-drops", result.drops or [{"unit": "-", "reason": "none", "lang": None, "count": 0}],
                  description="rows dropped by the language policy and the join, by reason")
    publish_markdown(f"dataset-{name}-summary",
                     f"**{result.message}**\n\n| samples | shards | bytes |\n|---|---|---|\n"
                     f"| {result.n_samples} | {result.n_shards} | {result.bytes} |\n\n"
                     + "\n".join(f"- {lang}: {n} captions" for lang, n in result.captions_by_lang.items()))
    publish_link(f"dataset-{name}", result.path, description=f"dataset {name} {result.version}")
    return result.as_dict()
