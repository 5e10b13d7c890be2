"""Resolve a build: check its parameters, find its inputs (source versions, translation sets),
derive its version, and open its ``_build/`` staging directory with ``lineage.json``."""
from __future__ import annotations

import glob
import json
import os
from dataclasses import asdict, dataclass, field

from storage import layout
from storage.build_staging import COMPLETE, MANIFEST, STAGING, duckdb_cursor, write_staging_json
from storage.catalog import Catalog
from storage.errors import CCRKError
from storage.exclusion import EXCLUSION_FILE, read_exclusion_list
from storage.languages import SOURCE_LANG, parse_langs
from storage.specs import MATCH_KINDS, BuildSpec, build_spec
from storage.verify import verify_dataset
from storage.versioning import CODE_VERSION, content_version, files_sha256


@dataclass
class SourceInput:
    name: str
    version: str
    path: str
    recorded: bool  # in the catalog (then it is a parent of the dataset)


@dataclass
class ExclusionInput:
    """An exclusion list a build reads (:mod:`storage.exclusion`)."""
    path: str                 # the parquet file
    content_id: str           # sha256 of its bytes (16 hex digits): what the dataset version holds
    benchmarks: list[str]
    artifact_versions: list[str] = field(default_factory=list)  # recorded exclusion artifacts holding it


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
    for f in sorted(glob.glob(os.path.join(glob.escape(base), "**", "part-*.parquet"), recursive=True)):
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


def resolve_exclusions(root: str, entries, engine=None) -> list[ExclusionInput]:
    """Each ``build.exclude`` entry's exclusion list: a parquet file, a folder holding
    ``exclusion.parquet``, or the version of a recorded ``exclusion`` artifact. Benchmark entries
    must have been made into lists first (the ccrk layer does: ``flows.build``)."""
    cat = Catalog(root, engine)
    recorded = cat.list("exclusion")
    out: dict[str, ExclusionInput] = {}
    for entry in entries or ():
        if not isinstance(entry, str):
            raise CCRKError(f"build.exclude: benchmark {entry.benchmark}: make its exclusion list first "
                            "(ccrk build and ccrk reproduce do; the build reads exclusion lists only)")
        if entry == "protocol":
            raise CCRKError("build.exclude: 'protocol' means the benchmarks of a reproduce config's protocol "
                            "section; ccrk build takes exclusion lists or --exclude-benchmark")
        path = entry if os.path.isfile(entry) else os.path.join(entry, EXCLUSION_FILE)
        if not os.path.isfile(path):
            art = cat.find(entry) if entry and "/" not in entry else None
            if art is None or art.kind != "exclusion":
                raise CCRKError(f"build.exclude {entry!r}: no exclusion list there (a parquet file, a folder "
                                f"holding {EXCLUSION_FILE}, or an exclusion artifact's version)")
            path = os.path.join(art.path, EXCLUSION_FILE)
        path = os.path.abspath(path)
        table = read_exclusion_list(path)
        content_id = files_sha256([path], cached=True)[:16]
        if content_id in out:
            continue  # the same list twice
        versions = sorted(a.version for a in recorded if _same_or_parent(a.path, path))
        out[content_id] = ExclusionInput(path, content_id, sorted(set(table.column("benchmark").to_pylist())),
                                         versions)
    return sorted(out.values(), key=lambda e: e.content_id)


def policy_params(langs, min_langs, drop_flagged, shard_size, seed, exclusions=(), exclude_kinds=(),
                  exclude_phash_distance=None) -> dict:
    """The parameters the dataset's version and its policy are derived from; those of the benchmark
    exclusion only when it has lists (a build without one keeps the version it had before)."""
    params = {"langs": list(langs), "min_langs": min_langs if min_langs is not None else "all",
              "drop_flagged": bool(drop_flagged), "shard_size": int(shard_size), "seed": int(seed)}
    if exclusions:
        params["exclude"] = sorted(e.content_id for e in exclusions)
        params["exclude_kinds"] = [k for k in MATCH_KINDS if k in set(exclude_kinds)]
        if "phash" in params["exclude_kinds"]:
            params["exclude_phash_distance"] = int(exclude_phash_distance)
    return params


def dataset_version(sources: list[SourceInput], tsets: dict[str, list[TranslationSet]], params: dict) -> str:
    parents = [f"source:{s.name}:{s.version}" for s in sources]
    # A language with several translation sets: their order of preference decides which
    # translation a caption gets, so it is part of the version (one set: nothing to order).
    parents += [f"translation:{t.set_id}/{t.lang}:{t.content_id}" + (f"#{rank}" if len(ts) > 1 else "")
                for ts in tsets.values() for rank, t in enumerate(ts)]
    return content_version("dataset", parents, params, CODE_VERSION)


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
    version is already built (every shard present at its recorded size). The lineage is there in
    both cases: the catalog entry of a dataset built but never recorded comes from it."""
    plan: BuildPlan
    srcs: list[SourceInput] = field(default_factory=list)
    tsets: dict[str, list[TranslationSet]] = field(default_factory=dict)
    exclusions: list[ExclusionInput] = field(default_factory=list)
    lineage: dict = field(default_factory=dict)  # its "params" hold the policy (policy_params)


def is_complete(dataset_path: str) -> bool:
    return os.path.exists(os.path.join(dataset_path, COMPLETE)) and os.path.exists(os.path.join(dataset_path, MANIFEST))


def resolve_build(root=None, spec: BuildSpec | dict | None = None, engine=None, **fields) -> ResolvedBuild:
    """Check the parameters, resolve the inputs (source versions, translation sets) and derive the
    version. Unless that version is already built (``plan.skipped``: every shard present at its
    recorded size), makes its ``_build/`` staging directory with ``lineage.json``. ``spec`` and
    ``fields``: as for :func:`storage.specs.build_spec`; ``engine``: as for :func:`plan_build`."""
    spec = build_spec(spec, **fields)
    root = layout.data_root(root)
    name, langs, sources = spec.name, parse_langs(",".join(spec.langs)), tuple(spec.sources)
    min_langs, drop_flagged, shard_size, seed = spec.min_langs, spec.drop_flagged, spec.shard_size, spec.seed
    source_versions, translations = spec.source_versions, spec.translations
    if not langs:
        raise CCRKError("--langs is empty")
    if min_langs is not None and not 1 <= min_langs <= len(langs):
        raise CCRKError(f"--min-langs {min_langs} must be between 1 and the {len(langs)} requested languages")
    if shard_size < 1:
        raise CCRKError(f"--shard-size {shard_size} must be positive")
    if not spec.exclude_kinds and spec.exclude:
        raise CCRKError("--exclude-kinds is empty: name at least one of " + ", ".join(MATCH_KINDS))
    with duckdb_cursor(engine) as con:
        srcs = resolve_sources(root, sources, source_versions, con)
        tsets = discover_translations(root, langs, translations, con)
        exclusions = resolve_exclusions(root, spec.exclude, con)
    if min_langs is None:
        lacking = [lang for lang in langs if lang != SOURCE_LANG and lang not in tsets]
        if lacking:
            raise CCRKError(f"no translations for {','.join(lacking)} under {layout.join(root, 'translations')}: "
                            "translate or import them first, or relax the policy with --min-langs")
    params = policy_params(langs, min_langs, drop_flagged, shard_size, seed, exclusions, spec.exclude_kinds,
                           spec.exclude_phash_distance)
    version = dataset_version(srcs, tsets, params)
    path = layout.dataset_dir(root, name, version)
    lineage = {"name": name, "version": version, "params": params,
               "rows": _lineage_rows(name, version, srcs, tsets, params, exclusions, root),
               "parents": sorted({s.version for s in srcs if s.recorded}
                                 | {v for ts in tsets.values() for t in ts for v in t.artifact_versions}
                                 | {v for e in exclusions for v in e.artifact_versions}),
               "sources": [asdict(s) for s in srcs]}
    if is_complete(path):
        # Every shard present at its recorded size (no shard is read: at CC3M's scale hashing them
        # all would take minutes; `ccrk verify` re-reads them).
        report = verify_dataset(path, deep=False, contents=False)
        if report.ok:
            return ResolvedBuild(BuildPlan(root, name, version, path, True, report.n_samples, report.n_shards,
                                           f"dataset {name} {version} is already built (every shard present at "
                                           "its recorded size; `ccrk verify` re-reads them): nothing to do"),
                                 srcs, tsets, exclusions, lineage)
        # A damaged build: forget it was complete and write it again (same bytes).
        for f in (COMPLETE, MANIFEST):
            if os.path.exists(os.path.join(path, f)):
                os.unlink(os.path.join(path, f))
    staging = os.path.join(path, STAGING)
    os.makedirs(staging, exist_ok=True)
    write_staging_json(os.path.join(staging, "lineage.json"), lineage)
    return ResolvedBuild(BuildPlan(root, name, version, path, False), srcs, tsets, exclusions, lineage)

def _lineage_rows(name, version, srcs, tsets, params, exclusions=(), root: str = "") -> list[list[str]]:
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
    for e in exclusions:
        rows.append(["exclusion", ",".join(e.benchmarks), f"content={e.content_id} path={layout.rooted(root, e.path)}"
                     + "".join(f" artifact={v}" for v in e.artifact_versions)])
    for k, v in sorted(params.items()):
        rows.append(["param", k, json.dumps(v)])
    return rows
