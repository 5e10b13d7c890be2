"""Where every artifact lives under the data root: one place for the path layout.

Paths are fsspec-style strings (``./data``, ``/abs/dir``, ``s3://bucket/prefix``); local paths
are made absolute so that worker processes agree on them.
"""
from __future__ import annotations

import os

DEFAULT_ROOT = "./data"
ROOT_ENV = "CCRK_ROOT"


def data_root(root: str | os.PathLike | None = None) -> str:
    """The data root: the argument, else $CCRK_ROOT, else ./data (made absolute when local)."""
    value = str(root) if root else os.environ.get(ROOT_ENV) or DEFAULT_ROOT
    if "://" in value and not value.startswith("file://"):
        return value.rstrip("/")
    if value.startswith("file://"):
        value = value[len("file://"):]
    return os.path.abspath(os.path.expanduser(value))


def join(*parts: str) -> str:
    return "/".join(str(p).rstrip("/") if i == 0 else str(p).strip("/") for i, p in enumerate(parts))


def is_local(path: str) -> bool:
    return "://" not in path or path.startswith("file://")


def rooted(root: str, path: str) -> str:
    """``path`` as records name it: relative to ``root`` when it lies under it (so that a root
    moved, copied or mounted elsewhere keeps its records valid, and the same inputs give the same
    versions on every machine), otherwise absolute (remote paths as given)."""
    if not (is_local(root) and is_local(path)):
        return path
    absolute = os.path.abspath(path)
    rel = os.path.relpath(absolute, root)
    return absolute if rel in (os.curdir, os.pardir) or rel.startswith(os.pardir + os.sep) else rel


def source_dir(root: str, source: str, version: str) -> str:
    return join(root, "sources", source, version)


def translation_dir(root: str, model_id: str, decode_id: str, lang: str) -> str:
    return join(root, "translations", model_id, decode_id, lang)


def dataset_dir(root: str, name: str, version: str) -> str:
    return join(root, "datasets", name, version)


def run_dir(root: str, run_id: str) -> str:
    return join(root, "runs", run_id)


def report_dir(root: str, report_id: str) -> str:
    return join(root, "reports", report_id)


def catalog_path(root: str) -> str:
    return join(root, "catalog.duckdb")
