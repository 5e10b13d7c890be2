"""Prefect flow for ``ccrk acquire``: prepare the metadata, download the images, summarise and record.

Thin: one task per sub-job (never one per url). :mod:`storage.sources` turns the official metadata
into ``images.parquet`` + ``captions.parquet``; :mod:`storage.download` runs img2dataset into shards
(resumable, ``retry_failed``); the summary goes to ``summary.json``, a Prefect table artifact and the
catalog. The settings are an :class:`storage.specs.AcquireSpec` (or its dict); callable from
Python: ``acquire_flow({"source": "coco", "metadata": ["captions_val2017.json"]}, root="data")``.
"""
from __future__ import annotations

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from flows.artifacts import publish_link, publish_table
from flows.executors import check_executor, ray_cluster
from storage.download import download_images
from storage.sources import prepare_source, record_source
from storage.specs import AcquireSpec

# The download settings img2dataset runs with (AcquireSpec's fields; thread_count as it names it).
DOWNLOAD_SETTINGS = ("image_size", "resize_mode", "resize_only_if_bigger", "processes", "thread_count", "timeout",
                     "retries", "retry_failed", "number_sample_per_shard", "max_image_area", "encode_quality")


@task(name="prepare-metadata", cache_policy=NO_CACHE)
def prepare_task(source: str, metadata: list[str] | None, root: str | None, limit: int | None,
                 download_params: dict):
    return prepare_source(source, metadata, root, limit=limit, download_params=download_params)


@task(name="download-images", cache_policy=NO_CACHE)
def download_task(prepared, settings: dict, ray_address: str | None = None) -> dict:
    """img2dataset's Ray distributor (``settings["distributor"] == "ray"``) runs on the Ray cluster at
    ``ray_address`` (or a local one), joined or started only when there is something to download."""
    cluster = (lambda: ray_cluster(ray_address)) if settings["distributor"] == "ray" else None
    return download_images(prepared, **settings, cluster=cluster)


@task(name="record-source", cache_policy=NO_CACHE)
def record_task(prepared, summary: dict) -> str:
    stats = {k: v for k, v in summary.items() if k not in ("settings", "source", "version")}
    return record_source(prepared, stats).version


def summary_rows(summary: dict) -> list[dict]:
    """The summary as (metric, value) rows: the table artifact and the CLI table."""
    rows = [{"metric": k, "value": summary[k]} for k in
            ("source", "version", "rows_read", "images", "images_ok", "images_failed", "not_attempted",
             "retried", "recovered_by_retry", "shards", "shards_incomplete", "bytes", "images_per_s", "wall_s")]
    rows += [{"metric": f"rejected: {k}", "value": v} for k, v in summary["rows_rejected"].items()]
    rows += [{"metric": f"failed: {k}", "value": v} for k, v in summary["failures"].items() if v]
    return rows


@flow(name="acquire")
def acquire_flow(spec: AcquireSpec | dict | None = None, root: str | None = None, progress: bool = False) -> dict:
    """Acquire one source into ``<root>/sources/<source>/<version>/``; returns its summary.

    ``spec``: an :class:`AcquireSpec` or its dict (``source`` required). Its ``executor``: ``local``
    (img2dataset's multiprocessing distributor, ``processes`` workers) or ``ray`` (its Ray
    distributor: one task per shard on the cluster at ``ray_address``, or on a local cluster started
    for the download). Same shards either way; not part of the source version, which hashes
    ``spec.download_params()``. ``progress``: img2dataset's own progress bar.
    """
    spec = AcquireSpec.parse(spec, where="acquire_flow")
    check_executor(spec.executor)
    settings = {k: getattr(spec, k) for k in DOWNLOAD_SETTINGS}
    settings.update(progress=progress, distributor="ray" if spec.executor == "ray" else "multiprocessing")
    source = spec.source
    prepared = prepare_task(source, list(spec.metadata) if spec.metadata else None, root, spec.limit,
                            spec.download_params())
    summary = download_task(prepared, settings, spec.ray_address)
    summary["path"] = prepared.directory
    if summary["shards_incomplete"] == 0:
        record_task(prepared, summary)
    publish_table(f"acquire-{source}", summary_rows(summary),
                  description=f"Acquire summary of {source} {prepared.version}")
    publish_link(f"acquire-{source}-dir", prepared.directory, description=f"{source} {prepared.version} shards")
    return summary
