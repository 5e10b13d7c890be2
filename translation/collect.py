"""The English texts to translate: captions of acquired sources, normalised and deduplicated.

Sources come from the catalog (kind ``source``): the latest version of each source by default,
or the names/versions given (``coco``, ``coco@<version>``, or a version alone).
:func:`covered_texts` gives the unique captions of the sources an import names, to match it against.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import pyarrow.parquet as pq

from storage import layout
from storage.catalog import Artifact, Catalog
from storage.errors import CCRKError
from storage.versioning import normalize, text_sha


@dataclass
class Collected:
    texts: dict[str, str] = field(default_factory=dict)  # text_sha -> normalised text, first seen order
    captions: int = 0
    empty: int = 0
    sources: list[Artifact] = field(default_factory=list)


def select_sources(root: str | None, wanted: list[str] | None = None) -> list[Artifact]:
    """Source artifacts: ``wanted`` items are ``name``, ``name@version`` or a version (prefix)."""
    catalog = Catalog(layout.data_root(root))
    recorded = catalog.list("source")
    if not wanted:
        latest: dict[str, Artifact] = {}
        for art in recorded:  # ordered by created_at: the last one wins
            latest[art.name] = art
        if not latest:
            raise CCRKError(f"no acquired sources in the catalog {catalog.path}; run `ccrk acquire` first")
        return [latest[name] for name in sorted(latest)]
    chosen = []
    for item in wanted:
        name, _, version = item.partition("@")
        if version:
            art = next((a for a in recorded if a.name == name and a.version.startswith(version)), None)
        else:
            art = catalog.latest("source", name) or catalog.find(name)
            if art is not None and art.kind != "source":
                art = None
        if art is None:
            known = sorted({a.name for a in recorded})
            raise CCRKError(f"source {item!r} is not in the catalog {catalog.path}; "
                            f"acquired sources: {', '.join(known) or 'none'}")
        chosen.append(art)
    return chosen


def _captions(art: Artifact) -> list:
    path = os.path.join(art.path, "captions.parquet")
    if not os.path.isfile(path):
        raise CCRKError(f"source {art.name} {art.version}: missing {path}")
    return pq.read_table(path, columns=["caption"]).column("caption").to_pylist()


def collect_texts(root: str | None, wanted: list[str] | None = None) -> Collected:
    """Normalised unique English captions of the selected sources (empty ones counted, not kept)."""
    out = Collected(sources=select_sources(root, wanted))
    for art in out.sources:
        for caption in _captions(art):
            out.captions += 1
            text = normalize(caption)
            if not text:
                out.empty += 1
                continue
            out.texts.setdefault(text_sha(text), text)
    return out


def source_texts(art: Artifact) -> dict[str, str]:
    """One source's unique normalised English captions: text_sha -> text, first seen order."""
    texts: dict[str, str] = {}
    for caption in _captions(art):
        text = normalize(caption)
        if text:
            texts.setdefault(text_sha(text), text)
    return texts


def covered_texts(collected: Collected, names: list[str], what: str) -> dict[str, dict[str, str]]:
    """``{name@version: source_texts}`` of the collected sources called ``names`` (``what``, e.g. an
    import, for the error when one of them is not among the sources this run reads)."""
    by_name = {a.name: a for a in collected.sources}
    missing = [n for n in names if n not in by_name]
    if missing:
        raise CCRKError(f"{what} covers source {', '.join(missing)}, which this run does not read "
                        f"(its sources: {', '.join(sorted(by_name)) or 'none'})")
    return {f"{by_name[n].name}@{by_name[n].version}": source_texts(by_name[n]) for n in dict.fromkeys(names)}
