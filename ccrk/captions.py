"""Caption normalisation as the authors' code applies it before tokenising (CCLM / CCRk ``pre_caption``).

The behaviour, checked against the reference's own outputs by tests/test_parity_pre_caption.py:

- ``str.lower()`` (Unicode-aware: "İ" becomes "i" + U+0307, a final capital sigma becomes "ς");
- each of ``, . ' ! ? " ( ) * # : ; ~`` and ``-`` ``/`` becomes a space; then "<person>" becomes
  "person" (so "<PERSON>" too, since lowering comes first); other symbols, emoji and full-width
  punctuation (。，！) are kept;
- every run of two or more whitespace characters (any Unicode whitespace: tab, newline, NBSP,
  U+3000) becomes one space, while a single tab, newline or NBSP stays as it is;
- trailing newlines, then leading and trailing spaces, are removed;
- only the first ``max_words`` words are kept, words being split on " " alone (text without spaces,
  such as Chinese or Japanese, is one word and never truncated);
- an empty result is an :class:`EmptyCaptionError`, which callers count as a skipped caption.
"""
from __future__ import annotations

import re

from storage.errors import CCRKError

# Characters the reference turns into spaces (its punctuation class plus hyphen and slash): each maps
# to one space, so a single translation table gives the same text as replacing them in turn.
_TO_SPACE = str.maketrans({c: " " for c in ",.'!?\"()*#:;~-/"})
# Python's \s is Unicode whitespace for str patterns, as in the reference.
_WHITESPACE_RUN = re.compile(r"\s{2,}")


class EmptyCaptionError(CCRKError, ValueError):
    """A caption that normalisation leaves empty (the reference raises ValueError for it)."""


def pre_caption(text: str, max_words: int) -> str:
    """``text`` normalised as the reference's ``pre_caption(text, max_words)``; raises EmptyCaptionError if empty."""
    # "<person>" holds none of the mapped characters, so replacing it after the table matches the reference order.
    out = text.lower().translate(_TO_SPACE).replace("<person>", "person")
    out = _WHITESPACE_RUN.sub(" ", out).rstrip("\n").strip(" ")
    words = out.split(" ")
    if len(words) > max_words:
        out = " ".join(words[:max_words])
    if not out:
        raise EmptyCaptionError(f"caption {text!r} is empty after pre_caption normalisation")
    return out
