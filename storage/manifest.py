"""A dataset version's manifest: ``manifest.duckdb`` plus ``shards/sizes.json`` and the wids index.

Tables in ``manifest.duckdb``:
- ``info``      (name, version, n_samples, n_shards, bytes, code_version) -- one row
- ``samples``   (idx, key, shard, source, image_key, source_id, url, n_captions, langs,
                 jpg_offset, jpg_size, json_offset, json_size) -- offsets let readers seek a sample
- ``shards``    (name, n_samples, bytes, sha256)
- ``captions``  (key, caption_index, caption_id, lang, text, model_id, decode_id, scores..., ok) -- a
                 view: one row per caption and language, ordered by (key, caption_index, lang), over
- ``caption_texts`` (key, caption_index, caption_id, then per language L: ``text_L`` and, translated,
                 ``ok_L``, ``set_L`` and the score columns ``<score>_L``) -- one row per caption, as
                 the build has them (five rows' worth of values written once, unsorted by language)
- ``translation_sets`` (lang, set_rank, model_id, decode_id) -- what ``set_L`` points at
- ``lang_counts`` (lang, captions, samples)
- ``drops``     (unit, reason, lang, count) -- every dropped image / caption / translation
- ``benchmark_overlap`` (benchmark, kind, n_images) -- per excluded benchmark and kind of match, the
                 images kept out of the dataset (storage.exclusion; each image once per benchmark)
- ``benchmark_overlap_images`` (source, image_key, url, benchmark, split, kind, value) -- which ones,
                 and the benchmark's value each matched
- ``lineage``   (kind, name, value) -- source versions, translation model/decode ids, policy, code
``sizes.json`` (``{shard: n_samples}``, as open_clip reads it) and ``wids-index.json`` (wids
``shardlist`` format) sit beside the shards.

A manifest is input too (a dataset may come from elsewhere): the shard names it gives are opened
below ``shards/``, so :func:`shard_records` and :func:`sample_index` refuse a manifest naming one
that is no plain file name there (``/etc/passwd``, ``../x``, ``/dev/zero``), and :func:`summary`
one whose languages are no language codes (they become file names on export).
"""
from __future__ import annotations

import os
import shutil

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from storage import atomic
from storage.errors import CCRKError, shown
from storage.languages import SOURCE_LANG, check_lang
from storage.layout import is_plain_name
from storage.shards import BLOCK, RECORD, shard_layout
from storage.versioning import CODE_VERSION

MANIFEST = "manifest.duckdb"


def manifest_path(dataset_path: str) -> str:
    return os.path.join(dataset_path, MANIFEST)


PARTIAL = "manifest.partial.duckdb"  # in the staging dir: the tables the plan alone determines
SCORE_COLUMNS = ("uniformity", "copy_sim", "len_ratio", "script_ok", "empty", "truncated")
SAMPLE_COLUMNS = ("idx", "key", "shard", "source", "image_key", "source_id", "url", "n_captions", "langs",
                  "jpg_offset", "jpg_size", "json_offset", "json_size")


def open_draft(con, path: str) -> str:
    """ATTACH a new manifest database file at ``path`` (removed first if a killed build left it) to
    ``con``'s DuckDB instance; returns its alias. Tables go in with :func:`write_plan_tables` and
    :func:`finish_draft`."""
    for stale in (path, path + ".wal"):
        if os.path.exists(stale):
            os.unlink(stale)
    alias = "manifest_" + os.urandom(6).hex()
    con.execute(f"ATTACH {sql_str(path)} AS {alias}")
    return alias


def score_type(column: str) -> str:
    return "BOOLEAN" if column in ("script_ok", "empty", "truncated") else "DOUBLE"


def caption_text_fields(translated: bool) -> list[tuple[str, str]]:
    """The ``caption_texts`` fields of one language, (field, SQL type); language L's column of
    field F is ``F_L``. English has its text only; a translation also its ok flag, set and scores."""
    fields = [("text", "VARCHAR")]
    if translated:
        fields += [("ok", "BOOLEAN"), ("set", "INTEGER")] + [(c, score_type(c)) for c in SCORE_COLUMNS]
    return fields


def sql_ident(name: str) -> str:
    """``name`` as a quoted SQL identifier."""
    return '"' + name.replace('"', '""') + '"'


def sql_str(value) -> str:
    """``value`` as a SQL string literal."""
    return "'" + str(value).replace("'", "''") + "'"


def captions_view_sql(langs, source_lang: str = SOURCE_LANG) -> str:
    """The ``captions`` view over ``caption_texts``: a caption's row for language L exists where
    ``text_L`` is set. Unqualified names bind in the view's own database (however it is attached)."""
    parts = []
    for lang in sorted(langs):
        text = sql_ident(f"text_{lang}")
        if lang == source_lang:
            scores = ", ".join(f"NULL::{score_type(c)} AS {c}" for c in SCORE_COLUMNS)
            parts.append(f"SELECT key, caption_index, caption_id, {sql_str(lang)} AS lang, {text} AS text, "
                         f"'source' AS model_id, NULL::VARCHAR AS decode_id, {scores}, true AS ok "
                         f"FROM caption_texts WHERE {text} IS NOT NULL")
        else:
            scores = ", ".join(f"c.{sql_ident(f'{x}_{lang}')} AS {x}" for x in SCORE_COLUMNS)
            parts.append(f"SELECT c.key, c.caption_index, c.caption_id, {sql_str(lang)} AS lang, c.{text} AS text, "
                         f"s.model_id, s.decode_id, {scores}, c.{sql_ident(f'ok_{lang}')} AS ok "
                         f"FROM caption_texts c LEFT JOIN translation_sets s ON s.lang = {sql_str(lang)} "
                         f"AND s.set_rank = c.{sql_ident(f'set_{lang}')} WHERE c.{text} IS NOT NULL")
    return f"SELECT * FROM ({' UNION ALL '.join(parts)}) ORDER BY key, caption_index, lang"


OVERLAP_COLUMNS = "benchmark VARCHAR, kind VARCHAR, n_images BIGINT"
OVERLAP_IMAGE_COLUMNS = ("source VARCHAR, image_key VARCHAR, url VARCHAR, benchmark VARCHAR, split VARCHAR, "
                         "kind VARCHAR, value VARCHAR")


def write_plan_tables(con, alias: str, samples_sql: str, caption_texts_sql: str, langs, sets: list[tuple],
                      drops: list[dict], lineage_rows: list, source_lang: str = SOURCE_LANG,
                      overlap_sql: str | None = None, overlap_images_sql: str | None = None) -> None:
    """The manifest tables that need no shard result: ``samples`` (from ``samples_sql``: the
    :data:`SAMPLE_COLUMNS`, in dataset order), ``caption_texts`` (from ``caption_texts_sql``: key,
    caption_index, caption_id and each language's :func:`caption_text_fields`, in (key,
    caption_index) order), ``translation_sets`` (``sets``: (lang, set_rank, model_id, decode_id)
    rows), the ``captions`` view, ``lang_counts``, ``drops``, ``lineage`` and the benchmark
    exclusion's ``benchmark_overlap`` / ``benchmark_overlap_images`` (from ``overlap_sql`` /
    ``overlap_images_sql``, in that order of columns; None: empty). The queries may read ``con``'s
    temp tables.

    Captions are stored one row per caption rather than per caption and language: the build has
    them that way, and writing (and compressing) five times the rows, sorted by language, cost more
    than the rest of the manifest together; the ``captions`` view gives the per-language rows."""
    drop_table = pa.table({"unit": pa.array([d["unit"] for d in drops], pa.string()),
                           "reason": pa.array([d["reason"] for d in drops], pa.string()),
                           "lang": pa.array([d["lang"] for d in drops], pa.string()),
                           "count": pa.array([d["count"] for d in drops], pa.int64())})
    lineage_table = pa.table({"kind": pa.array([r[0] for r in lineage_rows], pa.string()),
                              "name": pa.array([r[1] for r in lineage_rows], pa.string()),
                              "value": pa.array([r[2] for r in lineage_rows], pa.string())})
    set_table = pa.table({"lang": pa.array([r[0] for r in sets], pa.string()),
                          "set_rank": pa.array([r[1] for r in sets], pa.int32()),
                          "model_id": pa.array([r[2] for r in sets], pa.string()),
                          "decode_id": pa.array([r[3] for r in sets], pa.string())})
    views = {"draft_drops": drop_table, "draft_lineage": lineage_table, "draft_sets": set_table}
    for name, table in views.items():
        con.register(name, table)
    try:
        con.execute(f"CREATE TABLE {alias}.samples AS SELECT {', '.join(SAMPLE_COLUMNS)} FROM ({samples_sql})")
        con.execute(f"CREATE TABLE {alias}.caption_texts AS {caption_texts_sql}")
        con.execute(f"CREATE TABLE {alias}.translation_sets AS SELECT * FROM draft_sets ORDER BY lang, set_rank")
        con.execute(f"CREATE VIEW {alias}.captions AS {captions_view_sql(langs, source_lang)}")
        con.execute(f"CREATE TABLE {alias}.drops AS SELECT * FROM draft_drops ORDER BY unit, reason, lang")
        con.execute(f"CREATE TABLE {alias}.lineage AS SELECT * FROM draft_lineage")
        for table, columns, sql in (("benchmark_overlap", OVERLAP_COLUMNS, overlap_sql),
                                    ("benchmark_overlap_images", OVERLAP_IMAGE_COLUMNS, overlap_images_sql)):
            con.execute(f"CREATE TABLE {alias}.{table} ({columns})")
            if sql:
                con.execute(f"INSERT INTO {alias}.{table} {sql}")
        counts = " UNION ALL ".join(
            f"SELECT {sql_str(lang)} AS lang, count({sql_ident(f'text_{lang}')}) AS captions, "
            f"count(DISTINCT key) FILTER (WHERE {sql_ident(f'text_{lang}')} IS NOT NULL) AS samples "
            f"FROM {alias}.caption_texts" for lang in sorted(langs))
        con.execute(f"CREATE TABLE {alias}.lang_counts AS SELECT * FROM ({counts}) WHERE captions > 0 ORDER BY lang")
    finally:
        for name in views:
            con.unregister(name)


def finish_draft(con, alias: str, path: str, dataset_path: str, shards, lineage: dict,
                 check_layout: bool = True) -> dict:
    """Add ``shards`` and ``info`` to the attached draft, write sizes.json and the wids index, close
    the draft (checkpoint, fsync) and rename it to ``manifest.duckdb``; returns the :func:`summary`.
    ``shards``: the shard records, or a callable returning them (called here, last: shards may
    still be being written till then). ``check_layout``: each shard's recorded size must be the one
    the samples' offsets lay out (how the build writes shards)."""
    final = manifest_path(dataset_path)
    try:
        n, planned = con.execute(f"SELECT count(*), count(DISTINCT shard) FROM {alias}.samples").fetchall()[0]
        layout = dict(con.execute(f"""SELECT shard, max(json_offset + json_size + ({BLOCK} - json_size % {BLOCK}) % {BLOCK})
                                      FROM {alias}.samples GROUP BY shard""").fetchall())
        shards = sorted(shards() if callable(shards) else shards, key=lambda s: s["name"])
        if sum(s["n_samples"] for s in shards) != n or len(shards) != planned:
            raise CCRKError(f"{dataset_path}: {len(shards)} shards hold {sum(s['n_samples'] for s in shards)} samples "
                            f"but the plan has {n} in {planned}; run the build again to finish the missing shards")
        for s in shards:
            end = layout.get(s["name"])
            total = None if end is None else end + 2 * BLOCK + (-(end + 2 * BLOCK) % RECORD)
            if check_layout and s["bytes"] != total:
                raise CCRKError(f"{s['name']}: {s['bytes']} bytes recorded but the plan lays out {total}; build again")
        _write_shard_indexes(dataset_path, shards, lineage)
        con.register("draft_shards", pa.table({
            "name": pa.array([s["name"] for s in shards], pa.string()),
            "n_samples": pa.array([s["n_samples"] for s in shards], pa.int64()),
            "bytes": pa.array([s["bytes"] for s in shards], pa.int64()),
            "sha256": pa.array([s["sha256"] for s in shards], pa.string())}))
        try:
            # OR REPLACE: a finalize killed after this statement may have left it committed.
            con.execute(f"CREATE OR REPLACE TABLE {alias}.shards AS SELECT * FROM draft_shards ORDER BY name")
        finally:
            con.unregister("draft_shards")
        con.execute(f"CREATE OR REPLACE TABLE {alias}.info AS SELECT ? AS name, ? AS version, ? AS n_samples, ? AS n_shards, "
                    "? AS bytes, ? AS code_version",
                    [lineage["name"], lineage["version"], n, len(shards), sum(s["bytes"] for s in shards),
                     CODE_VERSION])
        out = _summary(con, alias)
    except BaseException:
        con.execute(f"DETACH {alias}")
        if _in_scratch(path):
            discard_draft(path)  # a staging draft stays for the next attempt; a scratch one would leak
        raise
    con.execute(f"DETACH {alias}")  # checkpoints into the file
    place_draft(path, final, durable=True)
    return out


def place_draft(path: str, dest: str, durable: bool) -> None:
    """Move a detached draft to ``dest``, atomically: a scratch draft is copied there and removed,
    any other renamed. ``durable``: fsynced first (the dataset's manifest; not a staging file).
    A WAL beside ``dest`` (left by a process killed while it wrote to the file now replaced) is
    removed first: DuckDB would try to replay it into the new file and refuse to open it."""
    try:
        os.unlink(dest + ".wal")
    except FileNotFoundError:
        pass
    if _in_scratch(path):
        if durable:
            with atomic.atomic_path(dest) as tmp:
                shutil.copyfile(path, tmp)
        else:
            tmp = atomic.temp_path(dest)
            try:
                shutil.copyfile(path, tmp)
                os.replace(tmp, dest)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        discard_draft(path)
        return
    if durable:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    os.replace(path, dest)


SCRATCH_DIR = "/dev/shm"  # a memory filesystem: fsync there costs nothing


def scratch_draft_path(estimate_bytes: int) -> str | None:
    """A path for a manifest draft in :data:`SCRATCH_DIR` when it is writable with room to spare
    (else None: draft in the dataset's staging dir).

    While shards are written the disk is saturated, and on ext4 an fsync then waits for the
    shards' data too: DuckDB's commits and checkpoint of a draft beside the shards stalled for
    hundreds of ms. In memory they don't; :func:`finish_draft` copies the finished file to the
    dataset, fsynced, once the shards are on disk. Drafts left by killed builds are removed here."""
    try:
        st = os.statvfs(SCRATCH_DIR)
        if not os.access(SCRATCH_DIR, os.W_OK) or st.f_bavail * st.f_frsize < 4 * estimate_bytes + (256 << 20):
            return None
        for name in os.listdir(SCRATCH_DIR):
            parts = name.split("-")
            if name.startswith("ccrk-manifest-") and len(parts) > 3 and parts[2].isdigit() \
                    and not _alive(int(parts[2])):
                discard_draft(os.path.join(SCRATCH_DIR, name))
    except OSError:
        return None
    return os.path.join(SCRATCH_DIR, f"ccrk-manifest-{os.getpid()}-{os.urandom(6).hex()}.duckdb")


def _in_scratch(path: str) -> bool:
    return os.path.dirname(os.path.abspath(path)) == os.path.abspath(SCRATCH_DIR)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def discard_draft(path: str) -> None:
    """Remove a (detached) draft and its WAL."""
    for f in (path, path + ".wal"):
        try:
            os.unlink(f)
        except FileNotFoundError:
            pass


def write_manifest(dataset_path: str, shards, lineage: dict, engine=None) -> dict:
    """Complete the plan's manifest draft ``_build/manifest.partial.duckdb`` (shards, info), write
    sizes.json and the wids index; the manifest last, atomically. Returns the :func:`summary`.
    ``shards``: the shard records, or a callable returning them. ``engine``: a DuckDB connection
    whose instance to use instead of a new one."""
    partial = os.path.join(dataset_path, "_build", PARTIAL)
    if not os.path.exists(partial):
        raise CCRKError(f"{dataset_path}: no {PARTIAL} in _build/; run the build again to plan it")
    con = duckdb.connect() if engine is None else engine.cursor()
    try:
        alias = "manifest_" + os.urandom(6).hex()
        con.execute(f"ATTACH {sql_str(partial)} AS {alias}")
        return finish_draft(con, alias, partial, dataset_path, shards, lineage)
    finally:
        con.close()


def write_manifest_tables(dataset_path: str, samples: pa.Table, captions: pa.Table, drops: list[dict],
                          shards: list[dict], lineage: dict) -> dict:
    """The manifest of shards written by other means than the build (e.g. test datasets) from
    in-memory tables: ``samples`` with the :data:`SAMPLE_COLUMNS` (offsets included), ``captions``
    with key, caption_index, lang, text (and optionally caption_id, ok and the
    :data:`SCORE_COLUMNS`), one row per caption and language. Returns the :func:`summary`."""
    os.makedirs(dataset_path, exist_ok=True)
    tmp = atomic.temp_path(os.path.join(dataset_path, MANIFEST))
    con = duckdb.connect()
    try:
        alias = open_draft(con, tmp)
        con.register("draft_samples", samples)
        con.register("draft_captions", captions)
        try:
            # Per language: its text and, where the table has them, ok and the scores.
            langs = sorted(set(captions.column("lang").to_pylist()))
            have = set(captions.column_names)
            cols = ["key", "caption_index",
                    "any_value(caption_id) AS caption_id" if "caption_id" in have else "NULL::VARCHAR AS caption_id"]
            for lang in langs:
                for field, typ in caption_text_fields(lang != SOURCE_LANG):
                    value = f"any_value({field}) FILTER (WHERE lang = {sql_str(lang)})" if field in have else "NULL"
                    cols.append(f"CAST({value} AS {typ}) AS {sql_ident(f'{field}_{lang}')}")
            texts_sql = (f"SELECT {', '.join(cols)} FROM draft_captions GROUP BY key, caption_index "
                         "ORDER BY key, caption_index")
            write_plan_tables(con, alias, "SELECT * FROM draft_samples ORDER BY idx", texts_sql, langs, [], drops,
                              lineage["rows"])
        except BaseException:
            con.execute(f"DETACH {alias}")
            raise
        finally:
            con.unregister("draft_samples")
            con.unregister("draft_captions")
        return finish_draft(con, alias, tmp, dataset_path, shards, lineage, check_layout=False)
    finally:
        con.close()


def _write_shard_indexes(dataset_path: str, shards: list[dict], lineage: dict) -> None:
    """``shards/sizes.json`` (open_clip) and ``shards/wids-index.json`` (wids)."""
    shard_dir = os.path.join(dataset_path, "shards")
    atomic.write_json(os.path.join(shard_dir, "sizes.json"), {s["name"]: s["n_samples"] for s in shards})
    atomic.write_json(os.path.join(shard_dir, "wids-index.json"), {
        "__kind__": "wids-shard-index-v1", "wids_version": 1, "name": lineage["name"],
        "version": lineage["version"],
        "shardlist": [{"url": s["name"], "nsamples": s["n_samples"], "filesize": s["bytes"], "sha256": s["sha256"]}
                      for s in shards]})


def planned_members(plan: pa.Table, carry: tuple[int, int] = (-1, 0)) -> tuple[pa.Table, tuple[int, int]]:
    """Each sample's member offsets (key, jpg_offset, jpg_size, json_offset, json_size) from the
    plan's image and json sizes in dataset order, laid out shard by shard as the build writes them
    (:func:`storage.shards.shard_layout`). ``plan``: sorted by ``idx``; it may be one chunk of the
    plan: ``carry`` is (shard, end offset of its samples so far) from the chunk before, and the
    carry after this chunk is returned with the table."""
    shard = plan.column("shard").to_numpy()
    jpg = plan.column("img_size").to_numpy().astype(np.int64)
    js = plan.column("json_size").to_numpy().astype(np.int64)
    starts = np.empty(len(jpg), dtype=np.int64)
    cuts = np.flatnonzero(np.diff(shard)) + 1
    for lo, hi in zip(np.concatenate(([0], cuts)), np.concatenate((cuts, [len(jpg)]))):
        at = shard_layout(jpg[lo:hi], js[lo:hi])[0] + (carry[1] if lo == 0 and shard[0] == carry[0] else 0)
        starts[lo:hi] = at[:-1]
        if hi == len(jpg):
            carry = (int(shard[-1]), int(at[-1]))
    jpg_offset = starts + BLOCK
    return pa.table({"key": plan.column("key"), "jpg_offset": jpg_offset, "jpg_size": jpg,
                     "json_offset": jpg_offset + jpg + (-jpg % BLOCK) + BLOCK, "json_size": js}), carry


def connect(dataset_path: str) -> duckdb.DuckDBPyConnection:
    path = manifest_path(dataset_path)
    if not os.path.exists(path):
        raise CCRKError(f"{dataset_path} is not a built dataset: no {MANIFEST} (run ccrk build, or it was interrupted)")
    return duckdb.connect(path, read_only=True)


def summary(dataset_path: str) -> dict:
    """Counts for the CLI table, the catalog and the dataset card: besides the info, per-language
    captions, drops, samples per source and lineage, ``benchmark_overlap`` ({benchmark: images kept
    out}, every excluded benchmark, zeros included; {} without exclusion), ``overlap_by_kind``
    (its rows per kind of match) and ``lang_counts`` ({number of languages: samples}, a sample's
    languages being those every one of its captions has)."""
    con = connect(dataset_path)
    try:
        out = _summary(con)
    finally:
        con.close()
    for lang in out["captions_by_lang"]:
        check_lang(lang, f"{dataset_path}: the manifest's language")
    return out


def _summary(con, db: str | None = None) -> dict:
    p = f"{db}." if db else ""
    name, version, n, n_shards, nbytes, code = con.execute(f"SELECT * FROM {p}info").fetchall()[0]
    langs = dict(con.execute(f"SELECT lang, captions FROM {p}lang_counts ORDER BY lang").fetchall())
    drops = [{"unit": u, "reason": r, "lang": lang, "count": c}
             for u, r, lang, c in con.execute(f"SELECT unit, reason, lang, count FROM {p}drops").fetchall()]
    by_source = dict(con.execute(f"SELECT source, count(*) FROM {p}samples GROUP BY source ORDER BY source").fetchall())
    lineage = [list(r) for r in con.execute(f"SELECT kind, name, value FROM {p}lineage").fetchall()]
    by_langs = dict(con.execute(f"SELECT CASE WHEN langs = '' THEN 0 ELSE len(string_split(langs, ',')) END AS k, "
                                f"count(*) FROM {p}samples GROUP BY k ORDER BY k").fetchall())
    tables = {r[0] for r in con.execute("SELECT table_name FROM duckdb_tables() WHERE database_name = "
                                        "coalesce(?, current_database()) AND schema_name = 'main'", [db]).fetchall()}
    overlap_rows = con.execute(f"SELECT benchmark, kind, n_images FROM {p}benchmark_overlap").fetchall() \
        if "benchmark_overlap" in tables else []  # manifests from before the exclusion have none
    overlap: dict[str, int] = {}
    for bench, _, count in overlap_rows:
        overlap[bench] = overlap.get(bench, 0) + int(count)
    return {"name": name, "version": version, "n_samples": n, "n_shards": n_shards, "bytes": nbytes,
            "code_version": code, "captions_by_lang": langs, "drops": drops, "samples_by_source": by_source,
            "lineage": lineage, "benchmark_overlap": overlap,
            "overlap_by_kind": [{"benchmark": b, "kind": k, "n_images": int(c)} for b, k, c in overlap_rows],
            "lang_counts": {int(k): int(c) for k, c in by_langs.items()}}


def check_shard_names(dataset_path: str, names) -> None:
    """A CCRKError of one line naming the dataset and the first of ``names`` (a manifest's shard
    names) that is no plain file name in its ``shards/`` (:func:`storage.layout.is_plain_name`)."""
    for name in names:
        if not is_plain_name(name):
            raise CCRKError(f"{dataset_path}: the manifest names shard {shown(name, 80)}, which is no plain file name in "
                            "shards/: refusing to open it (a damaged or crafted manifest)")


def shard_records(dataset_path: str) -> list[dict]:
    """The manifest's ``shards`` rows (name, n_samples, bytes, sha256) by name; names checked."""
    con = connect(dataset_path)
    try:
        records = [{"name": a, "n_samples": b, "bytes": c, "sha256": d} for a, b, c, d
                   in con.execute("SELECT name, n_samples, bytes, sha256 FROM shards ORDER BY name").fetchall()]
    finally:
        con.close()
    check_shard_names(dataset_path, [r["name"] for r in records])
    return records


def sample_index(dataset_path: str) -> pa.Table:
    """(idx, key, shard, jpg_offset, jpg_size, json_offset, json_size) in dataset order; the shard
    names checked."""
    con = connect(dataset_path)
    try:
        table = con.sql("SELECT idx, key, shard, jpg_offset, jpg_size, json_offset, json_size "
                        "FROM samples ORDER BY idx").to_arrow_table()
    finally:
        con.close()
    check_shard_names(dataset_path, pc.unique(table.column("shard")).to_pylist())
    return table
