"""Content-derived versions: one place for how artifacts are hashed.

version = sha256 over (kind, the parents' versions, the parameters, the code version),
canonical JSON, shortened to 16 hex digits. Same inputs -> same version -> the stage skips.

Captions are keyed by :func:`text_sha` of :func:`normalize` (the one normalisation of English
captions before translation): the translation stage stores its rows under that key and the build
finds them by it.
"""
from __future__ import annotations

import hashlib
import json
import unicodedata
from typing import Any, Iterable

from storage import layout
from storage.sidecar import cached_beside

# Bump CODE_VERSION when a stage's output bytes change for the same inputs.
CODE_VERSION = "1"
VERSION_LEN = 16


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
