"""Shared fixtures of the translation tests: acquired sources written directly in the contract layout."""
from __future__ import annotations

import os

import pyarrow as pa

from storage import atomic, layout
from storage.catalog import Artifact, Catalog
from storage.versioning import content_version


def write_source(root: str, name: str, captions: list[str], tag: str = "v1") -> Artifact:
    """``sources/<name>/<version>/captions.parquet`` + a catalog record of kind ``source``."""
    version = content_version("source", [], {"name": name, "tag": tag, "n": len(captions)})
    directory = layout.source_dir(root, name, version)
    keys = [f"{name}-{i}" for i in range(len(captions))]
    atomic.write_parquet(pa.table({"image_key": keys, "caption_id": [str(i) for i in range(len(captions))],
                                   "caption": captions}), os.path.join(directory, "captions.parquet"))
    return Catalog(root).record(Artifact(version=version, kind="source", name=name, path=directory))
