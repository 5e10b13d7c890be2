"""Source adapters: official metadata -> ``images.parquet`` + ``captions.parquet`` under the source's version dir.

One module per official format (:mod:`.cc3m`, :mod:`.sbu`, :mod:`.vg`, :mod:`.coco`, :mod:`.multi30k`), each with
``detect(files)`` (which of the given files it reads), ``read(files, rejects, limit,
max_caption_chars)`` (the two arrow tables) and ``MEMBER_PATTERNS`` (archive members worth
extracting). :func:`prepare_source` resolves the metadata (paths, urls, archives), versions it by
content, reads it once and writes the tables atomically; :func:`catalog_fields` is what the catalog
keeps of the finished source (the acquire stage records it once the images are downloaded).
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from types import ModuleType

from storage import atomic, layout
from storage.errors import CCRKError
from storage.metadata import resolve_metadata
from storage.sources import cc3m, coco, multi30k, sbu, vg
from storage.sources.base import DEFAULT_MAX_CAPTION_CHARS, Rejects
from storage.versioning import CODE_VERSION, content_version, file_sha256

from storage.specs import DEFAULT_SOURCES, SOURCES  # noqa: F401 - one definition (storage.specs), re-exported
_ADAPTERS = {"cc3m": cc3m, "sbu": sbu, "vg": vg, "coco": coco, "multi30k": multi30k}
IMAGES_FILE = "images.parquet"
CAPTIONS_FILE = "captions.parquet"
SOURCE_FILE = "source.json"
CONFIG_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                           "configs", "sources.yaml")


@dataclass
class PreparedSource:
    source: str
    version: str
    directory: str
    images_path: str
    captions_path: str
    rows_read: int
    rejected: dict[str, int]
    n_images: int
    n_captions: int
    metadata_sha256: dict[str, str]
    # Extras beyond the contract: the parameters that made the version, a few rejected places per class.
    params: dict = field(default_factory=dict)
    rejected_examples: dict[str, list[str]] = field(default_factory=dict)
    fixed: dict[str, int] = field(default_factory=dict)  # records kept after a fix (base.FIX_CLASSES)


def adapter(source: str) -> ModuleType:
    if source not in SOURCES:
        raise CCRKError(f"unknown source {source!r}; choose one of {', '.join(SOURCES)}")
    return _ADAPTERS[source]


def load_config(path: str = CONFIG_PATH) -> dict:
    import yaml  # third-party: only when the sources config is read

    try:
        with open(path, encoding="utf-8") as f:
            config = yaml.safe_load(f)
    except FileNotFoundError:
        raise CCRKError(f"sources config not found: {path}") from None
    except yaml.YAMLError as exc:
        raise CCRKError(f"sources config {path} is not valid YAML: {exc}") from None
    if not isinstance(config, dict) or not isinstance(config.get("sources"), dict):
        raise CCRKError(f"sources config {path} has no 'sources' mapping")
    return config


def default_metadata(source: str, config: dict | None = None) -> list[str]:
    """The official metadata urls of ``source`` (configs/sources.yaml)."""
    config = config or load_config()
    urls = (config["sources"].get(source) or {}).get("metadata")
    if not urls:
        raise CCRKError(f"no default metadata for source {source!r} in {CONFIG_PATH}; pass --metadata")
    return list(urls)


def source_settings(source: str, config: dict, overrides: dict | None = None) -> dict:
    """The adapter's settings: configs/sources.yaml's ``sources.<source>.settings``, then ``overrides``,
    over the adapter's defaults (``{}`` for an adapter without settings)."""
    module = adapter(source)
    given = {**((config["sources"].get(source) or {}).get("settings") or {}), **(overrides or {})}
    if not hasattr(module, "check_settings"):
        if given:
            raise CCRKError(f"source {source} has no settings, got {', '.join(sorted(given))}")
        return {}
    return module.check_settings(given)


def _sha_by_name(files: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for f in files:
        name = os.path.basename(f)
        k = 2
        while name in out:
            name = f"{os.path.basename(f)}#{k}"
            k += 1
        out[name] = file_sha256(f)
    return out


def _fs_exists(path: str) -> bool:
    import fsspec  # third-party, ~80 ms to import: only for a prepared source's files

    fs, p = fsspec.core.url_to_fs(path)
    return fs.exists(p)


def _load_prepared(directory: str) -> PreparedSource:
    import fsspec  # third-party: as in _fs_exists

    with fsspec.open(layout.join(directory, SOURCE_FILE), "r", encoding="utf-8") as f:
        meta = json.load(f)
    prepared = PreparedSource(**{k: meta[k] for k in PreparedSource.__dataclass_fields__ if k in meta})
    # Paths as seen from this root (the data root may have been moved or mounted elsewhere).
    prepared.directory = directory
    prepared.images_path = layout.join(directory, IMAGES_FILE)
    prepared.captions_path = layout.join(directory, CAPTIONS_FILE)
    return prepared


def prepare_source(source: str, metadata: list[str] | None, root: str | None, *, limit: int | None = None,
                   download_params: dict | None = None,
                   max_caption_chars: int | None = None, settings: dict | None = None) -> PreparedSource:
    """Read ``source``'s metadata into ``<root>/sources/<source>/<version>/`` (images, captions, source.json).

    ``metadata``: local paths / urls of the official files or their archives; None -> the official
    urls in configs/sources.yaml. The version hashes the metadata contents (not their paths),
    ``limit``, ``max_caption_chars``, the adapter's settings (:func:`source_settings`; ``settings``
    overrides configs/sources.yaml's) and ``download_params`` (the image download settings that
    will fill the same directory). Idempotent: a complete version directory is loaded, not re-read.
    """
    module = adapter(source)
    root = layout.data_root(root)
    config = load_config()
    if limit is not None and limit < 1:
        raise CCRKError(f"--limit must be a positive number of images, got {limit}")
    max_chars = int(max_caption_chars or config.get("max_caption_chars") or DEFAULT_MAX_CAPTION_CHARS)
    specs = list(metadata) if metadata else default_metadata(source, config)
    files = resolve_metadata(specs, layout.join(root, "downloads"), keep=module.MEMBER_PATTERNS)
    picked = module.detect(files)
    if not picked:
        raise CCRKError(f"no {source} metadata among {', '.join(specs)}: expected "
                        f"{' / '.join(module.MEMBER_PATTERNS)} (see storage/sources/{source}.py)")
    sha = _sha_by_name(picked)
    adapter_settings = source_settings(source, config, settings)
    params = {"source": source, "metadata_sha256": sha, "limit": limit, "max_caption_chars": max_chars,
              "download_params": download_params or {},
              **({"settings": adapter_settings} if adapter_settings else {})}
    version = content_version("source", [], params)
    directory = layout.source_dir(root, source, version)
    images_path = layout.join(directory, IMAGES_FILE)
    captions_path = layout.join(directory, CAPTIONS_FILE)
    if all(_fs_exists(p) for p in (images_path, captions_path, layout.join(directory, SOURCE_FILE))):
        return _load_prepared(directory)

    rejects = Rejects()
    images, captions = module.read(picked, rejects, limit=limit, max_caption_chars=max_chars, **adapter_settings)
    if rejects.rows_read == 0:
        raise CCRKError(f"{source} metadata holds no records: {', '.join(picked)}")
    atomic.write_parquet(images, images_path)
    atomic.write_parquet(captions, captions_path)
    prepared = PreparedSource(
        source=source, version=version, directory=directory, images_path=images_path,
        captions_path=captions_path, rows_read=rejects.rows_read, rejected=rejects.as_dict(),
        n_images=images.num_rows, n_captions=captions.num_rows, metadata_sha256=sha, params=params,
        rejected_examples={k: v for k, v in rejects.examples.items()}, fixed=dict(rejects.fixed))
    # source.json last: its presence marks the tables complete.
    atomic.write_json(layout.join(directory, SOURCE_FILE),
                      {**asdict(prepared), "metadata": specs, "metadata_files": picked,
                       "code_version": CODE_VERSION})
    return prepared


def catalog_fields(prepared: PreparedSource, stats: dict | None = None) -> tuple[dict, dict]:
    """What the catalog records of the source (kind ``source``, name = source): its params and stats.

    ``stats``: the acquire summary (images ok, failures, bytes, ...) merged over the read counts.
    Writes nothing: the acquire stage's entry is written by :func:`storage.stage.run_stage`.
    """
    read_stats = {"rows_read": prepared.rows_read, "rejected": prepared.rejected, "fixed": prepared.fixed,
                  "n_images": prepared.n_images, "n_captions": prepared.n_captions}
    params = prepared.params or {"source": prepared.source, "metadata_sha256": prepared.metadata_sha256}
    return params, {**read_stats, **(stats or {})}
