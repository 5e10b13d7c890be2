"""Build a K-lingual dataset: join image shards, captions and translations, apply the language
policy, write deterministic shards, then the manifest -- ``<root>/datasets/<name>/<version>/``.

Three steps, each safe to kill and re-run (the Prefect flow runs them as tasks):

1. :func:`plan_build` (:func:`resolve_build`: inputs and version, then :func:`plan_resolved`) --
   DuckDB joins the sources' ``images.parquet``, ``captions.parquet`` and img2dataset status
   parquet with the translation store, once for the whole dataset; the language policy and the drop
   counts are whole-column SQL, each sample's json is per-caption SQL fragments joined per sample by
   Arrow (no per-row Python). The outcome (one row per sample, in seeded order, with its json) goes
   to ``_build/plan.parquet`` -- or, for shard tasks that start before the plan is done, to part
   files as soon as each group of shards has all its samples -- and the manifest tables it
   determines (samples with their offsets, captions, per-language counts, drops, lineage) to
   ``_build/manifest.partial.duckdb``.
2. :func:`write_shard_group` -- writes some shards from the plan (temp file, fsync, rename); a shard
   whose ``_build/<shard>.index.json`` exists is done and skipped on resume.
3. :func:`finalize_build` -- completes the manifest (shards, info) into ``manifest.duckdb``, writes
   ``shards/sizes.json``, the wids index, then the ``_COMPLETE`` marker (last), then the catalog entry.

:func:`build_dataset` runs the three in one process with one DuckDB instance (the manifest and
the catalog are ATTACHed to it) and overlaps them: the samples' json is made in chunks of the
seeded order, each shard is written in a background thread as soon as its samples are planned, and
the manifest's plan-determined tables are drafted meanwhile (in memory: see
:func:`storage.manifest.scratch_draft_path`), then completed and copied into the dataset after the
shards. The flow overlaps them the same way across tasks (plan parts). A killed build re-plans
(same inputs, same plan) and writes only the shards not yet done.

Language policy (explicit, counted): a caption keeps the requested languages it has. A translation
with ``ok = false`` is kept unless ``drop_flagged``. A caption needs every requested language
(``min_langs=None``, the default) or at least ``min_langs`` of them; otherwise it is dropped.
Drop reasons -- images: ``no_image`` (never downloaded or not in a shard), ``no_captions``,
``all_captions_dropped``; captions: ``no_image``, ``empty_caption``, ``missing_language``,
``flagged_translation`` (all-languages policy failed because a flagged translation was removed),
``below_min_langs``; translations (per language): ``missing``, ``flagged_translation``.
"""
from __future__ import annotations

import glob
import json
import os
import re
import shutil
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from storage import atomic, layout
from storage.catalog import Artifact, Catalog
from storage.errors import CCRKError
from storage.languages import SOURCE_LANG, parse_langs
from storage.manifest import SCORE_COLUMNS, score_type as _score_type, sql_ident as _ident, sql_str as _sql_str
from storage.shards import drop_source_maps, safe_keys, shard_name, write_planned_shard
from storage.versioning import CODE_VERSION, content_version, files_sha256, text_sha

COMPLETE = "_COMPLETE"
MANIFEST = "manifest.duckdb"
STAGING = "_build"
WIDS_INDEX = "wids-index.json"
SIZES = "sizes.json"
BOX_COLUMNS = ("region_id", "x", "y", "w", "h")


# --------------------------------------------------------------------------- inputs


@dataclass
class SourceInput:
    name: str
    version: str
    path: str
    recorded: bool  # in the catalog (then it is a parent of the dataset)


@dataclass
class TranslationSet:
    model_id: str
    decode_id: str
    lang: str
    path: str
    files: list[str]
    content_id: str = ""
    artifact_versions: list[str] = field(default_factory=list)
    artifact_params: dict = field(default_factory=dict)  # the translation stage's recorded settings

    @property
    def set_id(self) -> str:
        return f"{self.model_id}/{self.decode_id}"


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

    def as_dict(self) -> dict:
        return asdict(self)


def caption_normalizer():
    """The translation store's normalisation (one definition: ``translation.normalize``)."""
    try:
        from translation.normalize import normalize
    except ImportError as exc:  # pragma: no cover - the translation stage ships it
        raise CCRKError("translation.normalize is missing: the build needs the translation stage's "
                        "caption normalisation to find translations") from exc
    return normalize


def resolve_sources(root: str, sources, source_versions: dict | None = None, engine=None) -> list[SourceInput]:
    """Each source's artifact: the given version, else the latest recorded in the catalog."""
    cat = Catalog(root, engine)
    out = []
    source_versions = dict(source_versions or {})
    unknown = set(source_versions) - set(sources)
    if unknown:
        raise CCRKError(f"--source-version names {sorted(unknown)} which are not in --sources")
    for name in sources:
        wanted = source_versions.get(name)
        if wanted:
            art = cat.find(wanted)
            if art is not None and art.kind == "source" and art.name == name:
                out.append(SourceInput(name, art.version, art.path, True))
                continue
            path = layout.source_dir(root, name, wanted)
            if not os.path.isdir(path):
                raise CCRKError(f"source {name} version {wanted!r}: not in the catalog and no directory {path}")
            out.append(SourceInput(name, wanted, path, False))
            continue
        art = cat.latest("source", name)
        if art is None:
            raise CCRKError(f"no source artifact {name!r} in the catalog {cat.path}: acquire it first "
                            f"or pass --source-version {name}=VERSION")
        out.append(SourceInput(name, art.version, art.path, True))
    for s in out:
        for f in ("images.parquet", "captions.parquet"):
            if not os.path.exists(os.path.join(s.path, f)):
                raise CCRKError(f"source {s.name} {s.version}: missing {os.path.join(s.path, f)}")
    return out


def discover_translations(root: str, langs, chosen=None, engine=None) -> dict[str, list[TranslationSet]]:
    """Translation sets under ``<root>/translations`` per target language, in priority order:
    the order of ``chosen`` (``MODEL_ID/DECODE_ID`` strings) when given, else sorted ids."""
    base = layout.join(root, "translations")
    by_dir: dict[str, list[str]] = {}
    for f in sorted(glob.glob(os.path.join(base, "**", "part-*.parquet"), recursive=True)):
        by_dir.setdefault(os.path.dirname(f), []).append(f)
    sets: dict[str, list[TranslationSet]] = {}
    for d, files in sorted(by_dir.items()):
        rel = os.path.relpath(d, base).split(os.sep)
        if len(rel) < 3:
            continue
        lang, decode_id, model_id = rel[-1], rel[-2], "/".join(rel[:-2])
        if lang in langs and lang != SOURCE_LANG:
            sets.setdefault(lang, []).append(TranslationSet(model_id, decode_id, lang, d, files))
    if chosen:
        order = {c.strip("/"): i for i, c in enumerate(chosen)}
        found = {t.set_id for ts in sets.values() for t in ts}
        missing = [c for c in order if c not in found]
        if missing:
            raise CCRKError(f"--translations {missing[0]!r}: no part-*.parquet under {base}/{missing[0]}/<lang>/")
        sets = {lang: sorted((t for t in ts if t.set_id in order), key=lambda t: order[t.set_id])
                for lang, ts in sets.items()}
        sets = {k: v for k, v in sets.items() if v}
    recorded = Catalog(root, engine).list("translation")
    for ts in sets.values():
        for t in ts:
            t.content_id = files_sha256(t.files, cached=True)[:16]
            matched = [a for a in recorded if _same_or_parent(a.path, t.path)]
            t.artifact_versions = sorted(a.version for a in matched)
            t.artifact_params = {a.version: a.params for a in matched}
    return sets


def _same_or_parent(artifact_path: str, set_path: str) -> bool:
    a = os.path.abspath(artifact_path).rstrip("/")
    p = os.path.abspath(set_path).rstrip("/")
    return p == a or p.startswith(a + "/")


def policy_params(langs, min_langs, drop_flagged, shard_size, seed) -> dict:
    return {"langs": list(langs), "min_langs": min_langs if min_langs is not None else "all",
            "drop_flagged": bool(drop_flagged), "shard_size": int(shard_size), "seed": int(seed)}


def dataset_version(sources: list[SourceInput], tsets: dict[str, list[TranslationSet]], params: dict) -> str:
    parents = [f"source:{s.name}:{s.version}" for s in sources]
    # A language with several translation sets: their order of preference decides which
    # translation a caption gets, so it is part of the version (one set: nothing to order).
    parents += [f"translation:{t.set_id}/{t.lang}:{t.content_id}" + (f"#{rank}" if len(ts) > 1 else "")
                for ts in tsets.values() for rank, t in enumerate(ts)]
    return content_version("dataset", parents, params, CODE_VERSION)


# --------------------------------------------------------------------------- step 1: plan


@dataclass
class BuildPlan:
    root: str
    name: str
    version: str
    path: str
    skipped: bool
    n_samples: int = 0
    n_shards: int = 0
    message: str = ""
    draft: tuple[str, str] | None = None  # (alias, path) of the manifest draft kept ATTACHed (keep_draft)


@dataclass
class ResolvedBuild:
    """A build's inputs, resolved, and its version (:func:`resolve_build`); ``plan.skipped`` when that
    version is already built (every shard present at its recorded size)."""
    plan: BuildPlan
    srcs: list[SourceInput] = field(default_factory=list)
    tsets: dict[str, list[TranslationSet]] = field(default_factory=dict)
    lineage: dict = field(default_factory=dict)  # its "params" hold the policy (policy_params)


def is_complete(dataset_path: str) -> bool:
    return os.path.exists(os.path.join(dataset_path, COMPLETE)) and os.path.exists(os.path.join(dataset_path, MANIFEST))


def resolve_build(root=None, name: str = "default", sources=("cc3m", "sbu", "vg", "coco"),
                  langs=("en", "es", "id", "ru", "tr"), min_langs: int | None = None, drop_flagged: bool = False,
                  shard_size: int = 1000, seed: int = 0, source_versions: dict | None = None,
                  translations=None, engine=None) -> ResolvedBuild:
    """Check the parameters, resolve the inputs (source versions, translation sets) and derive the
    version. Unless that version is already built (``plan.skipped``: every shard present at its
    recorded size), makes its ``_build/`` staging directory with ``lineage.json``. ``engine``: as for
    :func:`plan_build`."""
    root = layout.data_root(root)
    langs = parse_langs(langs)
    sources = parse_langs(sources) if isinstance(sources, str) else tuple(sources)
    if not langs:
        raise CCRKError("--langs is empty")
    if min_langs is not None and not 1 <= min_langs <= len(langs):
        raise CCRKError(f"--min-langs {min_langs} must be between 1 and the {len(langs)} requested languages")
    if shard_size < 1:
        raise CCRKError(f"--shard-size {shard_size} must be positive")
    with _duckdb(engine) as con:
        srcs = resolve_sources(root, sources, source_versions, con)
        tsets = discover_translations(root, langs, translations, con)
    if min_langs is None:
        lacking = [lang for lang in langs if lang != SOURCE_LANG and lang not in tsets]
        if lacking:
            raise CCRKError(f"no translations for {','.join(lacking)} under {layout.join(root, 'translations')}: "
                            "translate or import them first, or relax the policy with --min-langs")
    params = policy_params(langs, min_langs, drop_flagged, shard_size, seed)
    version = dataset_version(srcs, tsets, params)
    path = layout.dataset_dir(root, name, version)
    if is_complete(path):
        from storage.verify import verify_dataset

        # Every shard present at its recorded size (no shard is read: at CC3M's scale hashing them
        # all would take minutes; `ccrk verify` re-reads them).
        report = verify_dataset(path, deep=False, contents=False)
        if report.ok:
            return ResolvedBuild(BuildPlan(root, name, version, path, True, report.n_samples, report.n_shards,
                                           f"dataset {name} {version} is already built (every shard present at "
                                           "its recorded size; `ccrk verify` re-reads them): nothing to do"))
        # A damaged build: forget it was complete and write it again (same bytes).
        for f in (COMPLETE, MANIFEST):
            if os.path.exists(os.path.join(path, f)):
                os.unlink(os.path.join(path, f))
    staging = os.path.join(path, STAGING)
    os.makedirs(staging, exist_ok=True)
    lineage = {"name": name, "version": version, "params": params,
               "rows": _lineage_rows(name, version, srcs, tsets, params),
               "parents": sorted({s.version for s in srcs if s.recorded}
                                 | {v for ts in tsets.values() for t in ts for v in t.artifact_versions}),
               "sources": [asdict(s) for s in srcs]}
    _write_staging_json(os.path.join(staging, "lineage.json"), lineage)
    return ResolvedBuild(BuildPlan(root, name, version, path, False), srcs, tsets, lineage)


def plan_build(root=None, name: str = "default", sources=("cc3m", "sbu", "vg", "coco"),
               langs=("en", "es", "id", "ru", "tr"), min_langs: int | None = None, drop_flagged: bool = False,
               shard_size: int = 1000, seed: int = 0, source_versions: dict | None = None,
               translations=None, engine=None, on_plan=None, keep_draft: bool = False,
               memory: str | None = None) -> BuildPlan:
    """Resolve inputs, derive the version, and (unless already built) plan the samples: writes
    ``_build/plan.parquet`` (what the shard tasks read), ``_build/lineage.json`` and the manifest's
    plan-determined tables (``_build/manifest.partial.duckdb``, completed by :func:`finalize_build`).

    ``engine``: a DuckDB connection whose instance the plan's queries may use. ``on_plan``: called
    with the dataset path, each chunk of the plan in dataset order (an Arrow table, rows as in
    ``plan.parquet``; None for a chunk without samples) and whether it is the last, as soon as the
    chunk is planned (e.g. to start writing the shards it completes); its ``next_bucket()``, if it
    has one, is called before each bucket of the plan but the first (see :func:`_assemble`) -- the
    place to wait when the shards fall behind, so that memory holds about one bucket.
    ``keep_draft`` (with ``engine``): leave the manifest draft ATTACHed to ``engine`` for
    :func:`finalize_build` to complete (``BuildPlan.draft``) and skip ``plan.parquet`` -- for one
    process running every step (:func:`build_dataset`); a re-run plans again anyway. ``memory``:
    DuckDB's limit while planning (:func:`plan_memory_limit`)."""
    resolved = resolve_build(root, name, sources, langs, min_langs, drop_flagged, shard_size, seed,
                             source_versions, translations, engine)
    if resolved.plan.skipped:
        return resolved.plan
    return plan_resolved(resolved, engine, on_plan, keep_draft, memory=memory)


def plan_resolved(resolved: ResolvedBuild, engine=None, on_plan=None, keep_draft: bool = False,
                  parts_dir: str | None = None, on_total=None, memory: str | None = None) -> BuildPlan:
    """The plan of a resolved, not yet built version (:func:`plan_build` after :func:`resolve_build`).

    ``parts_dir``: also hand out the plan as it is made, for shard tasks that start before it is
    done (:func:`ready_parts`): each time some shards have all their samples planned, their rows go
    to ``part-NNNNN.parquet`` there, then ``part-NNNNN.json`` names the shards (written last, by a
    rename); ``plan.parquet`` is then not written. ``on_total``: called with the number of samples
    once the join and the language policy are done, before any is planned (for a progress bar).
    ``memory``: DuckDB's limit while planning (:func:`plan_memory_limit`)."""
    r, p = resolved, resolved.plan
    if p.skipped:
        return p
    params = r.lineage["params"]
    shard_size, min_langs = params["shard_size"], None if params["min_langs"] == "all" else params["min_langs"]
    staging = os.path.join(p.path, STAGING)
    if parts_dir is not None:
        on_plan = _PartWriter(parts_dir, shard_size, on_plan)
    keep_draft = keep_draft and engine is not None
    n_samples, draft = _plan(staging, r.srcs, r.tsets, params["langs"], min_langs, params["drop_flagged"], shard_size,
                             params["seed"], r.lineage, engine, on_plan, keep_draft,
                             write_plan=parts_dir is None and not keep_draft, on_total=on_total, memory=memory)
    n_shards = -(-n_samples // shard_size)
    return BuildPlan(p.root, p.name, p.version, p.path, False, n_samples, n_shards,
                     f"planned {n_samples} samples in {n_shards} shards", draft)


class CompleteShards:
    """Plan chunks in, in dataset order; out, the rows of the shards whose samples are all planned."""

    def __init__(self, shard_size: int):
        self.shard_size = int(shard_size)
        self.held: list[pa.Table] = []

    def add(self, part: pa.Table | None, last: bool) -> pa.Table | None:
        if part is not None:
            self.held.append(part)
        if not self.held:
            return None
        rows = pa.concat_tables(self.held) if len(self.held) > 1 else self.held[0]
        shard = rows.column("shard").to_numpy()
        cut = len(shard)
        if not last and np.count_nonzero(shard == shard[-1]) < self.shard_size:
            cut = int(np.searchsorted(shard, shard[-1], "left"))  # the last shard waits for its other samples
        self.held = [rows.slice(cut)] if cut < len(shard) else []
        return rows.slice(0, cut) if cut else None


def split_shards(rows: pa.Table) -> list[tuple[int, pa.Table]]:
    """Plan rows (in dataset order) as (shard id, that shard's rows)."""
    shard = rows.column("shard").to_numpy()
    out = []
    for sid in np.unique(shard).tolist():
        lo, hi = int(np.searchsorted(shard, sid, "left")), int(np.searchsorted(shard, sid, "right"))
        out.append((sid, rows.slice(lo, hi - lo)))
    return out


PART_COLUMNS = ["idx", "shard", "key", "tar_path", "img_offset", "img_size", "meta_json"]


class _PartWriter:
    """``on_plan`` writing complete shards' rows to ``parts_dir`` (see :func:`plan_resolved`)."""

    def __init__(self, parts_dir: str, shard_size: int, then=None):
        self.dir, self.complete, self.then, self.n = parts_dir, CompleteShards(shard_size), then, 0
        os.makedirs(parts_dir, exist_ok=True)

    def __call__(self, dataset_path: str, part: pa.Table | None, last: bool) -> None:
        rows = self.complete.add(part, last)
        if rows is not None:
            name = f"part-{self.n:05d}"
            self.n += 1
            _write_staging(os.path.join(self.dir, f"{name}.parquet"),
                           lambda tmp: pq.write_table(rows.select(PART_COLUMNS), tmp))
            _write_staging_json(os.path.join(self.dir, f"{name}.json"),
                                {"rows": f"{name}.parquet", "shards": np.unique(rows.column("shard").to_numpy()).tolist()})
        if self.then is not None:
            self.then(dataset_path, part, last)

    def next_bucket(self) -> None:
        if hasattr(self.then, "next_bucket"):
            self.then.next_bucket()


def ready_parts(parts_dir: str, taken: set) -> list[tuple[str, list[int]]]:
    """The plan parts written to ``parts_dir`` (:func:`plan_resolved`) and not in ``taken`` (updated),
    in order: (rows parquet path, shard ids)."""
    out = []
    for marker in sorted(glob.glob(os.path.join(parts_dir, "part-*.json"))):
        if marker in taken:
            continue
        taken.add(marker)
        with open(marker) as f:
            info = json.load(f)
        out.append((os.path.join(parts_dir, info["rows"]), [int(x) for x in info["shards"]]))
    return out


def _lineage_rows(name, version, srcs, tsets, params) -> list[list[str]]:
    rows = [["dataset", "name", name], ["dataset", "version", version], ["code", "code_version", CODE_VERSION]]
    for s in srcs:
        rows.append(["source", s.name, s.version])
    for lang, ts in sorted(tsets.items()):
        for t in ts:
            rows.append(["translation", lang, f"model_id={t.model_id} decode_id={t.decode_id} "
                                              f"content={t.content_id}"])
            for version, p in sorted(t.artifact_params.items()):
                rows.append(["translation_artifact", f"{t.set_id}/{lang}",
                             f"{version} " + json.dumps(p, sort_keys=True, default=str)])
    for k, v in sorted(params.items()):
        rows.append(["param", k, json.dumps(v)])
    return rows


@contextmanager
def _duckdb(engine=None):
    """A connection to ``engine``'s DuckDB instance (a cursor), or to a new one when None (creating
    an instance costs ~13 ms: one per step, not one per catalog or manifest call); closed after."""
    con = duckdb.connect() if engine is None else engine.cursor()
    try:
        yield con
    finally:
        con.close()


def _columns(files: list[str]) -> set[str]:
    """The union of the parquet files' column names (footers only)."""
    out: set[str] = set()
    for f in files:
        try:
            out.update(pq.read_schema(f).names)
        except (OSError, pa.ArrowException) as exc:
            raise CCRKError(f"{f} is not a readable parquet file: {exc}") from exc
    return out


def _plan(staging, srcs, tsets, langs, min_langs, drop_flagged, shard_size, seed, lineage, engine=None,
          on_plan=None, keep_draft=False, write_plan=True, on_total=None,
          memory: str | None = None) -> tuple[int, tuple[str, str] | None]:
    # The plan's temp tables vanish with its connection.
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(1)
    try:
        with _duckdb(engine) as con:
            tar_index = pool.submit(_index_tars, srcs)
            con.execute(f"SET threads TO {_plan_threads()}")
            # Temp tables beyond the memory limit spill here (DuckDB's default: .tmp in the cwd).
            con.execute(f"SET temp_directory = {_sql_str(os.path.join(staging, 'duckdb-tmp'))}")
            limit = plan_memory_limit(memory)
            try:
                con.execute(f"SET memory_limit = {_sql_str(limit)}")
            except duckdb.Error as exc:
                raise CCRKError(f"build memory {limit!r} (--memory or CCRK_BUILD_MEMORY) is not a DuckDB "
                                f"memory size such as 8GB: {exc}") from None
            boxes = _load_sources(con, srcs, tar_index, seed)
            return _assemble(con, staging, tsets, langs, min_langs, drop_flagged, shard_size, boxes, lineage,
                             on_plan, keep_draft, write_plan, on_total)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def plan_memory_limit(memory: str | None = None) -> str:
    """DuckDB's memory limit while planning: ``memory`` (a DuckDB size, e.g. ``8GB``), else
    ``CCRK_BUILD_MEMORY``, else a third of the machine's memory (DuckDB's own default is 80%; the plan's Arrow buckets, the
    shard writers and the manifest draft need the rest). Beyond it the temp tables spill to
    ``_build/duckdb-tmp``."""
    value = (memory or os.environ.get("CCRK_BUILD_MEMORY", "")).strip()
    if value:
        return value
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return "80%"
    return f"{max(256, total // 3 >> 20)}MB"


def _plan_threads() -> int:
    """DuckDB threads for the plan: half the CPUs. Shards are written while the plan is still
    being made (and its manifest tables after it), and the shard threads keep the other half busy;
    on a 2-core machine a second DuckDB thread only contends with them (measured: the build used
    5-10% less CPU with one). Not all CPUs even before the first shard: under a small memory limit
    (``--memory``) a second thread's share of a hash join ran DuckDB out of memory where one
    thread spilled (benchmarks/build_memory.py, 160,000 images in 160 MB)."""
    return max(1, (os.cpu_count() or 2) // 2)


def _finished_shards(source_path: str, ext: str) -> list[str]:
    """The source's img2dataset shard files whose ``NNNNN_stats.json`` exists (img2dataset writes
    it last, so a shard without one is unfinished and not used)."""
    out = []
    for f in sorted(glob.glob(os.path.join(source_path, "shards", f"*{ext}"))):
        if os.path.exists(f[: -len(ext)] + "_stats.json"):
            out.append(f)
    return out


TAR_INDEX_CACHE = 2  # the format of the cached tar indexes (bump to ignore old caches)


def cached_tar_index(tar: str) -> tuple[list[str], list[int], list[int]]:
    """:func:`storage.shards.index_source_tar` of a finished source tar as (keys, data offsets,
    sizes), cached beside it in ``.<name>.index.json`` (:func:`storage.sidecar.cached_beside`:
    used only while the tar is the very file it was made from). Acquisition never rewrites a tar
    once its ``_stats.json`` exists, so a build after the first reads headers no more."""
    from storage.shards import index_source_tar
    from storage.sidecar import cached_beside

    def index(path: str) -> dict:
        found = index_source_tar(path)
        return {"keys": list(found), "offsets": [v[0] for v in found.values()], "sizes": [v[1] for v in found.values()]}

    if not os.path.exists(tar):
        return [], [], []
    got = cached_beside(tar, "index", index, version=TAR_INDEX_CACHE,
                        valid=lambda v: len(v["keys"]) == len(v["offsets"]) == len(v["sizes"]))
    return got["keys"], got["offsets"], got["sizes"]


def _index_tars(srcs) -> pa.Table:
    """Where every image lies in its source's finished img2dataset tars (headers only). Built tar by
    tar as Arrow arrays (no Python object per image beyond one tar's)."""
    schema = pa.schema([("source", pa.string()), ("shard_key", pa.string()), ("tar_path", pa.string()),
                        ("offset", pa.int64()), ("size", pa.int64())])
    parts = [schema.empty_table()]
    for s in srcs:
        for tar in _finished_shards(s.path, ".tar"):
            keys, offsets, sizes = cached_tar_index(tar)
            n = len(keys)
            parts.append(pa.table([pa.repeat(pa.scalar(s.name, pa.string()), n), pa.array(keys, pa.string()),
                                   pa.repeat(pa.scalar(tar, pa.string()), n), pa.array(offsets, pa.int64()),
                                   pa.array(sizes, pa.int64())], schema=schema))
    return pa.concat_tables(parts)


def _load_sources(con, srcs, tar_index, seed: int = 0) -> bool:
    """Temp tables ``img`` (one row per image, with its location in a source tar when it has one)
    and ``cap`` (captions, normalised, keyed by text_sha).
    ``tar_index``: a future of :func:`_index_tars`, running in a thread meanwhile (the DuckDB
    queries here release the GIL); it is waited for last. ``img.draw`` orders the dataset's samples
    (a hash of the seed and the image). Returns whether any caption has a box."""
    img_parts, cap_parts, status_parts, any_boxes = [], [], [], False
    for s in srcs:
        ipath, cpath = os.path.join(s.path, "images.parquet"), os.path.join(s.path, "captions.parquet")
        ip, cp = _sql_str(ipath), _sql_str(cpath)
        icols, ccols = _columns([ipath]), _columns([cpath])
        for need, cols, f in ((("image_key", "url"), icols, ipath), (("image_key", "caption_id", "caption"), ccols, cpath)):
            lacking = [c for c in need if c not in cols]
            if lacking:
                raise CCRKError(f"{f} lacks column(s) {', '.join(lacking)}")
        extra = ", ".join(f"CAST({c} AS BIGINT) AS {c}" if c in icols else f"NULL::BIGINT AS {c}"
                          for c in ("width", "height"))
        sid = "CAST(source_id AS VARCHAR)" if "source_id" in icols else "CAST(image_key AS VARCHAR)"
        img_parts.append(f"SELECT {_sql_str(s.name)} AS source, CAST(image_key AS VARCHAR) AS image_key, "
                         f"CAST(url AS VARCHAR) AS url, {sid} AS source_id, {extra} FROM read_parquet({ip})")
        any_boxes |= "x" in ccols
        boxes = ", ".join(f"CAST({c} AS DOUBLE) AS {c}" if c in ccols else f"NULL::DOUBLE AS {c}" for c in BOX_COLUMNS)
        cap_parts.append(f"SELECT {_sql_str(s.name)} AS source, CAST(image_key AS VARCHAR) AS image_key, "
                         f"CAST(caption_id AS VARCHAR) AS caption_id, CAST(caption AS VARCHAR) AS caption, {boxes} "
                         f"FROM read_parquet({cp})")
        files = _finished_shards(s.path, ".parquet")
        if files:
            status_parts.append(
                f"SELECT {_sql_str(s.name)} AS source, CAST(key AS VARCHAR) AS shard_key, CAST(image_key AS VARCHAR) AS image_key "
                f"FROM read_parquet([{', '.join(_sql_str(f) for f in files)}], union_by_name=true) WHERE status = 'success'")
    # text_sha of the normalised caption (the translation store's key; translation.normalize is the
    # one definition). Printable-ASCII captions -- nearly all -- are normalised here: NFC leaves them
    # as they are and their only whitespace is ' ', so the rule is "collapse runs of spaces, strip";
    # any other caption is normalised by translation.normalize below.
    con.execute(f"""
        CREATE TEMP TABLE cap AS
        SELECT *, CASE WHEN norm IS NOT NULL THEN sha256(norm) END AS text_sha
        FROM (SELECT *, CASE WHEN NOT regexp_full_match(caption, '[ -~]*') THEN NULL
                             WHEN contains(caption, '  ') OR starts_with(caption, ' ') OR ends_with(caption, ' ')
                             THEN trim(regexp_replace(caption, ' {{2,}}', ' ', 'g'), ' ') ELSE caption END AS norm
              FROM ({' UNION ALL '.join(cap_parts)}))""")
    texts = [r[0] for r in con.execute("SELECT DISTINCT caption FROM cap WHERE norm IS NULL AND caption IS NOT NULL").fetchall()]
    if texts:
        normalize = caption_normalizer()
        norm = [normalize(t) for t in texts]
        con.register("shas", pa.table({"caption": texts, "norm": norm, "text_sha": [text_sha(n) for n in norm]}))
        try:
            con.execute("UPDATE cap SET norm = s.norm, text_sha = s.text_sha FROM shas s WHERE cap.caption = s.caption")
        finally:
            con.unregister("shas")
    status_sql = " UNION ALL ".join(status_parts) or \
        "SELECT NULL::VARCHAR AS source, NULL::VARCHAR AS shard_key, NULL::VARCHAR AS image_key WHERE false"
    con.register("tar_index", tar_index.result())
    try:
        # One location per image: the first success in (tar, offset) order when downloaded twice;
        # one row per image (the first url when images.parquet repeats a key).
        con.execute(f"""
            CREATE TEMP TABLE img AS
            WITH loc AS (SELECT source, image_key, min({{'p': t.tar_path, 'o': t.offset, 's': t.size}}) AS l
                         FROM ({status_sql}) st JOIN tar_index t USING (source, shard_key)
                         GROUP BY source, image_key)
            SELECT r.*, loc.l.p AS tar_path, loc.l.o AS img_offset, loc.l.s AS img_size,
                   md5({_sql_str(str(seed))} || ':' || r.source || ':' || r.image_key) AS draw
            FROM (SELECT DISTINCT ON (source, image_key) * FROM ({' UNION ALL '.join(img_parts)})
                  ORDER BY source, image_key, url) r
            LEFT JOIN loc USING (source, image_key)""")
    finally:
        con.unregister("tar_index")
    return any_boxes and bool(con.execute("SELECT count(*) FROM cap WHERE x IS NOT NULL").fetchall()[0][0])


def _load_translations(con, tsets, langs, dedupe: bool = False) -> dict[str, str]:
    """Per target language of ``langs``, the SQL relation of its translations (text_sha, tgt_text,
    ok, the scores, set_rank) to join the captions with.

    A language with one translation set reads its parquet parts straight into the join (nothing is
    materialised): :func:`_assemble` checks that no caption found two translations there. A
    language with several sets -- or every language, with ``dedupe`` (a text translated twice in
    one set) -- goes through the temp table ``best``, which keeps one translation per text and
    language: an ok one first, then the preferred set, then a fixed tie-break."""
    score_types = {c: _score_type(c) for c in SCORE_COLUMNS}
    rels, best_parts = {}, []
    for lang in langs:
        if lang == SOURCE_LANG:
            continue
        parts = []
        for rank, t in enumerate(tsets.get(lang, [])):
            f = "[" + ", ".join(_sql_str(x) for x in t.files) + "]"
            cols = _columns(t.files)
            for need in ("text_sha", "tgt_text", "ok"):
                if need not in cols:
                    raise CCRKError(f"translation parts in {t.path} lack column {need}")
            scores = ", ".join(f"CAST({c} AS {ty}) AS {c}" if c in cols else f"NULL::{ty} AS {c}"
                               for c, ty in score_types.items())
            lang_filter = f"AND tgt_lang = {_sql_str(lang)}" if "tgt_lang" in cols else ""
            parts.append(f"SELECT CAST(text_sha AS VARCHAR) AS text_sha, {_sql_str(lang)} AS lang, "
                         f"CAST(tgt_text AS VARCHAR) AS tgt_text, coalesce(CAST(ok AS BOOLEAN), false) AS ok, "
                         f"{scores}, {rank} AS set_rank FROM read_parquet({f}, union_by_name=true) "
                         f"WHERE tgt_text IS NOT NULL {lang_filter}")
        if not parts:
            rels[lang] = ("(SELECT NULL::VARCHAR AS text_sha, NULL::VARCHAR AS tgt_text, NULL::BOOLEAN AS ok, "
                          + ", ".join(f"NULL::{ty} AS {c}" for c, ty in score_types.items())
                          + ", NULL::INTEGER AS set_rank WHERE false)")
        elif len(parts) == 1 and not dedupe:
            rels[lang] = f"({parts[0]})"
        else:
            best_parts += parts
            rels[lang] = f"(SELECT * EXCLUDE (lang) FROM best WHERE lang = {_sql_str(lang)})"
    if best_parts:
        con.execute(f"""
            CREATE OR REPLACE TEMP TABLE best AS
            SELECT * EXCLUDE (rn) FROM (
              SELECT *, row_number() OVER (PARTITION BY text_sha, lang
                                           ORDER BY (tgt_text IS NOT NULL AND ok) DESC, set_rank, tgt_text) AS rn
              FROM ({' UNION ALL '.join(best_parts)}) WHERE text_sha IN (SELECT text_sha FROM cap))
            WHERE rn = 1""")
    return rels


def _json_str_sql(expr: str) -> str:
    """SQL for the JSON string literal of ``expr`` (NULL stays NULL). DuckDB's ``to_json`` writes
    what ``json.dumps(..., ensure_ascii=False)`` writes except for the hex case of a few control
    character escapes; :func:`_exact_json` redoes the (rare) json holding any ``\\u00`` escape."""
    return f"CAST(to_json({expr}) AS VARCHAR)"


def _exact_json(meta: str) -> str:
    """Python's own formatting of a sample json built by SQL (same content, same sorted keys)."""
    return json.dumps(json.loads(meta), sort_keys=True, ensure_ascii=False, separators=(",", ":"))


_ESCAPE = re.compile(rb"\\u00")


def _escaped_rows(meta: pa.Array) -> np.ndarray:
    """The rows of the json strings ``meta`` holding a ``\\u00`` escape (rare): one regex scan of
    the whole data buffer first (memchr-fast, no copy), the row-by-row match only when it finds
    one (Arrow's per-row substring match costs ~8x more)."""
    data = meta.buffers()[2]
    if data is None or _ESCAPE.search(data) is None:
        return np.empty(0, dtype=np.int64)
    return np.flatnonzero(pc.match_substring(meta, "\\u00").to_numpy(zero_copy_only=False))


def _json_num_sql(expr: str) -> str:
    """SQL for a box coordinate as the old per-row code wrote it: integral values as integers,
    others as Python's float repr (which DuckDB's DOUBLE-to-text matches)."""
    return (f"CASE WHEN isnan({expr}) THEN 'NaN' WHEN isinf({expr}) THEN "
            f"(CASE WHEN {expr} > 0 THEN 'Infinity' ELSE '-Infinity' END) "
            f"WHEN {expr} = trunc({expr}) AND abs({expr}) < 1e18 THEN CAST(CAST({expr} AS BIGINT) AS VARCHAR) "
            f"ELSE CAST({expr} AS VARCHAR) END")


def _assemble(con, staging, tsets, langs, min_langs, drop_flagged, shard_size, boxes, lineage, on_plan=None,
              keep_draft=False, write_plan=True, on_total=None) -> tuple[int, tuple[str, str] | None]:
    """The language policy and drop counting as DuckDB queries over whole columns; each sample's
    json from per-caption SQL fragments joined per sample by Arrow (no per-row Python). Writes the
    plan, then the manifest's plan-determined tables."""
    from storage import manifest

    others = [lang for lang in langs if lang != SOURCE_LANG]
    has_en = SOURCE_LANG in langs
    need = len(langs) if min_langs is None else min_langs
    # Per caption and language i, columns of cj: miss{i} (no translation), flag{i} (removed as not
    # ok), keep{i} (kept) -- computed once, so that later queries stay small (planning a query costs
    # more than running it at small sizes).
    empty = "(norm IS NULL OR norm = '')"
    n_others = range(len(others))
    miss, flag, pres = [f"miss{i}" for i in n_others], [f"flag{i}" for i in n_others], [f"keep{i}" for i in n_others]
    miss_sql = ", ".join(f"(tx{i} IS NULL OR tx{i} = '') AS miss{i}" for i in n_others)
    flag_sql = ", ".join(f"(NOT miss{i} AND NOT ok{i} AND {str(bool(drop_flagged)).upper()}) AS flag{i}" for i in n_others)
    keep_sql = ", ".join(f"(NOT miss{i} AND NOT flag{i}) AS keep{i}" for i in n_others)
    n_present = " + ".join([str(int(has_en))] + [f"CAST({p} AS INTEGER)" for p in pres])
    any_flag = " OR ".join(flag) or "false"
    short = "'below_min_langs'" if min_langs is not None else \
        f"CASE WHEN {any_flag} THEN 'flagged_translation' ELSE 'missing_language' END"
    # ``cj``: one row per caption of a downloaded image, with its translations and why it is dropped
    # (NULL: kept) -- one join for the whole dataset.
    tx = "".join(f", t{i}.tgt_text AS tx{i}, coalesce(t{i}.ok, false) AS ok{i}, t{i}.set_rank AS set{i}"
                 + "".join(f", t{i}.{c} AS {c}{i}" for c in SCORE_COLUMNS) for i in range(len(others)))
    box_cols = "".join(f", c.{b}" for b in BOX_COLUMNS) if boxes else ""

    def make_cj(rels: dict[str, str]) -> bool:
        """Creates ``cj``; False when some caption found two translations into one language."""
        joins = " ".join(f"LEFT JOIN {rels[lang]} t{i} ON t{i}.text_sha = c.text_sha" for i, lang in enumerate(others))
        joined = f"""SELECT c.rowid AS cap_row, c.source, c.image_key, c.caption_id, c.norm, c.text_sha{box_cols}{tx}
                      FROM img i JOIN cap c ON c.source = i.source AND c.image_key = i.image_key {joins}
                      WHERE i.tar_path IS NOT NULL"""
        if others:
            joined = f"SELECT *, {keep_sql} FROM (SELECT *, {flag_sql} FROM (SELECT *, {miss_sql} FROM ({joined})))"
        con.execute(f"""
            CREATE OR REPLACE TEMP TABLE cj AS
            SELECT *, CASE WHEN {empty} THEN 'empty_caption' WHEN {n_present} < {need} THEN {short} END AS drop_reason
            FROM ({joined})""")
        return con.execute("SELECT count(*) = count(DISTINCT cap_row) FROM cj").fetchall()[0][0]

    if not make_cj(_load_translations(con, tsets, langs)):
        make_cj(_load_translations(con, tsets, langs, dedupe=True))

    counts = ["""SELECT 'image', 'no_image', NULL, count(*) FROM img WHERE tar_path IS NULL""",
              """SELECT 'image', 'no_captions', NULL, count(*) FROM img i WHERE tar_path IS NOT NULL
                 AND NOT EXISTS (SELECT 1 FROM cap c WHERE c.source = i.source AND c.image_key = i.image_key)""",
              """SELECT 'caption', 'no_image', NULL, count(*) FROM cap c WHERE NOT EXISTS
                 (SELECT 1 FROM img i WHERE i.source = c.source AND i.image_key = c.image_key AND i.tar_path IS NOT NULL)""",
              "SELECT 'caption', drop_reason, NULL, count(*) FROM cj WHERE drop_reason IS NOT NULL GROUP BY drop_reason"]
    for i, lang in enumerate(others):
        counts.append(f"SELECT 'translation', 'missing', {_sql_str(lang)}, "
                      f"count(*) FILTER (WHERE NOT {empty} AND {miss[i]}) FROM cj")
        counts.append(f"SELECT 'translation', 'flagged_translation', {_sql_str(lang)}, "
                      f"count(*) FILTER (WHERE NOT {empty} AND {flag[i]}) FROM cj")
    counts.append("SELECT 'image', 'all_captions_dropped', NULL, count(*) FROM "
                  "(SELECT 1 FROM cj GROUP BY source, image_key HAVING bool_and(drop_reason IS NOT NULL))")

    def count_drops() -> tuple[Counter, list[dict]]:
        drops: Counter = Counter()
        for unit, reason, lang, n in con.execute(" UNION ALL ".join(counts)).fetchall():
            if n:
                drops[(unit, reason, lang or "")] += n
        return drops, [{"unit": u, "reason": r, "lang": lang or None, "count": c}
                       for (u, r, lang), c in sorted(drops.items())]

    # Each kept caption's json fragments, in dataset order: samples by their seeded draw, a
    # sample's captions by caption id. Keys sorted as json.dumps(sort_keys=True) writes them: a
    # caption is an object of its kept languages; boxes (a list with null for captions without one)
    # only when the sample has any.
    present = {SOURCE_LANG: ("true", "norm")} if has_en else {}
    present.update({lang: (pres[i], f"tx{i}") for i, lang in enumerate(others)})
    cap_json = "'{' || concat_ws(',', " + ", ".join(
        f"CASE WHEN {p} THEN {_sql_str(json.dumps(lang, ensure_ascii=False) + ':')} || {_json_str_sql(t)} END"
        for lang, (p, t) in sorted(present.items())) + ") || '}'"
    box_json, box_present, box_order = "''", "false", ""
    if boxes:
        box_json = "CASE WHEN x IS NULL THEN 'null' ELSE '{' || concat_ws(',', " + ", ".join(
            f"CASE WHEN {c} IS NOT NULL THEN '\"{c}\":' || {_json_num_sql(c)} END" for c in sorted(BOX_COLUMNS)) \
            + ") || '}' END"
        box_present = "x IS NOT NULL"
        box_order = "".join(f", c.{b}" for b in BOX_COLUMNS)
    mask = " + ".join(f"CASE WHEN {present[lang][0]} THEN {1 << j} ELSE 0 END" for j, lang in enumerate(langs))
    # Sorted here (Arrow) rather than by DuckDB: sorting the wide rows costs more than the query.
    sort_cols = ["draw", "source", "image_key", "cid_len", "caption_id", "norm"] + (list(BOX_COLUMNS) if boxes else [])
    rows_sql = f"""
        SELECT c.rowid AS rid, c.source, c.image_key, i.url, i.source_id, i.tar_path, i.img_offset, i.img_size,
               {cap_json} AS cap_json, coalesce({_json_str_sql('c.caption_id')}, 'null') AS id_json,
               {box_json} AS box_json, {box_present} AS has_box, CAST({mask} AS INTEGER) AS mask,
               CASE WHEN i.height IS NOT NULL THEN ',"height":' || CAST(i.height AS VARCHAR) ELSE '' END
                 || ',"image_key":' || {_json_str_sql('i.image_key')}
                 || ',"source":' || {_json_str_sql('i.source')}
                 || ',"source_id":' || coalesce({_json_str_sql('i.source_id')}, 'null')
                 || ',"url":' || coalesce({_json_str_sql('i.url')}, 'null')
                 || CASE WHEN i.width IS NOT NULL THEN ',"width":' || CAST(i.width AS VARCHAR) ELSE '' END
                 || '}}' AS tail,
               i.draw,
               length(c.caption_id) AS cid_len, c.caption_id, c.norm{box_order}
        FROM cj c JOIN img i USING (source, image_key)
        WHERE c.drop_reason IS NULL"""

    # The kept captions' json fragments in dataset order, bucket by bucket: the samples are ordered
    # by their draw (an md5 in hex) first, so buckets of draw-prefix ranges, taken in turn, are that
    # order in pieces -- memory holds one bucket's rows, whatever the dataset's size (one bucket up
    # to PLAN_BUCKET_ROWS kept captions). Each bucket's samples are planned in chunks (1, 2, 4, ...
    # shards' worth of samples overall), each handed to ``on_plan`` (which may start writing the
    # shards it completes) before the next is made; what the manifest needs of them goes into
    # DuckDB temp tables (which spill to disk) bucket by bucket.
    # Kept captions and the samples they make (one count for the ramp and for on_total).
    n_kept, n_images = con.execute("SELECT coalesce(sum(n), 0), count(*) FROM (SELECT count(*) AS n FROM cj "
                                   "WHERE drop_reason IS NULL GROUP BY source, image_key)").fetchall()[0]
    # A ramp of buckets from about three shards' samples up: the first shards start being written
    # while the rest of the plan is still being queried.
    lead = 3 * int(shard_size) * n_kept // max(1, n_images)
    buckets = _draw_buckets(n_kept, plan_bucket_rows(), lead_rows=lead)
    if on_total is not None:
        on_total(n_images)
    plan_writer = _PlanWriter(os.path.join(staging, "plan.parquet")) if write_plan else None
    n, json_bytes, carry, next_cut, step, made = 0, 0, (-1, 0), int(shard_size), int(shard_size), set()
    try:
        for b, where in enumerate(buckets):
            last_bucket = b == len(buckets) - 1
            if b and hasattr(on_plan, "next_bucket"):
                on_plan.next_bucket()  # e.g. wait till the shards of the last bucket are mostly written
            rows = _arrow(con.sql(rows_sql + where))
            rows = rows.take(pc.sort_indices(rows, sort_keys=[(c, "ascending") for c in sort_cols]))  # nulls last
            starts = _sample_starts(rows)
            ends = []
            while next_cut - n < len(starts):
                ends.append(int(starts[next_cut - n]))
                next_cut += next_cut + step
            ends.append(rows.num_rows)
            samples_parts, kept_parts, lo, seen = [], [], 0, set()  # seen: the bucket's keys
            for hi in ends:
                last = last_bucket and hi == ends[-1]
                part = None
                if hi > lo:
                    part, kept_part = _plan_table(rows.slice(lo, hi - lo), langs, shard_size, n, seen)
                    members, carry = manifest.planned_members(part, carry)
                    samples_parts.append(_samples_part(part, members))
                    kept_parts.append(kept_part)
                    json_bytes += int(pc.sum(part.column("json_size")).as_py())
                    n += part.num_rows
                    if plan_writer is not None:
                        plan_writer.write(part)
                elif not last:
                    continue
                if on_plan is not None:
                    on_plan(os.path.dirname(staging), part, last)
                lo = hi
            del rows, part
            # What the manifest needs from Python goes into DuckDB now: from then on the manifest is
            # pure SQL (a DuckDB scan of an Arrow table needs the GIL, which the shard threads keep busy).
            for name, parts in (("plan_samples", samples_parts), ("kept_rows", kept_parts)):
                if parts:
                    _append_temp(con, name, pa.concat_tables(parts), made)
        if plan_writer is not None:
            plan_writer.close()
    finally:
        if plan_writer is not None:
            plan_writer.abort()
    if n == 0:
        drops, _ = count_drops()
        top = ", ".join(f"{r} ({u}): {c}" for (u, r, _), c in drops.most_common(4) if c)
        raise CCRKError(f"no samples left after the join and the language policy ({top or 'no inputs'})")
    if len(buckets) > 1:  # keys were checked within each bucket as it was planned
        dup = con.execute("SELECT key FROM plan_samples GROUP BY key HAVING count(*) > 1 LIMIT 1").fetchall()
        if dup:
            same = con.execute("SELECT source, image_key FROM plan_samples WHERE key = ? ORDER BY idx",
                               [dup[0][0]]).fetchall()
            raise CCRKError(f"two images map to the sample key {dup[0][0]!r} ({', '.join(f'source {s}, image_key {k!r}' for s, k in same)}): "
                            "image keys must be unique")
    _, drop_rows = count_drops()  # only the manifest needs them: counted while shards are written

    # The manifest's caption rows: one per kept caption, in (key, caption_index) order, with English (the normalised source text)
    # and each language's kept translation, its ok flag, set and scores (set where the language is kept).
    cols = [f"norm AS {_ident(f'text_{SOURCE_LANG}')}"] if has_en else []
    for i, lang in enumerate(others):
        for name, _ in manifest.caption_text_fields(True):
            src = {"text": f"tx{i}"}.get(name, f"{name}{i}")
            cols.append(f"CASE WHEN {pres[i]} THEN {src} END AS {_ident(f'{name}_{lang}')}")
    caption_texts_sql = (f"SELECT k.key, k.caption_index, c.caption_id, {', '.join(cols)} "
                         "FROM kept_rows k JOIN cj c ON c.rowid = k.rid ORDER BY k.key, k.caption_index")
    sets = sorted((lang, rank, t.model_id, t.decode_id) for lang, ts in tsets.items() for rank, t in enumerate(ts))
    # Drafted in memory when there is room (see manifest.scratch_draft_path): shards may be being
    # written meanwhile, by this process or by shard tasks.
    scratch = manifest.scratch_draft_path(2 * json_bytes)
    draft_path = scratch or os.path.join(staging, f".tmp-{os.getpid()}-{manifest.PARTIAL}")
    alias = manifest.open_draft(con, draft_path)
    try:
        manifest.write_plan_tables(con, alias, "SELECT * FROM plan_samples", caption_texts_sql, langs, sets,
                                   drop_rows, lineage["rows"], SOURCE_LANG)
        if keep_draft:
            con.execute(f"CHECKPOINT {alias}")  # written now, while shards are; closing it later is quick
            return n, (alias, draft_path)
    except BaseException:
        con.execute(f"DETACH {alias}")
        manifest.discard_draft(draft_path)
        raise
    con.execute(f"DETACH {alias}")
    try:  # no fsync: a lost staging file is planned again
        manifest.place_draft(draft_path, os.path.join(staging, manifest.PARTIAL), durable=False)
    except BaseException:
        manifest.discard_draft(draft_path)
        raise
    return n, None


PLAN_BUCKET_ROWS = 100_000  # kept captions per bucket of the plan (held in memory: about 3 KB each at 5 languages)


def plan_bucket_rows() -> int:
    """Kept captions per bucket of the plan: ``CCRK_PLAN_BUCKET_ROWS`` or :data:`PLAN_BUCKET_ROWS`."""
    value = os.environ.get("CCRK_PLAN_BUCKET_ROWS", "")
    try:
        return max(1, int(value)) if value else PLAN_BUCKET_ROWS
    except ValueError:
        raise CCRKError(f"CCRK_PLAN_BUCKET_ROWS={value!r} is not a whole number") from None


def _draw_buckets(n_rows: int, bucket_rows: int, lead_rows: int = 0, growth: int = 4) -> list[str]:
    """SQL conditions (to append to a WHERE) on the images' draw -- 32 hex digits of an md5 --
    cutting ``n_rows`` rows into ranges of about ``bucket_rows`` each, in draw order. Cuts fall on
    3-digit prefixes (4096 of them): an md5 spreads evenly over them.

    ``lead_rows``: first a ramp of small buckets -- about ``lead_rows`` rows, then ``growth`` times
    more each -- while a bucket is under ``bucket_rows`` and under half of the rows still to come.
    The plan's first shards wait only for the first bucket, and the shards of each bucket are
    being written while the next, larger one is queried."""
    n_rows, per = max(1, int(n_rows)), max(1, int(bucket_rows))
    rows = lambda p: p * n_rows // 4096  # noqa: E731 - about how many rows ``p`` prefixes hold
    cuts, at = [], 0
    p = max(1, 4096 * int(lead_rows) // n_rows) if lead_rows > 0 else 0
    while p and rows(p) < per and 2 * p < 4096 - at:
        at += p
        cuts.append(at)
        p *= growth
    k = max(1, min(4096 - at, -(-rows(4096 - at) // per)))
    cuts += [at + ((4096 - at) * j) // k for j in range(1, k)]
    hexes = [f"{c:03x}" for c in cuts]
    out = []
    for j in range(len(hexes) + 1):
        cond = ([f"i.draw >= '{hexes[j - 1]}'"] if j else []) + ([f"i.draw < '{hexes[j]}'"] if j < len(hexes) else [])
        out.append("".join(f" AND {c}" for c in cond))
    return out


class _PlanWriter:
    """``plan.parquet`` written chunk by chunk (under a temporary name, renamed on ``close``)."""

    def __init__(self, path: str):
        self.path, self.tmp, self.writer = path, _staging_tmp(path), None

    def write(self, part: pa.Table) -> None:
        if self.writer is None:
            self.writer = pq.ParquetWriter(self.tmp, part.schema)
        self.writer.write_table(part.cast(self.writer.schema))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
            os.replace(self.tmp, self.path)

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if os.path.exists(self.tmp):
            os.unlink(self.tmp)


def _samples_part(part: pa.Table, members: pa.Table) -> pa.Table:
    """The manifest's sample rows (:data:`storage.manifest.SAMPLE_COLUMNS`) of a chunk of the plan."""
    shard = part.column("shard").to_numpy()
    first = int(shard[0])
    names = pa.array([shard_name(s) for s in range(first, int(shard[-1]) + 1)]).take(pa.array(shard - first))
    samples = part.select(["idx", "key", "shard", "source", "image_key", "source_id", "url", "n_captions", "langs"])
    samples = samples.set_column(2, "shard", names)
    for c in ("jpg_offset", "jpg_size", "json_offset", "json_size"):
        samples = samples.append_column(c, members.column(c))
    return samples


def _append_temp(con, name: str, table: pa.Table, made: set) -> None:
    """Append ``table`` to the temp table ``name``, creating it first unless it is in ``made`` (updated)."""
    con.register(f"{name}_view", table)
    try:
        con.execute(f"INSERT INTO {name} SELECT * FROM {name}_view" if name in made
                    else f"CREATE TEMP TABLE {name} AS SELECT * FROM {name}_view")
        made.add(name)
    finally:
        con.unregister(f"{name}_view")


def _plan_table(rows: pa.Table, langs, shard_size: int, start: int = 0,
                seen: set | None = None) -> tuple[pa.Table, pa.Table]:
    """The plan (one row per sample, in dataset order, with its json; the first is sample
    ``start``) from the kept captions' rows in dataset order; and (rid, key, caption_index, sample)
    of every kept caption. ``seen``: the sample keys of earlier chunks (updated)."""
    n_rows = rows.num_rows
    starts = _sample_starts(rows)
    offsets = pa.array(np.append(starts, n_rows).astype(np.int32))
    first = pa.array(starts)

    # The json columns as one string type: large_string when they pass 2 GB (32-bit offsets).
    json_cols = ("box_json", "id_json", "cap_json", "tail")
    text = pa.large_string() if sum(rows.column(c).nbytes for c in json_cols) >= (1 << 31) - (1 << 24) else pa.string()
    lit = lambda v: pa.scalar(v, text)  # noqa: E731

    def joined(column: str) -> pa.Array:
        values = rows.column(column).cast(text).combine_chunks()
        return pc.binary_join(pa.ListArray.from_arrays(offsets, values), lit(","))

    n_caps = np.diff(np.append(starts, n_rows))
    mask = np.bitwise_and.reduceat(rows.column("mask").to_numpy(), starts)
    names = {m: ",".join(lang for j, lang in enumerate(langs) if m >> j & 1) for m in np.unique(mask).tolist()}
    has_box = np.logical_or.reduceat(rows.column("has_box").to_numpy(zero_copy_only=False), starts)
    boxes = pc.if_else(pa.array(has_box), pc.binary_join_element_wise(lit('"boxes":['), joined("box_json"), lit("],"),
                                                                        lit("")), lit(""))
    meta = pc.binary_join_element_wise(lit("{"), boxes, lit('"caption_ids":['), joined("id_json"),
                                       lit('],"captions":['), joined("cap_json"), lit("]"),
                                       rows.column("tail").cast(text).combine_chunks().take(first), lit(""))
    redo = _escaped_rows(meta)
    if len(redo):
        fixed = meta.to_pylist()
        for r in redo.tolist():
            fixed[r] = _exact_json(fixed[r])
        meta = pa.array(fixed, text)
    meta = meta.cast(pa.large_binary() if text == pa.large_string() else pa.binary())
    take = lambda c: _flat(rows.column(c)).take(first)  # noqa: E731
    image_keys = take("image_key")
    keys = safe_keys(image_keys.to_pylist())
    n = len(keys)
    seen = set() if seen is None else seen
    if len(set(keys)) != n or not seen.isdisjoint(keys):
        these: set[str] = set()
        for i, k in enumerate(keys):
            if k in these or k in seen:
                raise CCRKError(f"two images map to the sample key {k!r} (source {take('source')[i]}, image_key "
                                f"{image_keys[i]!r}): image keys must be unique")
            these.add(k)
    seen.update(keys)
    idx = np.arange(start, start + n, dtype=np.int64)
    key_arr = pa.array(keys, pa.string())
    plan = pa.table({
        "idx": idx, "shard": idx // int(shard_size), "key": key_arr, "source": take("source"), "image_key": image_keys,
        "source_id": take("source_id"), "url": take("url"), "tar_path": take("tar_path"),
        "img_offset": take("img_offset"), "img_size": take("img_size"), "n_captions": n_caps.astype(np.int64),
        "langs": pa.array([names[m] for m in mask.tolist()], pa.string()), "meta_json": meta,
        "json_size": pc.binary_length(meta).cast(pa.int64())})
    sample_of_row = pa.array(np.repeat(idx, n_caps))
    kept = pa.table({"rid": rows.column("rid"), "key": key_arr.take(pa.array(np.repeat(np.arange(n), n_caps))),
                     "caption_index": np.arange(n_rows, dtype=np.int64) - np.repeat(starts, n_caps),
                     "sample": sample_of_row})
    return plan, kept


def _sample_starts(rows: pa.Table) -> np.ndarray:
    """The first row of each sample in rows grouped by image (source, image_key)."""
    n_rows = rows.num_rows
    src, ik = _flat(rows.column("source")), _flat(rows.column("image_key"))
    new = np.ones(n_rows, dtype=bool)
    if n_rows > 1:
        new[1:] = pc.or_(pc.not_equal(src[1:], src[:-1]), pc.not_equal(ik[1:], ik[:-1])).to_numpy(zero_copy_only=False)
    return np.flatnonzero(new)


def _flat(column: pa.ChunkedArray) -> pa.Array:
    """One contiguous array; strings as large_string when they pass 2 GB (32-bit offsets)."""
    if pa.types.is_string(column.type) and column.nbytes >= (1 << 31) - (1 << 24):
        column = column.cast(pa.large_string())
    return column.combine_chunks()


def _arrow(rel) -> pa.Table:
    out = rel.arrow()
    return out if isinstance(out, pa.Table) else out.read_all()


def _staging_tmp(path: str) -> str:
    """The temporary name a staging file is written under before its rename."""
    return os.path.join(os.path.dirname(path), f".tmp-{os.getpid()}-{os.path.basename(path)}")


def _write_staging(path: str, write) -> None:
    """Write a staging file under a temporary name, then rename: a killed build never leaves a
    half-written one. No fsync -- staging only spares work on resume; a lost file is rebuilt."""
    tmp = _staging_tmp(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _write_staging_json(path: str, obj) -> None:
    data = json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False, default=str).encode("utf-8")

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(data)

    _write_staging(path, write)



# --------------------------------------------------------------------------- step 2: shards


def shard_groups(shard_ids, shards_per_task: int) -> list[list[int]]:
    """``shard_ids`` in groups of ``shards_per_task``: one task each."""
    ids = [int(s) for s in shard_ids]
    per = max(1, int(shards_per_task))
    return [ids[i:i + per] for i in range(0, len(ids), per)]


def write_shard_group(dataset_path: str, shard_ids, progress=None, threads: int | None = None,
                      plan: pa.Table | None = None) -> list[dict]:
    """Write the given shards from the plan (``plan``: ``plan.parquet`` already read); already
    written ones are skipped (resume).

    Shards are independent, so several are written at once (default: up to 8 threads): reads,
    writes, fsync and sha256 all release the GIL, and while one shard waits on its fsync another
    is being filled."""
    from concurrent.futures import ThreadPoolExecutor

    staging = os.path.join(dataset_path, STAGING)
    todo = [s for s in shard_ids if not os.path.exists(os.path.join(staging, f"{shard_name(s)}.index.json"))]
    out = [json.load(open(os.path.join(staging, f"{shard_name(s)}.index.json")))
           for s in shard_ids if s not in todo]
    if progress:
        for info in out:
            progress(info["n_samples"])
    if not todo:
        return out
    if plan is None:
        plan = pq.read_table(os.path.join(staging, "plan.parquet"), filters=[("shard", "in", todo)],
                             columns=["idx", "shard", "key", "tar_path", "img_offset", "img_size", "meta_json"])
        plan = plan.sort_by("idx")
    shard_col = plan.column("shard").to_numpy()
    bounds = {sid: (int(np.searchsorted(shard_col, sid, "left")), int(np.searchsorted(shard_col, sid, "right")))
              for sid in todo}

    def one(sid: int) -> dict:
        lo, hi = bounds[sid]
        rows = plan.slice(lo, hi - lo)
        record = _write_shard(dataset_path, sid, rows)
        if progress:
            progress(record["n_samples"])
        return record

    workers = max(1, min(len(todo), threads or 8))
    if workers == 1:
        out += [one(sid) for sid in todo]
    else:
        with ThreadPoolExecutor(workers) as pool:
            out += list(pool.map(one, todo))
    return sorted(out, key=lambda r: r["name"])


def _write_shard(dataset_path: str, sid: int, rows: pa.Table) -> dict:
    try:
        info = write_planned_shard(os.path.join(dataset_path, "shards", shard_name(sid)),
                                   rows.column("key").to_pylist(), rows.column("tar_path").to_pylist(),
                                   rows.column("img_offset").to_numpy(), rows.column("img_size").to_numpy(),
                                   rows.column("meta_json").to_pylist())
    except ValueError as exc:
        raise CCRKError(f"{shard_name(sid)}: {exc}; the source shards changed since the plan -- build again") from exc
    record = {"name": info.name, "n_samples": info.n_samples, "bytes": info.bytes, "sha256": info.sha256}
    # The index file marks the shard done (written after the shard's fsync and rename).
    _write_staging_json(os.path.join(dataset_path, STAGING, f"{info.name}.index.json"), record)
    return record


# --------------------------------------------------------------------------- step 3: manifest


def finalize_build(dataset_path: str, record_catalog: bool = True, root: str | None = None,
                   engine=None, pending=None, draft: tuple[str, str] | None = None) -> BuildResult:
    """Complete the manifest (shards, info), write sizes.json, the wids index and ``_COMPLETE``;
    record the catalog entry. ``pending``: a callable waiting for shards still being written.
    ``draft``: the plan's manifest draft still ATTACHed to ``engine`` (``plan_build(keep_draft=True)``);
    otherwise ``_build/manifest.partial.duckdb`` is completed."""
    with _duckdb(engine) as con:  # one instance for the manifest and the catalog
        return _finalize(dataset_path, record_catalog, root, con, pending, draft)


def _finalize(dataset_path: str, record_catalog: bool, root: str | None, con, pending,
              draft: tuple[str, str] | None) -> BuildResult:
    from storage.manifest import finish_draft, write_manifest

    staging = os.path.join(dataset_path, STAGING)
    lineage = json.load(open(os.path.join(staging, "lineage.json")))

    def shard_records() -> list[dict]:
        if pending is not None:
            pending()
        return [json.load(open(f)) for f in sorted(glob.glob(os.path.join(staging, "shard-*.tar.index.json")))]

    if draft is not None:
        s = finish_draft(con, draft[0], draft[1], dataset_path, shard_records, lineage)
    else:
        s = write_manifest(dataset_path, shard_records, lineage, engine=con)
    atomic.write_json(os.path.join(dataset_path, COMPLETE), {
        "name": lineage["name"], "version": lineage["version"], "n_samples": s["n_samples"],
        "n_shards": s["n_shards"]})
    shutil.rmtree(staging, ignore_errors=True)
    if record_catalog:
        Catalog(root, con).record(Artifact(
            version=lineage["version"], kind="dataset", name=lineage["name"], path=dataset_path,
            params=lineage["params"], parents=lineage["parents"],
            stats={"n_samples": s["n_samples"], "n_shards": s["n_shards"], "bytes": s["bytes"],
                   "captions_by_lang": s["captions_by_lang"],
                   "sources": {x["name"]: x["version"] for x in lineage["sources"]}}))
    return _result(dataset_path, lineage["name"], lineage["version"], False, s,
                   f"built dataset {lineage['name']} {lineage['version']}: {s['n_samples']} samples in "
                   f"{s['n_shards']} shards")


def _result(path, name, version, skipped, s, message) -> BuildResult:
    return BuildResult(name=name, version=version, path=path, skipped=skipped, n_samples=s["n_samples"],
                       n_shards=s["n_shards"], bytes=s["bytes"], captions_by_lang=s["captions_by_lang"],
                       drops=s["drops"], message=message)


def skipped_result(plan: BuildPlan) -> BuildResult:
    from storage.manifest import summary

    return _result(plan.path, plan.name, plan.version, True, summary(plan.path), plan.message)


class _ShardStarter:
    """``on_plan`` for :func:`build_dataset`: each shard is submitted to ``pool`` as soon as the plan
    has all its samples (futures appended to ``writing``).

    A queued shard holds its rows (the samples' json). Within a bucket of the plan every shard is
    queued at once, so that the planner goes on -- to the next chunk, and after the last one to the
    drop counts and the manifest draft -- while the shards are written; before the next bucket it
    waits until at most ``backlog`` shards are queued, so a plan faster than the disk holds about
    one bucket's shards in memory, whatever the dataset's size."""

    def __init__(self, pool, writing: list, shard_size: int, progress=None, backlog: int = 16, write=None):
        import threading

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
    from concurrent.futures import ThreadPoolExecutor

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
            from storage.manifest import discard_draft

            discard_draft(plan.draft[1])
        engine.close()
