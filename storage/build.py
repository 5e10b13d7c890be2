"""Build a K-lingual dataset: join image shards, captions and translations, apply the language
policy, write deterministic shards, then the manifest -- ``<root>/datasets/<name>/<version>/``.

One module per job, each step safe to kill and re-run; this module holds the entry points and the one
in-process orchestration (:func:`build_dataset`), and the Prefect flow runs the same steps as tasks:

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
  into ``manifest.duckdb``, ``shards/sizes.json``, the wids index, the ``_COMPLETE`` marker (last),
  then the catalog entry.
- :mod:`storage.build` (here) -- :func:`build_dataset`: the steps in one process with one DuckDB
  instance, overlapped: each shard written in a background thread as soon as its samples are
  planned, the manifest drafted meanwhile (in memory: :func:`storage.manifest.scratch_draft_path`).
  The flow overlaps them the same way across tasks (plan parts). A killed build re-plans (same
  inputs, same plan) and writes only the shards not yet done.
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

import threading
from concurrent.futures import ThreadPoolExecutor

import duckdb
import pyarrow as pa

from storage.build_assemble import PLAN_BUCKET_ROWS, plan_bucket_rows
from storage.build_finalize import BuildResult, finalize_build, skipped_result
from storage.build_parts import PART_COLUMNS, CompleteShards, ready_parts, split_shards
from storage.build_plan import cached_tar_index, plan_build, plan_memory_limit, plan_resolved
from storage.build_resolve import (BuildPlan, ResolvedBuild, SourceInput, TranslationSet, caption_normalizer,
                                   dataset_version, discover_translations, is_complete, policy_params,
                                   resolve_build, resolve_sources)
from storage.build_staging import BOX_COLUMNS, COMPLETE, MANIFEST, SIZES, STAGING, WIDS_INDEX
from storage.build_write import shard_groups, write_shard_group
from storage.manifest import discard_draft
from storage.shards import drop_source_maps

__all__ = [
    "BOX_COLUMNS", "COMPLETE", "MANIFEST", "PART_COLUMNS", "PLAN_BUCKET_ROWS", "SIZES", "STAGING", "WIDS_INDEX",
    "BuildPlan", "BuildResult", "CompleteShards", "ResolvedBuild", "SourceInput", "TranslationSet",
    "build_dataset", "cached_tar_index", "caption_normalizer", "dataset_version", "discover_translations",
    "finalize_build", "is_complete", "plan_build", "plan_bucket_rows", "plan_memory_limit", "plan_resolved",
    "policy_params", "ready_parts", "resolve_build", "resolve_sources", "shard_groups", "skipped_result",
    "split_shards", "write_shard_group",
]


class _ShardStarter:
    """``on_plan`` for :func:`build_dataset`: each shard is submitted to ``pool`` as soon as the plan
    has all its samples (futures appended to ``writing``).

    A queued shard holds its rows (the samples' json). Within a bucket of the plan every shard is
    queued at once, so that the planner goes on -- to the next chunk, and after the last one to the
    drop counts and the manifest draft -- while the shards are written; before the next bucket it
    waits until at most ``backlog`` shards are queued, so a plan faster than the disk holds about
    one bucket's shards in memory, whatever the dataset's size."""

    def __init__(self, pool, writing: list, shard_size: int, progress=None, backlog: int = 16, write=None):
        self.pool, self.writing, self.progress, self.backlog = pool, writing, progress, backlog
        self.write = write_shard_group if write is None else write
        self.complete = CompleteShards(shard_size)
        self.queued, self.cv = 0, threading.Condition()

    def __call__(self, dataset_path: str, part: pa.Table | None, last: bool) -> None:
        rows = self.complete.add(part, last)
        for sid, shard_rows in split_shards(rows) if rows is not None else []:
            with self.cv:
                self.queued += 1
            self.writing.append(self.pool.submit(self.write, dataset_path, [sid], self.progress, 1, shard_rows))
            self.writing[-1].add_done_callback(self._done)

    def _done(self, _future) -> None:
        with self.cv:
            self.queued -= 1
            self.cv.notify_all()

    def next_bucket(self) -> None:
        with self.cv:
            self.cv.wait_for(lambda: self.queued <= self.backlog)


def build_dataset(root=None, name: str = "default", sources=("cc3m", "sbu", "vg", "coco"),
                  langs=("en", "es", "id", "ru", "tr"), min_langs: int | None = None, drop_flagged: bool = False,
                  shard_size: int = 1000, seed: int = 0, source_versions: dict | None = None,
                  translations=None, progress=None, memory: str | None = None) -> BuildResult:
    """The whole build in this process (the Prefect flow runs the same three steps as tasks), with
    one DuckDB instance for the plan, the manifest and the catalog, and the steps overlapped: each
    shard is written (in background threads) as soon as the plan has its samples -- the plan comes
    in chunks of the seeded order -- while the rest is planned and the manifest's tables that need no
    shard result go into the manifest draft."""
    engine = duckdb.connect()
    pool = ThreadPoolExecutor(8)  # shard writers: reads, writes, fsync and sha256 release the GIL
    writing = []
    start_shards = _ShardStarter(pool, writing, shard_size, progress)
    plan = None
    try:
        plan = plan_build(root, name, sources, langs, min_langs, drop_flagged, shard_size, seed,
                          source_versions, translations, engine=engine, on_plan=start_shards, keep_draft=True,
                          memory=memory)
        if plan.skipped:
            return skipped_result(plan)
        if not writing:
            write_shard_group(plan.path, range(plan.n_shards), progress=progress)
        draft, plan.draft = plan.draft, None
        return finalize_build(plan.path, root=plan.root, engine=engine,
                              pending=lambda: [f.result() for f in writing], draft=draft)
    finally:
        pool.shutdown(wait=True)
        drop_source_maps()
        if plan is not None and plan.draft is not None:
            engine.execute(f"DETACH {plan.draft[0]}")
            discard_draft(plan.draft[1])
        engine.close()
