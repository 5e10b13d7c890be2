"""The data stages' settings: ``ccrk acquire`` (:class:`AcquireSpec`, and the reproduce YAML's
``acquire:`` section :class:`AcquireChainSpec`), ``ccrk build`` (:class:`BuildSpec`) and the demo
corpus of ``ccrk reproduce`` (:class:`CorpusSpec`). Each default is written here once; see
:mod:`storage.spec` for the conventions (versioned vs setting fields, one-line errors).
"""
from __future__ import annotations

from typing import Literal

from pydantic import field_validator, model_validator

from storage.addresses import ALLOW_ENV, parse_pair
from storage.download import DEFAULT_FETCH_DEADLINE, DEFAULT_MAX_IMAGE_AREA, DEFAULT_MAX_IMAGE_BYTES
from storage.spec import Bool, Lang, Name, Spec, SpecError, setting, versioned

# The web-crawled pre-training sources (what a build joins and reproduce acquires by default), then
# Multi30K, whose images come from a local folder (storage.sources re-exports both).
DEFAULT_SOURCES = ("cc3m", "sbu", "vg", "coco")
SOURCES = (*DEFAULT_SOURCES, "multi30k")
LOCAL_IMAGE_SOURCES = ("multi30k",)
EXECUTORS = ("local", "ray")
RESIZE_MODES = ("no", "keep_ratio", "center_crop", "border", "keep_ratio_largest")

# How a build matches a source image to a benchmark's (storage.exclusion), in the order an image
# matched several ways is attributed: an id (COCO, Flickr), the url, the bytes' sha256, the pHash.
MATCH_KINDS = ("id", "url", "sha256", "phash")

Source = Literal[SOURCES]
WebSource = Literal[DEFAULT_SOURCES]
Executor = Literal[EXECUTORS]


class AcquireSettings(Spec):
    """What ``acquire_flow`` takes besides the source and its metadata: the download settings."""

    limit: int | None = versioned(None, "read at most N images", ge=1, shown="all")
    image_size: int = versioned(256, "side of the stored images (pixels)", ge=1)
    resize_mode: Literal[RESIZE_MODES] = versioned("border", "img2dataset resize mode")
    resize_only_if_bigger: Bool = versioned(False, "resize only images larger than image_size")
    processes: int = setting(1, "download processes (from a mirror or a folder: resize processes)", ge=1)
    thread_count: int = setting(16, "download threads per process", ge=1)
    timeout: int = setting(10, "seconds before a request times out", ge=1)
    fetch_deadline: int = setting(DEFAULT_FETCH_DEADLINE, "seconds for one image's whole fetch (timeout bounds "
                                  "each read); a slower host fails as deadline_exceeded", ge=1)
    max_image_bytes: int = setting(DEFAULT_MAX_IMAGE_BYTES, "bytes of one image's body read at most; a longer one "
                                   "fails as too_many_bytes", ge=1)
    allow_addresses: list[str] | None = setting(None, "exact HOST:PORT pairs fetched from though not public "
                                                "(loopback, private, link-local...: refused as blocked_address "
                                                f"otherwise); also {ALLOW_ENV}, comma-separated",
                                                shown="none: public addresses only")
    retries: int = setting(0, "img2dataset retries per url", ge=0)
    retry_failed: Bool = setting(False, "download again the images that failed with retryable errors "
                                        "(timeouts, 5xx, connection) or that a mirror lacked")
    number_sample_per_shard: int = versioned(10_000, "images per shard", ge=1)
    max_image_area: int = versioned(DEFAULT_MAX_IMAGE_AREA, "larger images (pixels) are rejected as too_large",
                                    ge=1)
    encode_quality: int = versioned(95, "JPEG quality of the stored images", ge=1, le=100)
    executor: Executor = setting("local", "local: download processes on this machine; ray: one Ray task per shard")
    ray_address: str | None = setting(None, "with executor ray: a running cluster (HOST:PORT, ray://HOST:10001 or "
                                            "auto)", shown="a local cluster for this run")

    @field_validator("allow_addresses")
    @classmethod
    def _exact_pairs(cls, value):
        for pair in value or ():
            parse_pair(pair, "allow_addresses")
        return value

    def download_params(self) -> dict:
        """The download settings that are part of the source version (``prepare_source``'s
        ``download_params``): every versioned setting but ``limit``, which it hashes on its own."""
        return {k: v for k, v in self.version_params().items() if k in AcquireSettings.version_fields()
                and k != "limit"}


class AcquireSpec(AcquireSettings):
    """``ccrk acquire`` / ``acquire_flow``: one source."""

    source: Source = versioned(description="which dataset's metadata format")
    metadata: list[str] | None = versioned(None, "official metadata files or archives, local or http(s)",
                                           shown="the official urls of configs/sources.yaml")
    # Where the images come from, not what they are: not part of the source version (storage.mirror).
    from_webdataset: list[str] | None = setting(
        None, "a WebDataset mirror of the images ({key}.jpg/.txt/.json tars; a folder, tar, glob or brace range; "
              "local, hf://datasets/... or s3://...), matched to the metadata by url; with retry_failed it fills "
              "only the images the download lost", shown="none: download from the web")
    images: str | None = setting(None, "the folder of the source's image files (multi30k: flickr30k-images)",
                                 shown="none: the source's urls")

    @model_validator(mode="after")
    def _ray_address_needs_ray(self):
        if self.ray_address and self.executor != "ray":
            raise ValueError("ray_address needs executor: ray")
        return self

    @model_validator(mode="after")
    def _images_from_one_place(self):
        local = self.source in LOCAL_IMAGE_SOURCES
        if local and not self.images:
            raise ValueError(f"source {self.source} has no image urls: pass images (--images DIR)")
        if self.images and not local:
            raise ValueError(f"images (--images) is for {', '.join(LOCAL_IMAGE_SOURCES)}; source {self.source} "
                             f"downloads its urls")
        if local and self.from_webdataset:
            raise ValueError(f"source {self.source} reads its images from a folder (--images), not a mirror")
        return self


class AcquireChainSpec(AcquireSettings):
    """The reproduce YAML's ``acquire:`` section: the same settings for several sources."""

    sources: list[Source] = versioned(default_factory=lambda: list(DEFAULT_SOURCES),
                                      description="sources to acquire")
    metadata: dict[Source, list[str]] = versioned(default_factory=dict, description="per source: local metadata "
                                                  "files instead of the official urls")
    images: dict[Source, str] = setting(default_factory=dict, description="per source: the folder of its image "
                                        "files (multi30k: flickr30k-images)")
    from_webdataset: dict[WebSource, list[str]] = setting(default_factory=dict, description="per source: a "
                                                          "WebDataset mirror of its images (as ccrk acquire "
                                                          "--from-webdataset)")

    @field_validator("from_webdataset", mode="before")
    @classmethod
    def _one_mirror(cls, value):
        return {k: [v] if isinstance(v, str) else v for k, v in value.items()} if isinstance(value, dict) else value

    def for_source(self, source: str, metadata: list[str] | None = None, images: str | None = None,
                   **changes) -> AcquireSpec:
        """The :class:`AcquireSpec` of one source: ``metadata`` and ``images`` (e.g. the demo corpus's)
        else this section's files and image folder for it, and its mirror if the section names one;
        ``changes``: fields to set (e.g. the chain's executor)."""
        per_source = ("sources", "metadata", "images", "from_webdataset")
        values = {k: v for k, v in self.to_config(defaults=False).items() if k not in per_source}
        return AcquireSpec.parse({**values, **changes, "source": source,
                                  "metadata": metadata or self.metadata.get(source),
                                  "images": images or self.images.get(source),
                                  "from_webdataset": self.from_webdataset.get(source)})


class ExcludeBenchmark(Spec):
    """A benchmark whose evaluation images a build keeps out (an entry of ``build.exclude``; ``ccrk
    build --exclude-benchmark``): its files as ``ccrk evaluate`` reads them. Its exclusion list is
    made from them before the build (ccrk.evaluation.exclusion; the build itself reads lists only)."""

    benchmark: Name = versioned(description="benchmark name (xflickrco, multi30k, coco, wit, demo)")
    data: str | None = versioned(None, "benchmark folder, as ccrk evaluate --data",
                                 shown="in ccrk reproduce: the demo benchmark")
    images: str | None = versioned(None, "image folder, as ccrk evaluate --images", shown="<data>/images")
    coco_images: str | None = versioned(None, "COCO val2014 folder (xFlickrCO's COCO half)")


class BuildSpec(Spec):
    """``ccrk build`` / ``build_flow``: the K-lingual dataset (inputs, language policy, sharding,
    the evaluation images kept out)."""

    # Names and languages become directories under the root: plain names and language codes only.
    name: Name = setting("default", "dataset name (directory under datasets/)")
    sources: list[Name] = versioned(default_factory=lambda: list(DEFAULT_SOURCES), description="sources to join")
    langs: list[Lang] = versioned(default_factory=lambda: ["en", "es", "id", "ru", "tr"],
                                 description="languages of every caption", min_length=1)
    min_langs: int | None = versioned(None, "keep a caption with at least N of the languages", ge=1,
                                      shown="all of them")
    drop_flagged: Bool = versioned(False, "remove translations whose quality flag ok is false")
    shard_size: int = versioned(1000, "samples per shard", ge=1)
    seed: int = versioned(0, "seed of the sample order")
    source_versions: dict[Name, Name] | None = versioned(None, "source versions to use instead of the catalog's "
                                                       "latest", shown="the latest of each")
    translations: list[str] | None = versioned(None, "only these translation sets (MODEL_ID/DECODE_ID), in this "
                                               "priority order", shown="all")
    exclude: list[str | ExcludeBenchmark] | None = versioned(
        None, "evaluation images kept out of the dataset: exclusion lists (parquet files, their folders or "
              "catalog versions), or benchmarks (entries with benchmark, data, images; in ccrk reproduce also "
              "protocol: every benchmark of the protocol section); versioned by the lists' contents",
        shown="none")
    exclude_kinds: list[Literal[MATCH_KINDS]] = versioned(
        default_factory=lambda: list(MATCH_KINDS), description="how a source image is matched to an excluded "
        "one: id (COCO / Flickr ids), url, sha256 (the downloaded bytes), phash (re-encoded or resized copies)")
    exclude_phash_distance: int = versioned(8, "a pHash match: at most this many of the 64 bits differ", ge=0, le=16)
    shards_per_task: int = setting(16, "shards written by one Prefect task", ge=1)
    memory: str | None = setting(None, "DuckDB's memory limit while planning, e.g. 8GB",
                                 shown="CCRK_BUILD_MEMORY, else a third of RAM")

    @field_validator("exclude", mode="before")
    @classmethod
    def _exclude_entries(cls, value):
        """One entry alone is a list of one; a mapping is a benchmark entry (its own errors, one line)."""
        entries = [value] if isinstance(value, (str, dict)) else value
        if not isinstance(entries, list):
            return entries
        out = []
        for i, entry in enumerate(entries):
            if isinstance(entry, dict):
                try:
                    entry = ExcludeBenchmark.parse(entry)
                except SpecError as exc:
                    raise ValueError(f"entry {i}: {exc}") from None
            out.append(entry)
        return out


class CorpusSpec(Spec):
    """The reproduce YAML's ``corpus:`` section: the embedded demo's synthetic corpus."""

    seed: int = versioned(0, "seed of the synthetic corpus")
    n_train: int = versioned(400, "training images, split evenly over the four source formats", ge=1)
    n_heldout: int = versioned(100, "images of the demo benchmark", ge=0)
    port: int = versioned(0, "loopback port of the corpus server (fixed: the metadata urls, and so the source "
                             "versions, stay the same)", ge=0, le=65535, shown="a free port")


_BUILD_LIST_FIELDS = ("sources", "langs", "translations", "exclude_kinds")


def build_spec(spec: BuildSpec | dict | None = None, **fields) -> BuildSpec:
    """``spec`` (a :class:`BuildSpec`, its dict or None) with ``fields`` set over it; a list field may
    come as comma-separated text (``langs="en,es"``), as on the command line."""
    listed = {k: [p.strip() for p in v.split(",") if p.strip()] if k in _BUILD_LIST_FIELDS and isinstance(v, str)
              else v for k, v in fields.items()}
    base = BuildSpec.parse(spec).to_config(defaults=False)
    return BuildSpec.parse({**base, **listed})
