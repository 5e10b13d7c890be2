"""Content-derived versions: one place for how artifacts are hashed.

version = sha256 over (kind, the parents' versions, the parameters, the code version),
canonical JSON, shortened to 16 hex digits. Same inputs -> same version -> the stage skips.

Captions are keyed by :func:`text_sha` of :func:`normalize` (the one normalisation of English
captions before translation): the translation stage stores its rows under that key and the build
finds them by it. :func:`match_key` is looser, for joining another release's English (CCLM's, UC2's)
to the sources' captions; it never keys the store.
"""
from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from typing import Any, Iterable

from storage import layout
from storage.sidecar import cached_beside

# Bump CODE_VERSION when a stage's output bytes change for the same inputs.
CODE_VERSION = "1"
VERSION_LEN = 16
# A word of match_key: letters and digits, with their combining marks (casefold("İ") is i + U+0307).
_WORD = re.compile(r"(?:[^\W_]|[\u0300-\u036f])+")


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def content_version(kind: str, parents: Iterable[str] = (), params: dict | None = None,
                    code_version: str = CODE_VERSION) -> str:
    payload = {"kind": kind, "parents": sorted(parents), "params": params or {}, "code": code_version}
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()[:VERSION_LEN]


def normalize(text: str | None) -> str:
    """The one normalisation of English captions before translation (its output is what
    :func:`text_sha` hashes): Unicode NFC, runs of whitespace collapsed to one space, stripped
    ('' for None)."""
    if text is None:
        return ""
    return " ".join(unicodedata.normalize("NFC", str(text)).split())


def match_key(text: str | None) -> str:
    """A looser key than :func:`normalize`, to find one release's English caption among another's:
    Unicode NFKC, case folded, its words (runs of letters and digits) one space apart: so case,
    spacing, punctuation and quotes (straight or curly) do not count ("A dog, running." and
    "a dog running" meet). CCLM's caption cleaning (lower case, punctuation to spaces) keeps the key.
    '' for None or a text without words."""
    if text is None:
        return ""
    return " ".join(_WORD.findall(unicodedata.normalize("NFKC", str(text)).casefold()))


def text_sha(text: str) -> str:
    """sha256 of an already-normalised text (the translation store's key)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def file_sha256(path: str, chunk: int = 1 << 20) -> str:
    import fsspec  # third-party, ~80 ms to import: only when a file is hashed

    h = hashlib.sha256()
    with fsspec.open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def files_sha256(paths: Iterable[str], cached: bool = False) -> str:
    """One digest over several files' digests (order-independent). ``cached`` (local files): each
    file's digest is kept beside it (:func:`storage.sidecar.cached_beside`) and read back while the
    file is unchanged -- a build reads its translation parts' bytes once, not on every run."""
    if cached:
        digest = lambda p: cached_beside(p, "sha256", file_sha256) if layout.is_local(p) else file_sha256(p)  # noqa: E731
    else:
        digest = file_sha256
    digests = sorted(digest(p) for p in paths)
    return hashlib.sha256("".join(digests).encode()).hexdigest()
