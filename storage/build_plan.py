"""Plan a build: load the sources (images, captions, where each image lies in its tar) and the
translations into DuckDB, then hand over to :mod:`storage.build_assemble` for the samples."""
from __future__ import annotations

import glob
import os
from concurrent.futures import ThreadPoolExecutor

import duckdb
import pyarrow as pa

from storage.build_assemble import assemble
from storage.build_parts import PartWriter
from storage.build_policy import join_captions
from storage.build_resolve import BuildPlan, ResolvedBuild, resolve_build
from storage.build_staging import BOX_COLUMNS, STAGING, duckdb_cursor, parquet_columns
from storage.errors import CCRKError
from storage.exclusion import (KIND_OF, KINDS, SCHEMA, SourceImages, load_identities, match_exclusions,
                               overlap_counts, read_exclusion_list)
from storage.manifest import sql_str as _sql_str
from storage.shards import index_source_tar
from storage.sidecar import cached_beside
from storage.specs import BuildSpec, build_spec
from storage.versioning import normalize, text_sha


def plan_build(root=None, spec: BuildSpec | dict | None = None, engine=None, on_plan=None, keep_draft: bool = False,
               **fields) -> BuildPlan:
    """Resolve inputs, derive the version, and (unless already built) plan the samples: writes
    ``_build/plan.parquet`` (what the shard tasks read), ``_build/lineage.json`` and the manifest's
    plan-determined tables (``_build/manifest.partial.duckdb``, completed by :func:`finalize_build`).

    ``engine``: a DuckDB connection whose instance the plan's queries may use. ``on_plan``: called
    with the dataset path, each chunk of the plan in dataset order (an Arrow table, rows as in
    ``plan.parquet``; None for a chunk without samples) and whether it is the last, as soon as the
    chunk is planned (e.g. to start writing the shards it completes); its ``next_bucket()``, if it
    has one, is called before each bucket of the plan but the first (see :mod:`storage.build_assemble`) -- the
    place to wait when the shards fall behind, so that memory holds about one bucket.
    ``keep_draft`` (with ``engine``): leave the manifest draft ATTACHed to ``engine`` for
    :func:`finalize_build` to complete (``BuildPlan.draft``) and skip ``plan.parquet`` -- for one
    process running every step (:func:`build_dataset`); a re-run plans again anyway. ``memory``:
    DuckDB's limit while planning (:func:`plan_memory_limit`)."""
    spec = build_spec(spec, **fields)
    resolved = resolve_build(root, spec, engine)
    if resolved.plan.skipped:
        return resolved.plan
    return plan_resolved(resolved, engine, on_plan, keep_draft, memory=spec.memory)


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
        on_plan = PartWriter(parts_dir, shard_size, on_plan)
    keep_draft = keep_draft and engine is not None
    n_samples, draft = _plan(staging, r.srcs, r.tsets, params["langs"], min_langs, params["drop_flagged"], shard_size,
                             params["seed"], r.lineage, engine, on_plan, keep_draft,
                             write_plan=parts_dir is None and not keep_draft, on_total=on_total, memory=memory,
                             exclusions=r.exclusions)
    n_shards = -(-n_samples // shard_size)
    return BuildPlan(p.root, p.name, p.version, p.path, False, n_samples, n_shards,
                     f"planned {n_samples} samples in {n_shards} shards", draft)


def _plan(staging, srcs, tsets, langs, min_langs, drop_flagged, shard_size, seed, lineage, engine=None,
          on_plan=None, keep_draft=False, write_plan=True, on_total=None,
          memory: str | None = None, exclusions=()) -> tuple[int, tuple[str, str] | None]:
    # The plan's temp tables vanish with its connection.
    pool = ThreadPoolExecutor(1)
    try:
        with duckdb_cursor(engine) as con:
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
            exclude_benchmark_images(con, srcs, exclusions, lineage["params"])
            join_captions(con, tsets, langs, min_langs, drop_flagged, boxes)
            return assemble(con, staging, tsets, langs, shard_size, boxes, lineage, on_plan, keep_draft, write_plan,
                            on_total)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def exclude_benchmark_images(con, srcs, exclusions, params: dict) -> None:
    """The benchmark exclusion (:mod:`storage.exclusion`), between loading the sources and the join:
    the temp tables ``excluded`` (each excluded image once per benchmark, with the kind of match),
    ``excluded_images`` (source, image_key, url, n_captions) and ``overlap_counts`` (benchmark, kind,
    n_images); the excluded images and their captions leave ``img`` and ``cap``. Without
    exclusion lists the three tables are empty and nothing is read."""
    lists = pa.concat_tables([SCHEMA.empty_table()] + [read_exclusion_list(e.path) for e in exclusions])
    kinds = params.get("exclude_kinds", [])
    if lists.num_rows:
        listed = set(lists.column("kind").to_pylist())
        wanted = {k for k in KINDS if KIND_OF[k] in kinds and k in listed}
        sources = [SourceImages(s.name, os.path.join(s.path, "images.parquet"), _finished_shards(s.path, ".parquet"),
                                _finished_shards(s.path, ".tar")) for s in srcs]
        load_identities(con, sources, wanted)
        match_exclusions(con, lists, kinds, params.get("exclude_phash_distance", 0))
    else:
        con.execute("CREATE OR REPLACE TEMP TABLE excluded AS SELECT NULL::VARCHAR AS source, NULL::VARCHAR AS "
                    "image_key, NULL::VARCHAR AS benchmark, NULL::VARCHAR AS split, NULL::VARCHAR AS kind, "
                    "NULL::VARCHAR AS value WHERE false")
    con.register("overlap_view", overlap_counts(con, lists, kinds))
    try:
        con.execute("CREATE OR REPLACE TEMP TABLE overlap_counts AS SELECT * FROM overlap_view")
    finally:
        con.unregister("overlap_view")
    con.execute("""CREATE OR REPLACE TEMP TABLE excluded_images AS
                   SELECT e.source, e.image_key, i.url, count(c.image_key) AS n_captions
                   FROM (SELECT DISTINCT source, image_key FROM excluded) e
                   JOIN img i ON i.source = e.source AND i.image_key = e.image_key
                   LEFT JOIN cap c ON c.source = e.source AND c.image_key = e.image_key GROUP BY ALL""")
    if con.execute("SELECT count(*) FROM excluded_images").fetchall()[0][0]:
        for table in ("cap", "img"):
            con.execute(f"""DELETE FROM {table} t WHERE EXISTS (SELECT 1 FROM excluded_images e
                            WHERE e.source = t.source AND e.image_key = t.image_key)""")


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
    for f in sorted(glob.glob(os.path.join(glob.escape(source_path), "shards", f"*{ext}"))):
        if os.path.exists(f[: -len(ext)] + "_stats.json"):
            out.append(f)
    return out


TAR_INDEX_CACHE = 2  # the format of the cached tar indexes (bump to ignore old caches)


def cached_tar_index(tar: str) -> tuple[list[str], list[int], list[int]]:
    """:func:`storage.shards.index_source_tar` of a finished source tar as (keys, data offsets,
    sizes), cached beside it in ``.<name>.index.json`` (:func:`storage.sidecar.cached_beside`:
    used only while the tar is the very file it was made from). Acquisition never rewrites a tar
    once its ``_stats.json`` exists, so a build after the first reads headers no more."""
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
        icols, ccols = parquet_columns([ipath]), parquet_columns([cpath])
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
    # text_sha of the normalised caption (the translation store's key; storage.versioning.normalize is
    # the one definition). Printable-ASCII captions -- nearly all -- are normalised here: NFC leaves
    # them as they are and their only whitespace is ' ', so the rule is "collapse runs of spaces,
    # strip"; any other caption is normalised by storage.versioning.normalize below.
    con.execute(f"""
        CREATE TEMP TABLE cap AS
        SELECT *, CASE WHEN norm IS NOT NULL THEN sha256(norm) END AS text_sha
        FROM (SELECT *, CASE WHEN NOT regexp_full_match(caption, '[ -~]*') THEN NULL
                             WHEN contains(caption, '  ') OR starts_with(caption, ' ') OR ends_with(caption, ' ')
                             THEN trim(regexp_replace(caption, ' {{2,}}', ' ', 'g'), ' ') ELSE caption END AS norm
              FROM ({' UNION ALL '.join(cap_parts)}))""")
    texts = [r[0] for r in con.execute("SELECT DISTINCT caption FROM cap WHERE norm IS NULL AND caption IS NOT NULL").fetchall()]
    if texts:
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
