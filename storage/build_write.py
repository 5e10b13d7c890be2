"""Write shards from the plan, several at once, each marked done by its ``_build`` index file
(a resumed build skips those)."""
from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from storage.build_staging import STAGING, write_staging_json
from storage.errors import CCRKError
from storage.shards import shard_name, write_planned_shard


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


def write_part(dataset_path: str, shard_ids, part: str | None = None, progress=None) -> list[dict]:
    """:func:`write_shard_group` of shards whose plan rows are in the part file ``part``
    (:func:`storage.build_parts.ready_parts`); None: in ``_build/plan.parquet``."""
    plan = None
    if part is not None:
        plan = pq.read_table(part, filters=[("shard", "in", [int(s) for s in shard_ids])]).sort_by("idx")
    return write_shard_group(dataset_path, shard_ids, progress=progress, plan=plan)


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
    write_staging_json(os.path.join(dataset_path, STAGING, f"{info.name}.index.json"), record)
    return record
