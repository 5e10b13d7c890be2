"""Finalize a build: complete the manifest, write ``_COMPLETE`` last. The catalog entry is not
written here: :func:`storage.stage.run_stage` records it (``build_stats`` are its stats)."""
from __future__ import annotations

import glob
import json
import os
import shutil
from dataclasses import asdict, dataclass, field

from storage import atomic
from storage.build_resolve import BuildPlan
from storage.build_staging import COMPLETE, STAGING, duckdb_cursor
from storage.manifest import finish_draft, summary, write_manifest


@dataclass
class BuildResult:
    name: str
    version: str
    path: str
    skipped: bool
    n_samples: int
    n_shards: int
    bytes: int
    captions_by_lang: dict[str, int]
    drops: list[dict]
    message: str = ""
    benchmark_overlap: dict[str, int] = field(default_factory=dict)  # {benchmark: images kept out}
    overlap_by_kind: list[dict] = field(default_factory=list)        # (benchmark, kind, n_images) rows
    lang_counts: dict[int, int] = field(default_factory=dict)        # {number of languages: samples}

    def as_dict(self) -> dict:
        return asdict(self)


def finalize_build(dataset_path: str, engine=None, pending=None, draft: tuple[str, str] | None = None) -> BuildResult:
    """Complete the manifest (shards, info), write sizes.json, the wids index and ``_COMPLETE``
    (after removing the temporary shard files of killed writers: :func:`storage.atomic.stale_temps`).
    ``pending``: a callable waiting for shards still being written. ``draft``: the plan's manifest
    draft still ATTACHed to ``engine`` (``plan_build(keep_draft=True)``); otherwise
    ``_build/manifest.partial.duckdb`` is completed."""
    with duckdb_cursor(engine) as con:  # the instance holding the draft, or one for this step
        return _finalize(dataset_path, con, pending, draft)


def _finalize(dataset_path: str, con, pending, draft: tuple[str, str] | None) -> BuildResult:
    staging = os.path.join(dataset_path, STAGING)
    lineage = json.load(open(os.path.join(staging, "lineage.json")))

    def shard_records() -> list[dict]:
        if pending is not None:
            pending()
        return [json.load(open(f)) for f in sorted(glob.glob(os.path.join(glob.escape(staging), "shard-*.tar.index.json")))]

    if draft is not None:
        s = finish_draft(con, draft[0], draft[1], dataset_path, shard_records, lineage)
    else:
        s = write_manifest(dataset_path, shard_records, lineage, engine=con)
    for stale in atomic.stale_temps(os.path.join(dataset_path, "shards")):  # a killed writer's, never a live one's
        os.unlink(stale)
    atomic.write_json(os.path.join(dataset_path, COMPLETE), {
        "name": lineage["name"], "version": lineage["version"], "n_samples": s["n_samples"],
        "n_shards": s["n_shards"]})
    shutil.rmtree(staging, ignore_errors=True)
    return _result(dataset_path, lineage["name"], lineage["version"], False, s,
                   f"built dataset {lineage['name']} {lineage['version']}: {s['n_samples']} samples in "
                   f"{s['n_shards']} shards")


def build_stats(result: BuildResult, lineage: dict) -> dict:
    """The dataset's catalog stats: its counts, and the version of each source it was built from."""
    stats = {"n_samples": result.n_samples, "n_shards": result.n_shards, "bytes": result.bytes,
             "captions_by_lang": result.captions_by_lang,
             "sources": {x["name"]: x["version"] for x in lineage["sources"]}}
    if result.benchmark_overlap:
        stats["benchmark_overlap"] = result.benchmark_overlap
    return stats


def _result(path, name, version, skipped, s, message) -> BuildResult:
    return BuildResult(name=name, version=version, path=path, skipped=skipped, n_samples=s["n_samples"],
                       n_shards=s["n_shards"], bytes=s["bytes"], captions_by_lang=s["captions_by_lang"],
                       drops=s["drops"], message=message, benchmark_overlap=s.get("benchmark_overlap", {}),
                       overlap_by_kind=s.get("overlap_by_kind", []), lang_counts=s.get("lang_counts", {}))


def skipped_result(plan: BuildPlan) -> BuildResult:
    return _result(plan.path, plan.name, plan.version, True, summary(plan.path), plan.message)
