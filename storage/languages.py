"""Language codes used across the pipeline: one place for this fact, and for what a code may be.

A code is BCP-47-like and written lower case, as the paper's ISO 639-1 codes are: a 2-3 letter
language, optionally a 4-letter script and a 2-letter or 3-digit region (``en``, ``zh-hans``,
``pt-br``, ``es-419``). BCP-47 tags are case-insensitive, so ``zh-Hans`` and ``pt-BR`` are taken and
stored as ``zh-hans`` and ``pt-br``. A code becomes a directory (``translations/.../<lang>/``), a
file (``data/<lang>.parquet``) and a column name, so anything else -- ``../x``, ``a/b``, an empty
string, a control character -- is refused by :func:`check_lang` wherever a code enters (the
command line, a config, an imported file's keys, a manifest).
"""
from __future__ import annotations

import re

from storage.errors import CCRKError, shown

# ISO 639-1 codes of the paper's ten languages, in the paper's order.
CCR6 = ("en", "de", "fr", "cs", "ja", "zh")
CCR10 = CCR6 + ("es", "id", "ru", "tr")
# Languages our M2M-100 stage produces (the other CCR10 ones come from imported translations).
TRANSLATED = ("es", "id", "ru", "tr")
SOURCE_LANG = "en"

CYRILLIC = frozenset({"ru", "uk", "bg", "be", "sr", "mk", "kk"})
LATIN = frozenset({"en", "es", "id", "tr", "de", "fr", "cs", "it", "pt", "nl", "pl", "ro", "sv", "vi"})

LANG_PATTERN = re.compile(r"[a-z]{2,3}(?:-[a-z]{4})?(?:-(?:[a-z]{2}|[0-9]{3}))?")
LANG_RULE = "a BCP-47-like code: 2-3 letters, then optionally a 4-letter script and a region, as en, zh-hans, pt-br"


def normalise_lang(code) -> str | None:
    """``code`` as stored (stripped, lower case) if it is a language code, else None."""
    if not isinstance(code, str):
        return None
    value = code.strip().lower()
    return value if LANG_PATTERN.fullmatch(value) else None


def check_lang(code, where: str = "") -> str:
    """``code`` as stored (stripped, lower case); a CCRKError of one line, prefixed by ``where``
    (the option, file or key it came from), when it is not a language code."""
    value = normalise_lang(code)
    if value is None:
        raise CCRKError(f"{where + ': ' if where else ''}{shown(code)} is not a language code ({LANG_RULE})")
    return value


def parse_langs(value: str | list[str] | tuple[str, ...], where: str = "languages") -> tuple[str, ...]:
    """Parse 'en,es,id' (or a list) into a tuple of checked, lower-case codes, order kept, duplicates
    removed; empty items are ignored, anything else that is no language code is a CCRKError."""
    items = value.split(",") if isinstance(value, str) else list(value)
    out: list[str] = []
    for item in items:
        if isinstance(item, str) and not item.strip():
            continue
        code = check_lang(item, where)
        if code not in out:
            out.append(code)
    return tuple(out)


def expected_script(lang: str) -> str | None:
    """'cyrillic', 'latin' or None (no check) for a language code (``pt-br``: as ``pt``)."""
    lang = lang.split("-", 1)[0]
    if lang in CYRILLIC:
        return "cyrillic"
    if lang in LATIN:
        return "latin"
    return None
