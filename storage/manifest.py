"""A dataset version's manifest: ``manifest.duckdb`` plus ``shards/sizes.json`` and the wids index.

Tables in ``manifest.duckdb``:
- ``info``      (name, version, n_samples, n_shards, bytes, code_version) -- one row
- ``samples``   (idx, key, shard, source, image_key, source_id, url, n_captions, langs,
                 jpg_offset, jpg_size, json_offset, json_size) -- offsets let readers seek a sample
- ``shards``    (name, n_samples, bytes, sha256)
- ``captions``  (key, caption_index, caption_id, lang, text, model_id, decode_id, scores..., ok)
- ``lang_counts`` (lang, captions, samples)
- ``drops``     (unit, reason, lang, count) -- every dropped image / caption / translation
- ``lineage``   (kind, name, value) -- source versions, translation model/decode ids, policy, code
``sizes.json`` (``{shard: n_samples}``, as open_clip reads it) and ``wids-index.json`` (wids
``shardlist`` format) sit beside the shards.
"""
from __future__ import annotations

import json
import os

import duckdb
import pyarrow as pa

from storage import atomic
from storage.errors import CCRKError
from storage.versioning import CODE_VERSION

MANIFEST = "manifest.duckdb"


def manifest_path(dataset_path: str) -> str:
    return os.path.join(dataset_path, MANIFEST)


def write_manifest(dataset_path: str, shards, lineage: dict, engine=None) -> dict:
    """Write sizes.json, the wids index and manifest.duckdb (atomically, the manifest last); return
    the :func:`summary` of it. ``shards``: the shard records, or a callable returning them, called
    once the tables that do not need them are written (shards may still be being written till then).

    Sample offsets come from each shard record's ``members`` (``[key, jpg_offset, jpg_size,
    json_offset, json_size]``) when given, else from the plan's image and json sizes laid out by
    :func:`storage.shards.shard_layout` (how the build writes shards). ``engine``: a DuckDB
    connection whose instance to use (the manifest is ATTACHed to it) instead of a new one."""
    staging = os.path.join(dataset_path, "_build")
    pending = shards if callable(shards) else None
    plan_path = os.path.join(staging, "plan.parquet")
    if pending is None and all("members" in s for s in shards):
        members = {k: [] for k in ("key", "jpg_offset", "jpg_size", "json_offset", "json_size")}
        for s in shards:
            for m in s["members"]:  # [key, jpg_offset, jpg_size, json_offset, json_size]
                for k, v in zip(members, m):
                    members[k].append(v)
        member_refs = pa.table(members)
    else:
        member_refs, planned_bytes = _planned_members(plan_path)
    drops = json.load(open(os.path.join(staging, "drops.json")))
    drop_table = pa.table({"unit": pa.array([d["unit"] for d in drops], pa.string()),
                           "reason": pa.array([d["reason"] for d in drops], pa.string()),
                           "lang": pa.array([d["lang"] for d in drops], pa.string()),
                           "count": pa.array([d["count"] for d in drops], pa.int64())})
    rows = lineage["rows"]
    lineage_table = pa.table({"kind": [r[0] for r in rows], "name": [r[1] for r in rows], "value": [r[2] for r in rows]})
    final = manifest_path(dataset_path)
    own = engine is None
    con = duckdb.connect() if own else engine.cursor()
    try:
        with atomic.atomic_path(final) as tmp:
            os.unlink(tmp)  # duckdb wants to create the file itself
            con.execute(f"ATTACH {_sql_str(tmp)} AS manifest_db")
            try:
                con.execute("USE manifest_db")
                con.register("member_refs", member_refs)
                con.register("drop_rows", drop_table)
                con.register("lineage_rows", lineage_table)
                plan = _sql_str(plan_path)
                caps = _sql_str(os.path.join(staging, "captions.parquet"))
                con.execute(f"""
                    CREATE TABLE samples AS
                    SELECT p.idx, p.key, printf('shard-%05d.tar', p.shard) AS shard, p.source, p.image_key, p.source_id,
                           p.url, p.n_captions, p.langs, m.jpg_offset, m.jpg_size, m.json_offset, m.json_size
                    FROM read_parquet({plan}) p JOIN member_refs m USING (key) ORDER BY p.idx""")
                con.execute(f"CREATE TABLE captions AS SELECT * FROM read_parquet({caps}) ORDER BY key, caption_index, lang")
                con.execute("CREATE TABLE drops AS SELECT * FROM drop_rows ORDER BY unit, reason, lang")
                con.execute("CREATE TABLE lineage AS SELECT * FROM lineage_rows")
                con.execute("""CREATE TABLE lang_counts AS SELECT lang, count(*) AS captions, count(DISTINCT key) AS samples
                               FROM captions GROUP BY lang ORDER BY lang""")
                n = con.execute("SELECT count(*) FROM samples").fetchall()[0][0]
                if n != member_refs.num_rows:
                    raise CCRKError(f"{dataset_path}: {member_refs.num_rows} samples in shards but {n} matched the plan")
                shards = sorted(pending() if pending else shards, key=lambda s: s["name"])
                if pending or not all("members" in s for s in shards):
                    recorded = {s["name"]: s["bytes"] for s in shards}
                    for name, total in planned_bytes.items():
                        if recorded.get(name) != total:
                            raise CCRKError(f"{name}: {recorded.get(name)} bytes recorded but the plan lays out "
                                            f"{total}; build again")
                _write_shard_indexes(dataset_path, shards, lineage)
                con.register("shard_rows", pa.table({
                    "name": pa.array([s["name"] for s in shards], pa.string()),
                    "n_samples": pa.array([s["n_samples"] for s in shards], pa.int64()),
                    "bytes": pa.array([s["bytes"] for s in shards], pa.int64()),
                    "sha256": pa.array([s["sha256"] for s in shards], pa.string())}))
                con.execute("CREATE TABLE shards AS SELECT * FROM shard_rows ORDER BY name")
                con.execute("CREATE TABLE info AS SELECT ? AS name, ? AS version, ? AS n_samples, ? AS n_shards, "
                            "? AS bytes, ? AS code_version",
                            [lineage["name"], lineage["version"], n, len(shards), sum(s["bytes"] for s in shards),
                             CODE_VERSION])
                out = _summary(con)
                for view in ("member_refs", "shard_rows", "drop_rows", "lineage_rows"):
                    con.unregister(view)
            finally:
                con.execute("USE memory")
                con.execute("DETACH manifest_db")
    finally:
        con.close()
    return out


def _write_shard_indexes(dataset_path: str, shards: list[dict], lineage: dict) -> None:
    """``shards/sizes.json`` (open_clip) and ``shards/wids-index.json`` (wids)."""
    shard_dir = os.path.join(dataset_path, "shards")
    atomic.write_json(os.path.join(shard_dir, "sizes.json"), {s["name"]: s["n_samples"] for s in shards})
    atomic.write_json(os.path.join(shard_dir, "wids-index.json"), {
        "__kind__": "wids-shard-index-v1", "wids_version": 1, "name": lineage["name"],
        "version": lineage["version"],
        "shardlist": [{"url": s["name"], "nsamples": s["n_samples"], "filesize": s["bytes"], "sha256": s["sha256"]}
                      for s in shards]})


def _sql_str(s: str) -> str:
    return "'" + str(s).replace("'", "''") + "'"


def _planned_members(plan_path: str) -> tuple[pa.Table, dict[str, int]]:
    """Each sample's member offsets from the plan's sizes in shard order (the build's layout,
    :func:`storage.shards.shard_layout`), and each shard's size by that layout."""
    import numpy as np
    import pyarrow.parquet as pq

    from storage.shards import BLOCK, shard_layout, shard_name

    plan = pq.read_table(plan_path, columns=["idx", "shard", "key", "img_size", "json_size"]).sort_by("idx")
    shard = plan.column("shard").to_numpy()
    jpg = plan.column("img_size").to_numpy().astype(np.int64)
    js = plan.column("json_size").to_numpy().astype(np.int64)
    starts = np.empty(len(jpg), dtype=np.int64)
    sizes = {}
    cuts = np.flatnonzero(np.diff(shard)) + 1
    for lo, hi in zip(np.concatenate(([0], cuts)), np.concatenate((cuts, [len(jpg)]))):
        st, total = shard_layout(jpg[lo:hi], js[lo:hi])
        sizes[shard_name(int(shard[lo]))] = total
        starts[lo:hi] = st[:-1]
    jpg_offset = starts + BLOCK
    return pa.table({"key": plan.column("key"), "jpg_offset": jpg_offset, "jpg_size": jpg,
                     "json_offset": jpg_offset + jpg + (-jpg % BLOCK) + BLOCK, "json_size": js}), sizes


def connect(dataset_path: str) -> duckdb.DuckDBPyConnection:
    path = manifest_path(dataset_path)
    if not os.path.exists(path):
        raise CCRKError(f"{dataset_path} is not a built dataset: no {MANIFEST} (run ccrk build, or it was interrupted)")
    return duckdb.connect(path, read_only=True)


def summary(dataset_path: str) -> dict:
    """Counts for the CLI table, the catalog and the dataset card."""
    con = connect(dataset_path)
    try:
        return _summary(con)
    finally:
        con.close()


def _summary(con) -> dict:
    name, version, n, n_shards, nbytes, code = con.execute("SELECT * FROM info").fetchall()[0]
    langs = dict(con.execute("SELECT lang, captions FROM lang_counts ORDER BY lang").fetchall())
    drops = [{"unit": u, "reason": r, "lang": lang, "count": c}
             for u, r, lang, c in con.execute("SELECT unit, reason, lang, count FROM drops").fetchall()]
    by_source = dict(con.execute("SELECT source, count(*) FROM samples GROUP BY source ORDER BY source").fetchall())
    lineage = [list(r) for r in con.execute("SELECT kind, name, value FROM lineage").fetchall()]
    return {"name": name, "version": version, "n_samples": n, "n_shards": n_shards, "bytes": nbytes,
            "code_version": code, "captions_by_lang": langs, "drops": drops, "samples_by_source": by_source,
            "lineage": lineage}


def shard_records(dataset_path: str) -> list[dict]:
    con = connect(dataset_path)
    try:
        return [{"name": a, "n_samples": b, "bytes": c, "sha256": d}
                for a, b, c, d in con.execute("SELECT name, n_samples, bytes, sha256 FROM shards ORDER BY name").fetchall()]
    finally:
        con.close()


def sample_index(dataset_path: str) -> pa.Table:
    """(idx, key, shard, jpg_offset, jpg_size, json_offset, json_size) in dataset order."""
    con = connect(dataset_path)
    try:
        return con.sql("SELECT idx, key, shard, jpg_offset, jpg_size, json_offset, json_size "
                       "FROM samples ORDER BY idx").to_arrow_table()
    finally:
        con.close()
