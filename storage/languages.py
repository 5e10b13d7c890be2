"""Language codes used across the pipeline: one place for this fact."""

# ISO 639-1 codes of the paper's ten languages, in the paper's order.
CCR6 = ("en", "de", "fr", "cs", "ja", "zh")
CCR10 = CCR6 + ("es", "id", "ru", "tr")
# Languages our M2M-100 stage produces (the other CCR10 ones come from imported translations).
TRANSLATED = ("es", "id", "ru", "tr")
SOURCE_LANG = "en"

CYRILLIC = frozenset({"ru", "uk", "bg", "be", "sr", "mk", "kk"})
LATIN = frozenset({"en", "es", "id", "tr", "de", "fr", "cs", "it", "pt", "nl", "pl", "ro", "sv", "vi"})


def parse_langs(value: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """Parse 'en,es,id' (or a list) into a tuple of lower-case codes, order kept, duplicates removed."""
    items = value.split(",") if isinstance(value, str) else list(value)
    out: list[str] = []
    for item in items:
        code = item.strip().lower()
        if code and code not in out:
            out.append(code)
    return tuple(out)


def expected_script(lang: str) -> str | None:
    """'cyrillic', 'latin' or None (no check) for a language code."""
    if lang in CYRILLIC:
        return "cyrillic"
    if lang in LATIN:
        return "latin"
    return None
