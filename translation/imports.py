"""Import existing translations (CCLM/UC2-style JSON lines, or parquet) into the store as ``import:<name>``.

JSON lines: one object per line, ``{"caption": {"en": ..., "de": ..., ...}}`` (a top-level
``{"en": ..., "de": ...}`` object is accepted too). Parquet: one column per language (``en`` plus
targets), or a struct column ``caption``. Rows are keyed by the normalised English text; a text
already imported under that name is skipped; bad lines are counted, never fatal.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field

from storage.errors import CCRKError
from storage.versioning import normalize, text_sha
from translation import store
from translation.scores import score

IMPORT_DECODE_ID = "imported"


@dataclass
class ImportStats:
    rows: int = 0
    bad_rows: int = 0
    imported: dict[str, int] = field(default_factory=dict)
    already: dict[str, int] = field(default_factory=dict)
    flagged: dict[str, int] = field(default_factory=dict)


def import_model_id(name: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise CCRKError(f"import name {name!r} must use only letters, digits, '_', '.', '-'")
    return f"import:{name}"


def _records(path: str, stats: ImportStats):
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        for rec in pq.read_table(path).to_pylist():
            stats.rows += 1
            yield rec.get("caption") if isinstance(rec.get("caption"), dict) else rec
        return
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            stats.rows += 1
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                stats.bad_rows += 1
                continue
            yield rec.get("caption", rec) if isinstance(rec, dict) else None


def import_translations(root: str, path: str, name: str, langs=None, part_size: int = 100_000) -> ImportStats:
    """Import ``path`` into ``translations/import:<name>/imported/<lang>/``; returns counts."""
    if not os.path.isfile(path):
        raise CCRKError(f"translations to import not found: {path}")
    model_id = import_model_id(name)
    stats = ImportStats()
    by_lang: dict[str, dict[str, dict]] = {}
    for rec in _records(path, stats):
        en = normalize(rec.get("en")) if isinstance(rec, dict) else ""
        if not en:
            stats.bad_rows += 1
            continue
        sha = text_sha(en)
        for lang, value in rec.items():
            if lang == "en" or not isinstance(value, str) or (langs and lang not in langs):
                continue
            tgt = normalize(value)
            by_lang.setdefault(lang, {}).setdefault(sha, {
                "text_sha": sha, "tgt_lang": lang, "src_text": en, "tgt_text": tgt, "model_id": model_id,
                "decode_id": IMPORT_DECODE_ID, **score(en, tgt, lang)})
    for lang, rows in sorted(by_lang.items()):
        directory = store.lang_dir(root, model_id, IMPORT_DECODE_ID, lang)
        have = store.stored_shas(directory)
        new = [r for sha, r in sorted(rows.items()) if sha not in have]
        stats.already[lang] = len(rows) - len(new)
        stats.imported[lang] = len(new)
        stats.flagged[lang] = sum(not r["ok"] for r in new)
        index = store.next_part_index(directory)
        for k, start in enumerate(range(0, len(new), part_size)):
            store.write_part(directory, index + k, new[start:start + part_size])
    return stats
