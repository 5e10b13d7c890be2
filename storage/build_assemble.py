"""Assemble the samples: the language policy and drop counts as whole-column SQL, then bucket by
bucket of the seeded order each sample's plan row with its json, and the manifest's draft."""
from __future__ import annotations

import json
import os
import re
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from storage import manifest
from storage.build_parts import PlanWriter
from storage.build_policy import count_drops, target_langs
from storage.build_staging import BOX_COLUMNS, arrow_table
from storage.errors import CCRKError
from storage.languages import SOURCE_LANG
from storage.manifest import sql_ident as _ident, sql_str as _sql_str
from storage.shards import safe_keys, shard_name

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


def assemble(con, staging, tsets, langs, shard_size, boxes, lineage, on_plan=None, keep_draft=False,
             write_plan=True, on_total=None) -> tuple[int, tuple[str, str] | None]:
    """The samples of ``cj``'s kept captions (:mod:`storage.build_policy`): each sample's json from
    per-caption SQL fragments joined per sample by Arrow (no per-row Python), planned bucket by
    bucket (:class:`_SamplePlanner`). Writes the plan, then the manifest's plan-determined tables;
    returns the number of samples and the draft kept ATTACHed (``keep_draft``) or None."""
    rows_sql, sort_cols = _rows_sql(langs, boxes)
    planner = _SamplePlanner(con, staging, rows_sql, sort_cols, langs, shard_size, on_plan)
    n_buckets = planner.run(write_plan, on_total)
    if planner.n == 0:
        drops, _ = count_drops(con, langs)
        top = ", ".join(f"{r} ({u}): {c}" for (u, r, _), c in drops.most_common(4) if c)
        raise CCRKError(f"no samples left after the join and the language policy ({top or 'no inputs'})")
    if n_buckets > 1:  # keys were checked within each bucket as it was planned
        _check_unique_keys(con)
    _, drop_rows = count_drops(con, langs)  # only the manifest needs them: counted while shards are written
    return planner.n, _draft_manifest(con, staging, tsets, langs, drop_rows, lineage, planner.json_bytes, keep_draft)


def _rows_sql(langs, boxes: bool) -> tuple[str, list[str]]:
    """The query of each kept caption's json fragments (to append a bucket's WHERE conditions to),
    and the columns that sort its rows into dataset order: samples by their seeded draw, a sample's
    captions by caption id. Keys sorted as json.dumps(sort_keys=True) writes them: a caption is an
    object of its kept languages; boxes (a list with null for captions without one) only when the
    sample has any."""
    present = {SOURCE_LANG: ("true", "norm")} if SOURCE_LANG in langs else {}
    present.update({lang: (f"keep{i}", f"tx{i}") for i, lang in enumerate(target_langs(langs))})
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
    # Sorted by Arrow rather than by DuckDB: sorting the wide rows costs more than the query.
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
    return rows_sql, sort_cols


class _SamplePlanner:
    """The kept captions' json fragments in dataset order, bucket by bucket: the samples are ordered
    by their draw (an md5 in hex) first, so buckets of draw-prefix ranges, taken in turn, are that
    order in pieces -- memory holds one bucket's rows, whatever the dataset's size (one bucket up
    to PLAN_BUCKET_ROWS kept captions). Each bucket's samples are planned in chunks (1, 2, 4, ...
    shards' worth of samples overall), each handed to ``on_plan`` (which may start writing the
    shards it completes) before the next is made; what the manifest needs of them goes into
    DuckDB temp tables (which spill to disk) bucket by bucket."""

    def __init__(self, con, staging, rows_sql, sort_cols, langs, shard_size, on_plan):
        self.con, self.staging, self.rows_sql, self.sort_cols = con, staging, rows_sql, sort_cols
        self.langs, self.shard_size, self.on_plan = langs, int(shard_size), on_plan
        self.n, self.json_bytes, self.carry, self.made = 0, 0, (-1, 0), set()
        self.next_cut, self.writer = self.shard_size, None

    def run(self, write_plan: bool, on_total) -> int:
        """Plan every bucket; returns how many there were."""
        # Kept captions and the samples they make (one count for the ramp and for on_total).
        n_kept, n_images = self.con.execute(
            "SELECT coalesce(sum(n), 0), count(*) FROM (SELECT count(*) AS n FROM cj "
            "WHERE drop_reason IS NULL GROUP BY source, image_key)").fetchall()[0]
        # A ramp of buckets from about three shards' samples up: the first shards start being written
        # while the rest of the plan is still being queried.
        lead = 3 * self.shard_size * n_kept // max(1, n_images)
        buckets = _draw_buckets(n_kept, plan_bucket_rows(), lead_rows=lead)
        if on_total is not None:
            on_total(n_images)
        self.writer = PlanWriter(os.path.join(self.staging, "plan.parquet")) if write_plan else None
        try:
            for b, where in enumerate(buckets):
                if b and hasattr(self.on_plan, "next_bucket"):
                    self.on_plan.next_bucket()  # e.g. wait till the shards of the last bucket are mostly written
                self._bucket(where, b == len(buckets) - 1)
            if self.writer is not None:
                self.writer.close()
        finally:
            if self.writer is not None:
                self.writer.abort()
        return len(buckets)

    def _bucket(self, where: str, last_bucket: bool) -> None:
        rows = arrow_table(self.con.sql(self.rows_sql + where))
        rows = rows.take(pc.sort_indices(rows, sort_keys=[(c, "ascending") for c in self.sort_cols]))  # nulls last
        starts = _sample_starts(rows)
        ends = []
        while self.next_cut - self.n < len(starts):
            ends.append(int(starts[self.next_cut - self.n]))
            self.next_cut += self.next_cut + self.shard_size
        ends.append(rows.num_rows)
        samples_parts, kept_parts, lo, seen = [], [], 0, set()  # seen: the bucket's keys
        for hi in ends:
            last = last_bucket and hi == ends[-1]
            part = None
            if hi > lo:
                part, kept_part = _plan_table(rows.slice(lo, hi - lo), self.langs, self.shard_size, self.n, seen)
                members, self.carry = manifest.planned_members(part, self.carry)
                samples_parts.append(_samples_part(part, members))
                kept_parts.append(kept_part)
                self.json_bytes += int(pc.sum(part.column("json_size")).as_py())
                self.n += part.num_rows
                if self.writer is not None:
                    self.writer.write(part)
            elif not last:
                continue
            if self.on_plan is not None:
                self.on_plan(os.path.dirname(self.staging), part, last)
            lo = hi
        del rows, part
        # What the manifest needs from Python goes into DuckDB now: from then on the manifest is
        # pure SQL (a DuckDB scan of an Arrow table needs the GIL, which the shard threads keep busy).
        for name, parts in (("plan_samples", samples_parts), ("kept_rows", kept_parts)):
            if parts:
                _append_temp(self.con, name, pa.concat_tables(parts), self.made)


def _check_unique_keys(con) -> None:
    """No two samples of the plan share a key (each bucket's keys were checked as it was planned)."""
    dup = con.execute("SELECT key FROM plan_samples GROUP BY key HAVING count(*) > 1 LIMIT 1").fetchall()
    if dup:
        same = con.execute("SELECT source, image_key FROM plan_samples WHERE key = ? ORDER BY idx",
                           [dup[0][0]]).fetchall()
        raise CCRKError(f"two images map to the sample key {dup[0][0]!r} "
                        f"({', '.join(f'source {s}, image_key {k!r}' for s, k in same)}): image keys must be unique")


def _draft_manifest(con, staging, tsets, langs, drop_rows, lineage, json_bytes: int,
                    keep_draft: bool) -> tuple[str, str] | None:
    """The manifest's plan-determined tables: drafted in memory when there is room (see
    manifest.scratch_draft_path), as shards may be being written meanwhile, by this process or by
    shard tasks; then kept ATTACHed (``keep_draft``: returns its alias and path) or placed at
    ``_build/manifest.partial.duckdb``."""
    # The caption rows: one per kept caption, in (key, caption_index) order, with English (the normalised
    # source text) and each language's kept translation, its ok flag, set and scores (set where it is kept).
    cols = [f"norm AS {_ident(f'text_{SOURCE_LANG}')}"] if SOURCE_LANG in langs else []
    for i, lang in enumerate(target_langs(langs)):
        for name, _ in manifest.caption_text_fields(True):
            src = {"text": f"tx{i}"}.get(name, f"{name}{i}")
            cols.append(f"CASE WHEN keep{i} THEN {src} END AS {_ident(f'{name}_{lang}')}")
    caption_texts_sql = (f"SELECT k.key, k.caption_index, c.caption_id, {', '.join(cols)} "
                         "FROM kept_rows k JOIN cj c ON c.rowid = k.rid ORDER BY k.key, k.caption_index")
    sets = sorted((lang, rank, t.model_id, t.decode_id) for lang, ts in tsets.items() for rank, t in enumerate(ts))
    scratch = manifest.scratch_draft_path(2 * json_bytes)
    draft_path = scratch or os.path.join(staging, f".tmp-{os.getpid()}-{manifest.PARTIAL}")
    alias = manifest.open_draft(con, draft_path)
    try:
        manifest.write_plan_tables(con, alias, "SELECT * FROM plan_samples", caption_texts_sql, langs, sets,
                                   drop_rows, lineage["rows"], SOURCE_LANG, OVERLAP_SQL, OVERLAP_IMAGES_SQL)
        if keep_draft:
            con.execute(f"CHECKPOINT {alias}")  # written now, while shards are; closing it later is quick
            return alias, draft_path
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
    return None


# The benchmark exclusion's manifest tables, from storage.build_plan.exclude_benchmark_images's temp tables
OVERLAP_SQL = "SELECT benchmark, kind, n_images FROM overlap_counts"
OVERLAP_IMAGES_SQL = ("SELECT source, image_key, i.url, benchmark, split, kind, value FROM excluded "
                      "JOIN excluded_images i USING (source, image_key) ORDER BY benchmark, source, image_key")

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
