"""Build a K-lingual dataset: join image shards, captions and translations, apply the language
policy, write deterministic shards, then the manifest -- ``<root>/datasets/<name>/<version>/``.

One module per job, each step safe to kill and re-run; this module holds the entry points and the
one orchestration of the steps, :func:`build_dataset`, whichever way they run (:class:`BuildSteps`):
in this process (:class:`LocalSteps`, the default: tests, benchmarks), or as the Prefect flow's
tasks (``flows.build``, which subclasses :class:`PartSteps`):

- :mod:`storage.build_resolve` -- :func:`resolve_build`: the parameters checked, the inputs
  (source versions, translation sets) found, the version derived, ``_build/lineage.json`` written.
- :mod:`storage.build_plan` -- :func:`plan_build` / :func:`plan_resolved`: DuckDB loads the
  sources' ``images.parquet``, ``captions.parquet`` and img2dataset status parquet and the
  translation store, once for the whole dataset.
- :mod:`storage.build_policy` -- the language policy and the drop counts as whole-column SQL.
- :mod:`storage.build_assemble` -- the samples (one row each, in seeded order, with its json),
  bucket by bucket, handed on in chunks; the manifest tables the plan determines (samples with their offsets, captions, per-language
  counts, drops, lineage) drafted.
- :mod:`storage.build_parts` -- how the plan reaches the shard writers: ``_build/plan.parquet``, or
  part files as soon as each group of shards has all its samples.
- :mod:`storage.build_write` -- :func:`write_shard_group`: shards from the plan (temp file, fsync,
  rename); a shard whose ``_build/<shard>.index.json`` exists is done and skipped on resume.
- :mod:`storage.build_finalize` -- :func:`finalize_build`: the manifest completed (shards, info)
  into ``manifest.duckdb``, ``shards/sizes.json``, the wids index, the ``_COMPLETE`` marker (last).
- :mod:`storage.build` (here) -- :func:`build_dataset`: the build as a :class:`storage.stage.Stage`
  (:class:`BuildStage`) run by :func:`storage.stage.run_stage`, which writes its catalog entry:
  resolve, then (unless built) plan while each group of shards is written as soon as the plan has
  all its samples, then finalize. :class:`LocalSteps`
  runs the steps in one process with one DuckDB instance: each shard's rows go to a writer thread
  in memory, the manifest is drafted meanwhile (in memory: :func:`storage.manifest.scratch_draft_path`)
  and stays ATTACHed for finalize. :class:`PartSteps` (the flow's tasks) share only files: the plan
  hands out part files, each write step reads its shards' rows from one. A killed build re-plans
  (same inputs, same plan) and writes only the shards not yet done.
- :mod:`storage.build_staging` -- the file names, staging files and DuckDB connections they share.

Language policy (explicit, counted): a caption keeps the requested languages it has. A translation
with ``ok = false`` is kept unless ``drop_flagged``. A caption needs every requested language
(``min_langs=None``, the default) or at least ``min_langs`` of them; otherwise it is dropped.
Drop reasons -- images: ``no_image`` (never downloaded or not in a shard), ``no_captions``,
``all_captions_dropped``; captions: ``no_image``, ``empty_caption``, ``missing_language``,
``flagged_translation`` (all-languages policy failed because a flagged translation was removed),
``below_min_langs``; translations (per language): ``missing``, ``flagged_translation``.
"""
from __future__ import annotations

import os
import shutil
import threading
import uuid
from concurrent.futures import Future, ThreadPoolExecutor

import duckdb
import pyarrow as pa

from storage.build_assemble import PLAN_BUCKET_ROWS, plan_bucket_rows
from storage.build_finalize import BuildResult, build_stats, finalize_build, skipped_result
from storage.build_parts import PART_COLUMNS, CompleteShards, ready_parts, split_shards
from storage.build_plan import cached_tar_index, plan_build, plan_memory_limit, plan_resolved
from storage.build_resolve import (BuildPlan, ResolvedBuild, SourceInput, TranslationSet, dataset_version,
                                   discover_translations, is_complete, policy_params, resolve_build,
                                   resolve_sources)
from storage.build_staging import BOX_COLUMNS, COMPLETE, MANIFEST, SIZES, STAGING, WIDS_INDEX
from storage.build_write import shard_groups, write_part, write_shard_group
from storage.manifest import discard_draft
from storage.shards import drop_source_maps
from storage.specs import BuildSpec, build_spec
from storage.stage import Outcome, StagePlan, run_stage

__all__ = [
    "BOX_COLUMNS", "COMPLETE", "MANIFEST", "PART_COLUMNS", "PLAN_BUCKET_ROWS", "SIZES", "STAGING", "WIDS_INDEX",
    "BuildPlan", "BuildResult", "BuildStage", "BuildSteps", "CompleteShards", "LocalSteps", "PartSteps", "ResolvedBuild",
    "ShardQueue", "SourceInput", "TranslationSet", "build_dataset", "cached_tar_index", "dataset_version",
    "discover_translations", "finalize_build", "is_complete", "plan_build", "plan_bucket_rows", "plan_memory_limit",
    "plan_resolved", "policy_params", "ready_parts", "resolve_build", "resolve_sources", "shard_groups",
    "skipped_result", "split_shards", "write_part", "write_shard_group",
]


def build_dataset(root=None, spec: BuildSpec | dict | None = None, progress=None, steps: BuildSteps | None = None,
                  **fields) -> BuildResult:
    """The build -- the one orchestration of its steps, however they run: resolve (inputs, version);
    unless that version is built already, plan, and while the plan is being made write each group
    of shards as soon as the plan has all their samples; then finalize (manifest, ``_COMPLETE``).
    :func:`storage.stage.run_stage` runs them (:class:`BuildStage`) and writes the catalog entry:
    after the build, or when the version was built already but never recorded (a kill between
    ``_COMPLETE`` and the entry). With :class:`LocalSteps` the entry goes through the steps' one
    DuckDB instance (the catalog ATTACHed to it, no second instance started).

    ``steps``: how each step runs (:class:`BuildSteps`); default :class:`LocalSteps` (all of them
    in this process, one DuckDB instance, overlapped), which report each written shard's sample
    count to ``progress`` (and the number of samples, once known, to its ``set_total`` if it has
    one); steps passed in report their own.

    ``spec``: the :class:`storage.specs.BuildSpec` (or its dict), with ``fields`` set over it (so
    ``build_dataset(root, name="x", langs="en,es")`` works too); every default is the spec's.
    Its ``memory`` is DuckDB's limit while planning; ``shards_per_task`` is for the flow's steps."""
    spec = build_spec(spec, **fields)
    steps = LocalSteps(progress) if steps is None else steps
    with steps:
        summary = run_stage(BuildStage(steps, root, spec), root, engine=getattr(steps, "engine", None))
    return BuildResult(**summary)


class BuildStage:
    """The build as a :class:`storage.stage.Stage`: ``plan()`` resolves (inputs, version, lineage);
    ``completed()`` is the version already built; ``execute()`` plans, writes and finalizes;
    ``publish()`` does nothing (``flows.build`` publishes its artifacts from the result)."""

    def __init__(self, steps: BuildSteps, root, spec: BuildSpec):
        self.steps, self.root, self.spec, self.resolved = steps, root, spec, None

    def plan(self) -> StagePlan:
        self.resolved = r = self.steps.resolve(root=self.root, spec=self.spec)
        return StagePlan(kind="dataset", name=r.plan.name, version=r.plan.version, path=r.plan.path,
                         params=r.lineage["params"], parents=r.lineage["parents"])

    def completed(self, plan: StagePlan) -> Outcome | None:
        if not self.resolved.plan.skipped and is_complete(plan.path):
            # Another run finished it while this one waited for its lock: resolve again (verified).
            self.resolved = self.steps.resolve(root=self.root, spec=self.spec)
        if not self.resolved.plan.skipped:
            return None
        # The staging a resolve made beside that run's finish (before this one waited) is left over.
        shutil.rmtree(os.path.join(plan.path, STAGING), ignore_errors=True)
        return self._outcome(skipped_result(self.resolved.plan))

    def execute(self, plan: StagePlan) -> Outcome:
        built, writing = _plan_and_write(self.steps, self.resolved, self.spec.memory)
        return self._outcome(self.steps.finalize(built, lambda: _results(writing)))

    def publish(self, plan: StagePlan, summary: dict) -> None:
        pass

    def _outcome(self, result: BuildResult) -> Outcome:
        return Outcome(result.as_dict(), build_stats(result, self.resolved.lineage))


def _plan_and_write(steps: BuildSteps, resolved: ResolvedBuild, memory: str | None) -> tuple[BuildPlan, list]:
    """The plan step, and a write step for each group of shards the plan hands out, as soon as it
    does; returns the plan and the write steps' futures (finalize waits for them, last). When the
    plan fails, the writes already started finish first (a re-run skips the shards written)."""
    path, writing = resolved.plan.path, []

    def start_ready() -> None:
        writing.extend(steps.start_write(path, shard_ids, rows) for shard_ids, rows in steps.ready())

    try:
        planning = steps.plan(resolved, memory, start_ready)
        while not steps.wait(planning):
            start_ready()
        plan = planning.result()
        start_ready()
    except BaseException:
        _settle(writing)
        raise
    return plan, writing


def _settle(futures) -> None:
    """Wait until every future is done, whatever its outcome."""
    for f in futures:
        try:
            f.result()
        except Exception:  # noqa: BLE001 - the caller raises its own error (or _results the first)
            pass


def _results(futures) -> list:
    """Every future's result once all are done; the first failure is raised."""
    _settle(futures)
    return [f.result() for f in futures]


class BuildSteps:
    """How :func:`build_dataset` runs the build's steps (used as a context manager around them):

    - ``resolve(**params)`` -> :class:`ResolvedBuild` (:func:`resolve_build`'s parameters);
    - ``plan(resolved, memory, on_ready)`` -> a future of the :class:`BuildPlan`: runs or starts
      the plan step; ``on_ready()`` may be called whenever it hands out shards;
    - ``wait(planning)`` -> whether the plan is done: returns then, or (False) once shards may
      have been handed out, for :meth:`ready`;
    - ``ready()`` -> the groups of shards handed out and not yet taken: (shard ids, their rows --
      whatever ``start_write`` reads them from);
    - ``start_write(dataset_path, shard_ids, rows)`` -> a future of the shards' records;
    - ``finalize(plan, pending)`` -> :class:`BuildResult`; ``pending()`` waits for every write.

    On leaving, the source tars the shard writers mapped are dropped."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        drop_source_maps()


class ShardQueue:
    """``on_plan`` of :func:`plan_resolved` handing out each shard's rows as soon as the plan has all
    its samples: calls ``on_ready()`` then; :meth:`take` returns them, and :meth:`written` is called
    as each is written.

    A shard handed out holds its rows (the samples' json). Within a bucket of the plan every shard is
    handed out at once, so that the planner goes on -- to the next chunk, and after the last one to
    the drop counts and the manifest draft -- while the shards are written; before the next bucket
    it waits until at most ``backlog`` shards are not yet written, so a plan faster than the disk
    holds about one bucket's shards in memory, whatever the dataset's size."""

    def __init__(self, shard_size: int, on_ready=None, backlog: int = 16):
        self.complete, self.on_ready, self.backlog = CompleteShards(shard_size), on_ready, backlog
        self.handed: list[tuple[list[int], pa.Table]] = []
        self.queued, self.cv = 0, threading.Condition()

    def __call__(self, dataset_path: str, part: pa.Table | None, last: bool) -> None:
        rows = self.complete.add(part, last)
        if rows is None:
            return
        shards = split_shards(rows)
        with self.cv:
            self.handed += [([sid], shard_rows) for sid, shard_rows in shards]
            self.queued += len(shards)
        if self.on_ready is not None:
            self.on_ready()

    def take(self) -> list[tuple[list[int], pa.Table]]:
        with self.cv:
            out, self.handed = self.handed, []
        return out

    def written(self, _future=None) -> None:
        with self.cv:
            self.queued -= 1
            self.cv.notify_all()

    def next_bucket(self) -> None:
        with self.cv:
            self.cv.wait_for(lambda: self.queued <= self.backlog)


class LocalSteps(BuildSteps):
    """Every step in this process, with one DuckDB instance for the plan, the manifest and the
    catalog, overlapped: the plan runs here and hands each shard's rows to one of ``writers``
    threads as soon as it has them (:class:`ShardQueue`), while the rest is planned and the
    manifest's tables that need no shard result go into the manifest draft, which stays ATTACHed
    for finalize. ``progress``: called with each written shard's sample count."""

    def __init__(self, progress=None, backlog: int = 16, writers: int = 8, write=write_shard_group):
        self.progress, self.backlog, self.writers, self.write = progress, backlog, writers, write
        self.engine = self.pool = self.queue = self.planned = None

    def __enter__(self) -> LocalSteps:
        self.engine = duckdb.connect()
        self.pool = ThreadPoolExecutor(self.writers)  # shard writers: reads, writes, fsync and sha256 release the GIL
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.pool.shutdown(wait=True)
            super().__exit__(*exc)
            if self.planned is not None and self.planned.draft is not None:
                self.engine.execute(f"DETACH {self.planned.draft[0]}")
                discard_draft(self.planned.draft[1])
        finally:
            self.engine.close()

    def resolve(self, **params) -> ResolvedBuild:
        return resolve_build(**params, engine=self.engine)

    def plan(self, resolved: ResolvedBuild, memory: str | None, on_ready) -> Future:
        self.queue = ShardQueue(resolved.lineage["params"]["shard_size"], on_ready, self.backlog)
        self.planned = plan_resolved(resolved, self.engine, on_plan=self.queue, keep_draft=True,
                                     on_total=getattr(self.progress, "set_total", None), memory=memory)
        done = Future()
        done.set_result(self.planned)
        return done

    def wait(self, planning) -> bool:
        return True  # the plan ran in plan(), handing out shards as it went

    def ready(self) -> list[tuple[list[int], pa.Table]]:
        return self.queue.take()

    def start_write(self, dataset_path: str, shard_ids: list[int], rows: pa.Table) -> Future:
        future = self.pool.submit(self.write, dataset_path, shard_ids, self.progress, 1, rows)
        future.add_done_callback(self.queue.written)
        return future

    def finalize(self, plan: BuildPlan, pending) -> BuildResult:
        draft, plan.draft = plan.draft, None
        return finalize_build(plan.path, engine=self.engine, pending=pending, draft=draft)


class PartSteps(BuildSteps):
    """Steps that share nothing but files, as the Prefect flow's tasks must (``flows.build``): the
    plan hands out the rows of each set of shards whose samples are all planned as a part file in
    ``_build/parts-<id>/`` (:func:`ready_parts`, polled every ``poll`` seconds meanwhile); each write
    step takes ``shards_per_task`` of those shards and reads their rows from the part file; the
    manifest draft goes to ``_build/manifest.partial.duckdb``, which finalize completes once every
    shard is written.

    Here every step runs in a thread of this process (``progress`` as for :class:`LocalSteps`); a
    subclass runs them elsewhere by overriding :meth:`resolve`, :meth:`submit_plan`,
    :meth:`start_write` and :meth:`finalize_step`, whose arguments and results are plain values."""

    poll = 0.02

    def __init__(self, shards_per_task: int = 16, progress=None):
        self.shards_per_task, self.progress = shards_per_task, progress
        self.parts_dir, self.taken, self.planned, self.pool = None, set(), threading.Event(), None

    def __enter__(self) -> PartSteps:
        self.pool = ThreadPoolExecutor()
        return self

    def __exit__(self, *exc) -> None:
        self.pool.shutdown(wait=True)
        super().__exit__(*exc)

    # The steps.
    def resolve(self, **params) -> ResolvedBuild:
        return resolve_build(**params)

    def submit_plan(self, resolved: ResolvedBuild, parts_dir: str, memory: str | None):
        return self.pool.submit(plan_resolved, resolved, parts_dir=parts_dir, memory=memory,
                                on_total=getattr(self.progress, "set_total", None))

    def start_write(self, dataset_path: str, shard_ids: list[int], part: str):
        return self.pool.submit(write_part, dataset_path, shard_ids, part, self.progress)

    def finalize_step(self, dataset_path: str) -> BuildResult:
        return finalize_build(dataset_path)

    # How build_dataset drives them.
    def plan(self, resolved: ResolvedBuild, memory: str | None, on_ready=None):
        self.parts_dir = os.path.join(resolved.plan.path, STAGING, f"parts-{uuid.uuid4().hex[:12]}")
        planning = self.submit_plan(resolved, self.parts_dir, memory)
        planning.add_done_callback(lambda _: self.planned.set())
        return planning

    def wait(self, planning) -> bool:
        return self.planned.wait(self.poll)

    def ready(self) -> list[tuple[list[int], str]]:
        return [(group, part) for part, shards in ready_parts(self.parts_dir, self.taken)
                for group in shard_groups(shards, self.shards_per_task)]

    def finalize(self, plan: BuildPlan, pending) -> BuildResult:
        pending()
        return self.finalize_step(plan.path)
