"""How the plan reaches the shard writers: ``plan.parquet`` written chunk by chunk, part files
for shard tasks that start before the plan is done, and the rows of each complete shard."""
from __future__ import annotations

import glob
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from storage.atomic import naming_full_disk, temp_path
from storage.build_staging import write_staging, write_staging_json


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


class PartWriter:
    """``on_plan`` writing complete shards' rows to ``parts_dir`` (see :func:`plan_resolved`)."""

    def __init__(self, parts_dir: str, shard_size: int, then=None):
        self.dir, self.complete, self.then, self.n = parts_dir, CompleteShards(shard_size), then, 0
        os.makedirs(parts_dir, exist_ok=True)

    def __call__(self, dataset_path: str, part: pa.Table | None, last: bool) -> None:
        rows = self.complete.add(part, last)
        if rows is not None:
            name = f"part-{self.n:05d}"
            self.n += 1
            write_staging(os.path.join(self.dir, f"{name}.parquet"),
                           lambda tmp: pq.write_table(rows.select(PART_COLUMNS), tmp))
            write_staging_json(os.path.join(self.dir, f"{name}.json"),
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
    for marker in sorted(glob.glob(os.path.join(glob.escape(parts_dir), "part-*.json"))):
        if marker in taken:
            continue
        taken.add(marker)
        with open(marker) as f:
            info = json.load(f)
        out.append((os.path.join(parts_dir, info["rows"]), [int(x) for x in info["shards"]]))
    return out


class PlanWriter:
    """``plan.parquet`` written chunk by chunk (under a temporary name of this process's, renamed on ``close``)."""

    def __init__(self, path: str):
        self.path, self.tmp, self.writer = path, temp_path(path), None

    def write(self, part: pa.Table) -> None:
        with naming_full_disk(self.path):
            if self.writer is None:
                self.writer = pq.ParquetWriter(self.tmp, part.schema)
            self.writer.write_table(part.cast(self.writer.schema))

    def close(self) -> None:
        if self.writer is not None:
            with naming_full_disk(self.path):
                self.writer.close()
            self.writer = None
            os.replace(self.tmp, self.path)

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if os.path.exists(self.tmp):
            os.unlink(self.tmp)
