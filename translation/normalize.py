"""The one normalisation of English captions before translation: its output is what ``text_sha`` hashes."""
from __future__ import annotations

import unicodedata


def normalize(text: str | None) -> str:
    """Unicode NFC, runs of whitespace collapsed to one space, stripped ('' for None)."""
    if text is None:
        return ""
    return " ".join(unicodedata.normalize("NFC", str(text)).split())
