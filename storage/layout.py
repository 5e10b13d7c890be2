"""Where every artifact lives under the data root: one place for the path layout.

Paths are fsspec-style strings (``./data``, ``/abs/dir``, ``s3://bucket/prefix``); local paths
are made absolute so that worker processes agree on them.

Every name that becomes a path component below the root (a dataset's name and version, a source's,
a translation store's model id, decode id and language, a run or report id) must be a plain name
(:func:`check_name`): the specs check the names users give, and the path builders here refuse any
other component, as a last line of defence, so that nothing names a place outside the root.
"""
from __future__ import annotations

import os
import re

from storage.errors import CCRKError, shown

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


MAX_NAME = 255  # bytes of one path component on common file systems (names are ASCII)
_PLAIN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# A path component made here: a plain name, or a model id with a colon (``import:NAME``).
_COMPONENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]*")
NAME_RULE = "letters, digits, '-', '_' and '.', starting with a letter or digit, no slash"


def is_plain_name(value) -> bool:
    """Whether ``value`` is a plain name: letters, digits, '-', '_', '.', starting with a letter or
    digit (so never ``.``, ``..``, a hidden file or a path), at most :data:`MAX_NAME` characters."""
    return isinstance(value, str) and len(value) <= MAX_NAME and _PLAIN.fullmatch(value) is not None


def check_name(value, what: str) -> str:
    """``value`` if it is a plain name (:func:`is_plain_name`), else a CCRKError of one line naming
    ``what`` it is (``dataset name``, ``source version``...)."""
    if not is_plain_name(value):
        raise CCRKError(f"{what + ' ' if what else ''}{shown(value)} is not a plain name ({NAME_RULE}, at most "
                        f"{MAX_NAME} characters)")
    return value


def _component(value, what: str, root: str) -> str:
    if not (isinstance(value, str) and len(value) <= MAX_NAME and _COMPONENT.fullmatch(value)):
        raise CCRKError(f"{what} {shown(value)} is not a plain name ({NAME_RULE}): refused as a path under {root}")
    return value


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
    return join(root, "sources", _component(source, "source", root), _component(version, "source version", root))


def translation_dir(root: str, model_id: str, decode_id: str, lang: str) -> str:
    return join(root, "translations", _component(model_id, "translation model id", root),
                _component(decode_id, "decode id", root), _component(lang, "language", root))


def dataset_dir(root: str, name: str, version: str) -> str:
    return join(root, "datasets", _component(name, "dataset name", root),
                _component(version, "dataset version", root))


def run_dir(root: str, run_id: str) -> str:
    return join(root, "runs", _component(run_id, "run id", root))


def report_dir(root: str, report_id: str) -> str:
    return join(root, "reports", _component(report_id, "report id", root))


def exclusion_dir(root: str, benchmark: str, version: str) -> str:
    """``<root>/exclusions/<benchmark>/<version>``: a benchmark's exclusion list (ccrk.evaluation.exclusion)."""
    return join(root, "exclusions", _component(benchmark, "benchmark", root),
                _component(version, "exclusion version", root))


def catalog_path(root: str) -> str:
    return join(root, "catalog.duckdb")
