"""The translation store: ``<root>/translations/<model-id>/<decode-id>/<lang>/part-NNNNN.parquet``.

One row per unique normalised English text and target language (columns: :data:`COLUMNS`).
Each part is written atomically (temporary file + rename), so a killed run leaves only whole
parts; what is missing is recomputed from the parts present, hence a re-run translates only the
texts not yet stored for that (model_id, decode_id, lang) and never duplicates one.

For the dataset builder: :func:`load_translations` (one table keyed by ``text_sha``).
"""
from __future__ import annotations

import glob
import os
import re
from typing import Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from storage import atomic, layout

COLUMNS = ("text_sha", "tgt_lang", "src_text", "tgt_text", "model_id", "decode_id", "uniformity", "copy_sim",
           "len_ratio", "script_ok", "empty", "truncated", "ok")
SCHEMA = pa.schema([
    ("text_sha", pa.string()), ("tgt_lang", pa.string()), ("src_text", pa.string()), ("tgt_text", pa.string()),
    ("model_id", pa.string()), ("decode_id", pa.string()), ("uniformity", pa.float64()),
    ("copy_sim", pa.float64()), ("len_ratio", pa.float64()), ("script_ok", pa.bool_()), ("empty", pa.bool_()),
    ("truncated", pa.bool_()), ("ok", pa.bool_()),
])
_PART = re.compile(r"^part-(\d{5,})\.parquet$")


def lang_dir(root: str, model_id: str, decode_id: str, lang: str) -> str:
    return layout.translation_dir(layout.data_root(root), model_id, decode_id, lang)


def part_path(directory: str, index: int) -> str:
    return layout.join(directory, f"part-{index:05d}.parquet")


def part_paths(directory: str) -> list[str]:
    if not os.path.isdir(directory):
        return []
    return sorted(os.path.join(directory, n) for n in os.listdir(directory) if _PART.match(n))


def next_part_index(directory: str) -> int:
    """One past the highest part present (never reuses a number, even with gaps from killed runs)."""
    indices = [int(_PART.match(os.path.basename(p)).group(1)) for p in part_paths(directory)]
    return max(indices) + 1 if indices else 0


def stored_shas(directory: str) -> set[str]:
    shas: set[str] = set()
    for path in part_paths(directory):
        shas.update(pq.read_table(path, columns=["text_sha"]).column("text_sha").to_pylist())
    return shas


def write_part(directory: str, index: int, rows: list[dict]) -> str:
    """Write one part atomically; returns its path."""
    table = pa.Table.from_pylist([{c: r[c] for c in COLUMNS} for r in rows], schema=SCHEMA)
    path = part_path(directory, index)
    atomic.write_parquet(table, path)
    return path


def read_dir(directory: str) -> pa.Table:
    paths = part_paths(directory)
    if not paths:
        return SCHEMA.empty_table()
    return pa.concat_tables([pq.read_table(p, schema=SCHEMA) for p in paths])


def list_stores(root: str | None = None) -> list[tuple[str, str, str]]:
    """(model_id, decode_id, lang) of every store directory holding at least one part."""
    base = layout.join(layout.data_root(root), "translations")
    out = []
    for path in sorted(glob.glob(os.path.join(glob.escape(base), "*", "*", "*"))):
        if part_paths(path):
            model_id, decode_id, lang = path.split(os.sep)[-3:]
            out.append((model_id, decode_id, lang))
    return out


def load_translations(root: str | None, langs: Iterable[str], model_id: str | None = None,
                      decode_id: str | None = None, ok_only: bool = False) -> pa.Table:
    """All stored translations into ``langs``: a pyarrow Table with the :data:`COLUMNS`, one row per
    (``text_sha``, ``tgt_lang``).

    ``model_id``/``decode_id`` select one store (``import:<name>`` selects imported rows); left
    ``None``, every store is read and, where several hold the same (text, language), the row kept
    is the first of: ``ok`` rows before flagged ones, then by ``model_id``, then ``decode_id``
    (deterministic). ``ok_only`` drops flagged rows. Join on ``text_sha`` =
    ``storage.versioning.text_sha(storage.versioning.normalize(caption))``.
    """
    langs = set(langs)
    tables = [read_dir(lang_dir(root, m, d, lang)) for m, d, lang in list_stores(root)
              if lang in langs and model_id in (None, m) and decode_id in (None, d)]
    if not tables:
        return SCHEMA.empty_table()
    table = pa.concat_tables(tables)
    if ok_only:
        table = table.filter(table.column("ok"))
    rows = table.to_pylist()
    rows.sort(key=lambda r: (r["text_sha"], r["tgt_lang"], not r["ok"], r["model_id"], r["decode_id"]))
    kept, last = [], None
    for r in rows:
        key = (r["text_sha"], r["tgt_lang"])
        if key != last:
            kept.append(r)
            last = key
    return pa.Table.from_pylist(kept, schema=SCHEMA)
