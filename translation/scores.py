"""Quality scores of one translation and the per-language ``ok`` flag (thresholds: ``translation.spec.Thresholds``).

- ``uniformity``: 1 - unique/total words of the target (TD-MML's repetition measure);
- ``copy_sim``: character similarity of target to source (copied-through English);
- ``len_ratio``: target / source characters;
- ``script_ok``: enough of the target's letters are in the language's script (Cyrillic for ru,
  Latin for es/id/tr; no check for languages without an expected script);
- ``empty``, ``truncated``.
"""
from __future__ import annotations

import difflib
import unicodedata
from functools import lru_cache

from storage.languages import expected_script
from translation.spec import Thresholds


@lru_cache(maxsize=None)
def _default_thresholds(lang: str) -> dict:
    return Thresholds().for_lang(lang)


def thresholds(lang: str, config: Thresholds | None = None) -> dict:
    """``lang``'s thresholds: ``config`` (a spec's ``thresholds``) or the defaults."""
    return config.for_lang(lang) if config is not None else dict(_default_thresholds(lang))


def uniformity(text: str) -> float:
    words = text.split()
    return 1.0 - len(set(words)) / len(words) if words else 0.0


def copy_sim(source: str, target: str) -> float:
    if not source or not target:
        return 0.0
    return difflib.SequenceMatcher(None, source.lower(), target.lower(), autojunk=False).ratio()


def script_share(text: str, script: str) -> float:
    """Share of the letters of ``text`` whose Unicode name starts with ``script`` (1.0 without letters)."""
    letters = [c for c in text if c.isalpha()]
    if not letters:
        return 1.0
    prefix = script.upper()
    return sum(unicodedata.name(c, "").startswith(prefix) for c in letters) / len(letters)


def score(source: str, target: str, lang: str, truncated: bool = False, config: Thresholds | None = None) -> dict:
    """The score columns of one stored row, ``ok`` included."""
    t = thresholds(lang, config)
    script = expected_script(lang)
    row = {
        "uniformity": uniformity(target),
        "copy_sim": copy_sim(source, target),
        "len_ratio": len(target) / max(1, len(source)),
        "script_ok": script is None or script_share(target, script) >= t["min_script_share"],
        "empty": not target.strip(),
        "truncated": bool(truncated),
    }
    row["ok"] = bool(not row["empty"] and not row["truncated"] and row["script_ok"]
                     and row["uniformity"] <= t["max_uniformity"] and row["copy_sim"] <= t["max_copy_sim"]
                     and t["min_len_ratio"] <= row["len_ratio"] <= t["max_len_ratio"])
    return row
