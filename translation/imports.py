"""Import existing translations (CCLM/UC2-style JSON lines, or parquet) into the store as ``import:<name>``.

``path`` is a file or a folder of them (CCRk's release: ``cc3m-mm-data-all/part_*.data``), read in
name order. JSON lines: one object per line, ``{"caption": {"en": ..., "de": ..., ...}}`` (a list of such
objects under ``caption``, as CCRk's data reader also takes, or a top-level ``{"en": ..., "de": ...}``
object are accepted too). Parquet: one column per language (``en`` plus targets), or a struct column
``caption``. Bad lines are counted, never fatal; a text already imported under that name is skipped,
so an import runs again for free and resumes where it stopped.

Keys. With ``sources`` (the unique captions of the sources the import covers), each row is matched
to those captions by :func:`storage.versioning.match_key` (case, spacing, punctuation and quotes do
not count) and stored under the source caption's own ``text_sha``, with the source caption as
``src_text``: the build joins it like any translation of that caption. An exact match wins over a
loose one; rows matching no caption are counted (``unmatched_rows``), not stored. The match rate
per source (its unique captions that found a row / all of them) comes back in the stats, with a few
captions that found none. Without ``sources``, rows are keyed by their own normalised English.

Languages. A record's keys besides ``en`` are its languages, each a directory of the store: a key
that is no language code (:func:`storage.languages.check_lang`: ``../../x``, ``image``, ``a/b``) is
skipped and counted (``bad_keys``, a few shown), like a bad line, and the record's other languages
are imported; one odd key in a release of millions of lines must not stop the import, nor reach a
path. Keys are case-insensitive (``DE`` is ``de``).
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Iterator

from storage.errors import CCRKError, shown
from storage.languages import SOURCE_LANG, check_lang, normalise_lang
from storage.layout import check_name
from storage.versioning import match_key, normalize, text_sha
from translation import store
from translation.scores import score

IMPORT_DECODE_ID = "imported"
UNMATCHED_EXAMPLES = 3
BAD_KEY_EXAMPLES = 3


@dataclass
class SourceMatch:
    """How much of one source an import covers."""

    source: str  # name@version
    captions: int  # unique English captions of the source
    matched: int  # of them, those an import row was found for
    unmatched_examples: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.matched / self.captions if self.captions else 1.0

    def as_dict(self) -> dict:
        return {**asdict(self), "rate": round(self.rate, 4)}


@dataclass
class ImportStats:
    rows: int = 0
    bad_rows: int = 0
    imported: dict[str, int] = field(default_factory=dict)
    already: dict[str, int] = field(default_factory=dict)
    flagged: dict[str, int] = field(default_factory=dict)
    unmatched_rows: int = 0  # with sources: rows whose English matched none of their captions
    sources: list[SourceMatch] = field(default_factory=list)
    bad_keys: int = 0  # texts skipped because their key is no language code
    bad_key_examples: list[str] = field(default_factory=list)  # a few of those keys, repr-shortened

    def bad_key(self, key) -> None:
        self.bad_keys += 1
        example = shown(key, 40)
        if len(self.bad_key_examples) < BAD_KEY_EXAMPLES and example not in self.bad_key_examples:
            self.bad_key_examples.append(example)


def import_model_id(name: str) -> str:
    return f"import:{check_name(name, 'import name')}"


def _captions_of(rec) -> list:
    """The caption objects of one record: ``caption`` (an object or a list of them), else the record."""
    if not isinstance(rec, dict):
        return [None]
    caption = rec.get("caption", rec)
    return caption if isinstance(caption, list) and caption else [caption]


def _files(path: str) -> list[str]:
    if os.path.isdir(path):
        files = sorted(os.path.join(d, n) for d, _, names in os.walk(path) for n in names if not n.startswith("."))
        if not files:
            raise CCRKError(f"translations to import: the folder {path} holds no file")
        return files
    if not os.path.isfile(path):
        raise CCRKError(f"translations to import not found: {path}")
    return [path]


def _records(path: str, stats: ImportStats) -> Iterator[dict | None]:
    """Each caption object of the file(s) (None for a line that is not one); counts rows."""
    for f in _files(path):
        yield from _file_records(f, stats)


def _file_records(path: str, stats: ImportStats) -> Iterator[dict | None]:
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
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                stats.rows += 1
                yield None
                continue
            for caption in _captions_of(rec):
                stats.rows += 1
                yield caption if isinstance(caption, dict) else None


class _SourceIndex:
    """The covered sources' captions by match key: which text_sha(s) an import row's English lands on."""

    def __init__(self, sources: dict[str, dict[str, str]]):
        self.sources = sources
        self.texts: dict[str, str] = {}
        self.by_key: dict[str, list[str]] = {}
        for texts in sources.values():
            for sha, text in texts.items():
                if sha not in self.texts:
                    self.texts[sha] = text
                    self.by_key.setdefault(match_key(text), []).append(sha)

    def targets(self, en: str) -> list[tuple[str, str, bool]]:
        """(text_sha, source text, exact) of the captions ``en`` matches."""
        exact_sha = text_sha(en)
        return [(sha, self.texts[sha], sha == exact_sha) for sha in self.by_key.get(match_key(en), ())]

    def matches(self, found: set[str]) -> list[SourceMatch]:
        out = []
        for label, texts in self.sources.items():
            missed = [t for sha, t in texts.items() if sha not in found]
            out.append(SourceMatch(label, len(texts), len(texts) - len(missed), missed[:UNMATCHED_EXAMPLES]))
        return out


def _collect_rows(path: str, model_id: str, langs, index: _SourceIndex | None,
                  stats: ImportStats) -> tuple[dict[str, dict[str, dict]], set[str]]:
    """{lang: {text_sha: row}} of the file, and the text_shas that got a row. Per key and language the
    first row wins, an exact match over a loose one."""
    by_lang: dict[str, dict[str, dict]] = {}
    exact: set[tuple[str, str]] = set()
    found: set[str] = set()
    for rec in _records(path, stats):
        en = normalize(rec.get("en")) if isinstance(rec, dict) and isinstance(rec.get("en"), str) else ""
        if not en:
            stats.bad_rows += 1
            continue
        targets = index.targets(en) if index is not None else [(text_sha(en), en, True)]
        if not targets:
            stats.unmatched_rows += 1
            continue
        for key, value in rec.items():
            if key == SOURCE_LANG or not isinstance(value, str):
                continue
            lang = normalise_lang(key)
            if lang is None:
                stats.bad_key(key)
                continue
            if lang == SOURCE_LANG or (langs and lang not in langs):
                continue
            tgt = normalize(value)
            rows = by_lang.setdefault(lang, {})
            for sha, src, is_exact in targets:
                if sha in rows and (not is_exact or (lang, sha) in exact):
                    continue
                rows[sha] = {"text_sha": sha, "tgt_lang": lang, "src_text": src, "tgt_text": tgt,
                             "model_id": model_id, "decode_id": IMPORT_DECODE_ID, **score(src, tgt, lang)}
                if is_exact:
                    exact.add((lang, sha))
                found.add(sha)
    return by_lang, found


def import_translations(root: str, path: str, name: str, langs=None, part_size: int = 100_000,
                        sources: dict[str, dict[str, str]] | None = None) -> ImportStats:
    """Import ``path`` (a file or a folder of files) into ``translations/import:<name>/imported/<lang>/``;
    returns counts.

    ``sources``: ``{name@version: {text_sha: normalised caption}}`` of the sources the import covers
    (:func:`translation.collect.covered_texts`): rows are stored under their captions' text_sha and
    the match rate per source is counted (see the module docstring); None: keyed by their own English.
    """
    model_id = import_model_id(name)
    langs = [check_lang(lang, f"import {name}: langs") for lang in langs] if langs else None
    _files(path)  # a missing path fails before any work
    stats = ImportStats()
    index = _SourceIndex(sources) if sources is not None else None
    by_lang, found = _collect_rows(path, model_id, langs, index, stats)
    if index is not None:
        stats.sources = index.matches(found)
    for lang, rows in sorted(by_lang.items()):
        directory = store.lang_dir(root, model_id, IMPORT_DECODE_ID, lang)
        have = store.stored_shas(directory)
        new = [r for sha, r in sorted(rows.items()) if sha not in have]
        stats.already[lang] = len(rows) - len(new)
        stats.imported[lang] = len(new)
        stats.flagged[lang] = sum(not r["ok"] for r in new)
        index_part = store.next_part_index(directory)
        for k, start in enumerate(range(0, len(new), part_size)):
            store.write_part(directory, index_part + k, new[start:start + part_size])
    return stats


def bad_key_warning(name: str, stats: ImportStats) -> str | None:
    """The line that reports the texts skipped for a key that is no language code (None: none were)."""
    if not stats.bad_keys:
        return None
    return (f"import {name}: {stats.bad_keys} text(s) skipped under keys that are no language code, e.g. "
            + ", ".join(stats.bad_key_examples))


def import_report(name: str, path: str, stats: ImportStats, min_match_rate: float) -> dict:
    """One import's summary: counts, the match per covered source, and a warning for each source whose
    captions found an import row less often than ``min_match_rate``, naming a few that found none, and
    one for the texts under keys that are no language code."""
    warnings = [f"import {name}: {m.matched} of the {m.captions} unique captions of {m.source} ({m.rate:.1%}) "
                f"found a translation, under {min_match_rate:.0%}; unmatched e.g. "
                + "; ".join(repr(t) for t in m.unmatched_examples)
                for m in stats.sources if m.rate < min_match_rate]
    warnings += [w for w in [bad_key_warning(name, stats)] if w]
    return {"name": name, "path": path, "rows": stats.rows, "bad_rows": stats.bad_rows, "bad_keys": stats.bad_keys,
            "unmatched_rows": stats.unmatched_rows, "imported": stats.imported, "already": stats.already,
            "flagged": stats.flagged, "sources": [m.as_dict() for m in stats.sources], "warnings": warnings}
