"""Prefect flow for ``ccrk build``: the exclusion lists of the benchmarks to keep out (one task
each, :mod:`ccrk.evaluation.exclusion`), resolve (inputs and version), plan (the DuckDB join), one
task per group of shards, finalize.

Thin: the orchestration is :func:`storage.build.build_dataset`'s, the one the in-process build
runs (through :func:`storage.stage.run_stage`, which records the catalog entry in this flow's
process once finalize is done); :class:`FlowSteps` runs its steps as this flow's tasks.
Re-running after a kill redoes only the shards that are not written yet, and a finished version
is a no-op that says so (and records the catalog entry if a kill lost it). The shard
tasks do not wait for the whole plan: the plan task hands out each group of shards as soon as all
their samples are planned (part files, :class:`storage.build.PartSteps`), and the flow submits
their tasks while the plan goes on.
"""
from __future__ import annotations

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from ccrk.evaluation.exclusion import make_exclusion
from flows.artifacts import publish_link, publish_markdown, publish_table
from storage import build
from storage.progress import Advance, Progress, or_silent
from storage.specs import BuildSpec, ExcludeBenchmark


@task(name="exclusion-list", cache_policy=NO_CACHE)
def exclusion_task(entry: ExcludeBenchmark, root: str | None = None) -> dict:
    return make_exclusion(root, entry)


def with_exclusion_lists(spec: BuildSpec, root: str | None) -> tuple[BuildSpec, list[dict]]:
    """``spec`` with each benchmark entry of its ``exclude`` made into its exclusion list (a
    versioned artifact; one task each) and named by the list's path; and those lists' summaries."""
    made, exclude = [], []
    for entry in spec.exclude or ():
        if isinstance(entry, ExcludeBenchmark):
            summary = exclusion_task(entry, root)
            made.append(summary)
            entry = summary["list"]
        exclude.append(entry)
    return (spec.merged({"exclude": exclude}) if made else spec), made


@task(name="resolve-dataset", cache_policy=NO_CACHE)
def resolve_task(**kwargs) -> build.ResolvedBuild:
    return build.resolve_build(**kwargs)


@task(name="plan-dataset", cache_policy=NO_CACHE)
def plan_task(resolved: build.ResolvedBuild, parts_dir: str | None = None, memory: str | None = None,
              advance: Advance | None = None) -> build.BuildPlan:
    total = getattr(advance, "set_total", None)
    return build.plan_resolved(resolved, parts_dir=parts_dir, on_total=total, memory=memory)


@task(name="write-shards", cache_policy=NO_CACHE)
def shards_task(dataset_path: str, shard_ids: list[int], part: str | None = None,
                advance: Advance | None = None) -> list[dict]:
    """``part``: the plan rows of these shards (a file of ``parts_dir``); else ``_build/plan.parquet``."""
    return build.write_part(dataset_path, shard_ids, part, progress=advance)


@task(name="finalize-dataset", cache_policy=NO_CACHE)
def finalize_task(dataset_path: str) -> build.BuildResult:
    return build.finalize_build(dataset_path)


class FlowSteps(build.PartSteps):
    """The build's steps as this flow's tasks: resolve and finalize run as tasks, the plan and each
    group of ``shards_per_task`` shards are submitted to the flow's task runner."""

    def resolve(self, **params) -> build.ResolvedBuild:
        return resolve_task(**params)

    def submit_plan(self, resolved: build.ResolvedBuild, parts_dir: str, memory: str | None):
        return plan_task.submit(resolved, parts_dir, memory, self.progress)

    def start_write(self, dataset_path: str, shard_ids: list[int], part: str):
        return shards_task.submit(dataset_path, shard_ids, part, self.progress)

    def finalize_step(self, dataset_path: str) -> build.BuildResult:
        return finalize_task(dataset_path)


@flow(name="build-dataset")
def build_flow(spec: BuildSpec | None = None, root: str | None = None, progress: Progress | None = None) -> dict:
    """Build the dataset of ``spec`` (a :class:`storage.specs.BuildSpec` or its dict; every default is
    the spec's). ``progress``: a :data:`storage.progress.Progress` (the command line's bar of written samples)."""
    spec, lists = with_exclusion_lists(BuildSpec.parse(spec), root)
    name = spec.name
    with or_silent(progress)("build shards", None, "samples") as advance:
        result = build.build_dataset(root=root, spec=spec, steps=FlowSteps(spec.shards_per_task, advance))
    publish_table(f"dataset-{name}-drops", result.drops or [{"unit": "-", "reason": "none", "lang": None, "count": 0}],
                  description="rows dropped by the language policy and the join, by reason")
    overlap = "".join(f"- {bench}: {n} images kept out (evaluation images found in the sources)\n"
                      for bench, n in result.benchmark_overlap.items())
    if result.overlap_by_kind:
        publish_table(f"dataset-{name}-benchmark-overlap", result.overlap_by_kind,
                      description="source images of an evaluation benchmark kept out, by kind of match")
    publish_markdown(f"dataset-{name}-summary",
                     f"**{result.message}**\n\n| samples | shards | bytes |\n|---|---|---|\n"
                     f"| {result.n_samples} | {result.n_shards} | {result.bytes} |\n\n"
                     + "\n".join(f"- {lang}: {n} captions" for lang, n in result.captions_by_lang.items())
                     + (f"\n\n**Benchmark overlap**\n\n{overlap}" if overlap else ""))
    publish_link(f"dataset-{name}", result.path, description=f"dataset {name} {result.version}")
    return {**result.as_dict(), "exclusion_lists": lists}
