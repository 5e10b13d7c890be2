"""The language policy: per caption of a downloaded image, its translations and why it is dropped
(the temp table ``cj``, one join for the whole dataset), and the drop counts."""
from __future__ import annotations

from collections import Counter

from storage.build_staging import BOX_COLUMNS, parquet_columns
from storage.errors import CCRKError
from storage.languages import SOURCE_LANG
from storage.manifest import SCORE_COLUMNS, score_type as _score_type, sql_str as _sql_str

EMPTY = "(norm IS NULL OR norm = '')"  # a caption with no text


def target_langs(langs) -> list[str]:
    """The requested languages but the source's: those that need a translation (``tx{i}`` etc.)."""
    return [lang for lang in langs if lang != SOURCE_LANG]


def join_captions(con, tsets, langs, min_langs, drop_flagged, boxes: bool) -> None:
    """Create ``cj``: one row per caption of a downloaded image, with each target language ``i``'s
    translation (``tx{i}``, ``ok{i}``, ``set{i}``, the scores), whether it is missing (``miss{i}``),
    removed as not ok (``flag{i}``) or kept (``keep{i}``) -- computed once, so that later queries
    stay small (planning a query costs more than running it at small sizes) -- and why the caption
    is dropped (``drop_reason``; NULL: kept)."""
    if not _make_cj(con, langs, min_langs, drop_flagged, boxes, load_translations(con, tsets, langs)):
        _make_cj(con, langs, min_langs, drop_flagged, boxes, load_translations(con, tsets, langs, dedupe=True))


def _make_cj(con, langs, min_langs, drop_flagged, boxes: bool, rels: dict[str, str]) -> bool:
    """Creates ``cj`` (:func:`join_captions`); False when some caption found two translations into
    one language."""
    others = target_langs(langs)
    n_others = range(len(others))
    need = len(langs) if min_langs is None else min_langs
    miss_sql = ", ".join(f"(tx{i} IS NULL OR tx{i} = '') AS miss{i}" for i in n_others)
    flag_sql = ", ".join(f"(NOT miss{i} AND NOT ok{i} AND {str(bool(drop_flagged)).upper()}) AS flag{i}" for i in n_others)
    keep_sql = ", ".join(f"(NOT miss{i} AND NOT flag{i}) AS keep{i}" for i in n_others)
    n_present = " + ".join([str(int(SOURCE_LANG in langs))] + [f"CAST(keep{i} AS INTEGER)" for i in n_others])
    any_flag = " OR ".join(f"flag{i}" for i in n_others) or "false"
    short = "'below_min_langs'" if min_langs is not None else \
        f"CASE WHEN {any_flag} THEN 'flagged_translation' ELSE 'missing_language' END"
    tx = "".join(f", t{i}.tgt_text AS tx{i}, coalesce(t{i}.ok, false) AS ok{i}, t{i}.set_rank AS set{i}"
                 + "".join(f", t{i}.{c} AS {c}{i}" for c in SCORE_COLUMNS) for i in n_others)
    box_cols = "".join(f", c.{b}" for b in BOX_COLUMNS) if boxes else ""
    joins = " ".join(f"LEFT JOIN {rels[lang]} t{i} ON t{i}.text_sha = c.text_sha" for i, lang in enumerate(others))
    joined = f"""SELECT c.rowid AS cap_row, c.source, c.image_key, c.caption_id, c.norm, c.text_sha{box_cols}{tx}
                  FROM img i JOIN cap c ON c.source = i.source AND c.image_key = i.image_key {joins}
                  WHERE i.tar_path IS NOT NULL"""
    if others:
        joined = f"SELECT *, {keep_sql} FROM (SELECT *, {flag_sql} FROM (SELECT *, {miss_sql} FROM ({joined})))"
    con.execute(f"""
        CREATE OR REPLACE TEMP TABLE cj AS
        SELECT *, CASE WHEN {EMPTY} THEN 'empty_caption' WHEN {n_present} < {need} THEN {short} END AS drop_reason
        FROM ({joined})""")
    return con.execute("SELECT count(*) = count(DISTINCT cap_row) FROM cj").fetchall()[0][0]


def count_drops(con, langs) -> tuple[Counter, list[dict]]:
    """The drops by (unit, reason, language) -- a Counter, and the manifest's rows of it. Reads the
    temp table ``excluded_images`` besides ``img``, ``cap`` and ``cj``."""
    counts = ["""SELECT 'image', 'no_image', NULL, count(*) FROM img WHERE tar_path IS NULL""",
              """SELECT 'image', 'no_captions', NULL, count(*) FROM img i WHERE tar_path IS NOT NULL
                 AND NOT EXISTS (SELECT 1 FROM cap c WHERE c.source = i.source AND c.image_key = i.image_key)""",
              """SELECT 'caption', 'no_image', NULL, count(*) FROM cap c WHERE NOT EXISTS
                 (SELECT 1 FROM img i WHERE i.source = c.source AND i.image_key = c.image_key AND i.tar_path IS NOT NULL)""",
              "SELECT 'caption', drop_reason, NULL, count(*) FROM cj WHERE drop_reason IS NOT NULL GROUP BY drop_reason",
              # the images of an evaluation benchmark and their captions (storage.build_plan.exclude_benchmark_images)
              "SELECT 'image', 'benchmark_overlap', NULL, count(*) FROM excluded_images",
              "SELECT 'caption', 'benchmark_overlap', NULL, coalesce(sum(n_captions), 0) FROM excluded_images"]
    for i, lang in enumerate(target_langs(langs)):
        counts.append(f"SELECT 'translation', 'missing', {_sql_str(lang)}, "
                      f"count(*) FILTER (WHERE NOT {EMPTY} AND miss{i}) FROM cj")
        counts.append(f"SELECT 'translation', 'flagged_translation', {_sql_str(lang)}, "
                      f"count(*) FILTER (WHERE NOT {EMPTY} AND flag{i}) FROM cj")
    counts.append("SELECT 'image', 'all_captions_dropped', NULL, count(*) FROM "
                  "(SELECT 1 FROM cj GROUP BY source, image_key HAVING bool_and(drop_reason IS NOT NULL))")
    drops: Counter = Counter()
    for unit, reason, lang, n in con.execute(" UNION ALL ".join(counts)).fetchall():
        if n:
            drops[(unit, reason, lang or "")] += n
    return drops, [{"unit": u, "reason": r, "lang": lang or None, "count": c}
                   for (u, r, lang), c in sorted(drops.items())]


def load_translations(con, tsets, langs, dedupe: bool = False) -> dict[str, str]:
    """Per target language of ``langs``, the SQL relation of its translations (text_sha, tgt_text,
    ok, the scores, set_rank) to join the captions with.

    A language with one translation set reads its parquet parts straight into the join (nothing is
    materialised): :func:`join_captions` checks that no caption found two translations there. A
    language with several sets -- or every language, with ``dedupe`` (a text translated twice in
    one set) -- goes through the temp table ``best``, which keeps one translation per text and
    language: an ok one first, then the preferred set, then a fixed tie-break."""
    score_types = {c: _score_type(c) for c in SCORE_COLUMNS}
    rels, best_parts = {}, []
    for lang in langs:
        if lang == SOURCE_LANG:
            continue
        parts = []
        for rank, t in enumerate(tsets.get(lang, [])):
            f = "[" + ", ".join(_sql_str(x) for x in t.files) + "]"
            cols = parquet_columns(t.files)
            for need in ("text_sha", "tgt_text", "ok"):
                if need not in cols:
                    raise CCRKError(f"translation parts in {t.path} lack column {need}")
            scores = ", ".join(f"CAST({c} AS {ty}) AS {c}" if c in cols else f"NULL::{ty} AS {c}"
                               for c, ty in score_types.items())
            lang_filter = f"AND tgt_lang = {_sql_str(lang)}" if "tgt_lang" in cols else ""
            parts.append(f"SELECT CAST(text_sha AS VARCHAR) AS text_sha, {_sql_str(lang)} AS lang, "
                         f"CAST(tgt_text AS VARCHAR) AS tgt_text, coalesce(CAST(ok AS BOOLEAN), false) AS ok, "
                         f"{scores}, {rank} AS set_rank FROM read_parquet({f}, union_by_name=true) "
                         f"WHERE tgt_text IS NOT NULL {lang_filter}")
        if not parts:
            rels[lang] = ("(SELECT NULL::VARCHAR AS text_sha, NULL::VARCHAR AS tgt_text, NULL::BOOLEAN AS ok, "
                          + ", ".join(f"NULL::{ty} AS {c}" for c, ty in score_types.items())
                          + ", NULL::INTEGER AS set_rank WHERE false)")
        elif len(parts) == 1 and not dedupe:
            rels[lang] = f"({parts[0]})"
        else:
            best_parts += parts
            rels[lang] = f"(SELECT * EXCLUDE (lang) FROM best WHERE lang = {_sql_str(lang)})"
    if best_parts:
        con.execute(f"""
            CREATE OR REPLACE TEMP TABLE best AS
            SELECT * EXCLUDE (rn) FROM (
              SELECT *, row_number() OVER (PARTITION BY text_sha, lang
                                           ORDER BY (tgt_text IS NOT NULL AND ok) DESC, set_rank, tgt_text) AS rn
              FROM ({' UNION ALL '.join(best_parts)}) WHERE text_sha IN (SELECT text_sha FROM cap))
            WHERE rn = 1""")
    return rels
