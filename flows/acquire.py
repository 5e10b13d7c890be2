"""Prefect flow for ``ccrk acquire``: prepare the metadata, download the images, summarise and record.

Thin: one task per sub-job (never one per url). :mod:`storage.sources` turns the official metadata
into ``images.parquet`` + ``captions.parquet``; :mod:`storage.download` runs img2dataset into shards
(resumable, ``retry_failed``), or the images come from elsewhere into shards of the same contracts:
a WebDataset mirror (``from_webdataset``, :mod:`storage.mirror`; with ``retry_failed``, after the
web download, only what it lost) or a local folder (``images``, :func:`storage.local_shards.acquire_folder`:
Multi30K's Flickr30K files); the summary goes to ``summary.json``, a Prefect table artifact and the
catalog (an :class:`AcquireStage` run by :func:`storage.stage.run_stage`, once every shard finished). The settings are an :class:`storage.specs.AcquireSpec` (or its dict); callable from
Python: ``acquire_flow({"source": "coco", "metadata": ["captions_val2017.json"]}, root="data")``.
"""
from __future__ import annotations

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from flows.artifacts import publish_link, publish_table
from flows.executors import check_executor, ray_cluster
from storage import layout
from storage.download import download_images
from storage.errors import CCRKError
from storage.local_shards import LOCAL_SETTINGS, acquire_folder
from storage.mirror import fill_from_mirror, starts_from_mirror, unfinished_fill
from storage.progress import Progress
from storage.sources import PreparedSource, catalog_fields, prepare_source
from storage.specs import AcquireSpec
from storage.stage import Outcome, StagePlan, run_stage

# The download settings img2dataset runs with (AcquireSpec's fields; thread_count as it names it).
DOWNLOAD_SETTINGS = ("image_size", "resize_mode", "resize_only_if_bigger", "processes", "thread_count", "timeout",
                     "fetch_deadline", "max_image_bytes", "allow_addresses", "retries", "retry_failed",
                     "number_sample_per_shard", "max_image_area", "encode_quality")


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


@task(name="images-from-mirror", cache_policy=NO_CACHE)
def mirror_task(prepared, mirror: list[str], settings: dict, only_failures: bool,
                progress: Progress | None = None) -> dict:
    return fill_from_mirror(prepared, mirror, {k: settings[k] for k in LOCAL_SETTINGS}, only_failures=only_failures,
                            progress=progress)


@task(name="images-from-folder", cache_policy=NO_CACHE)
def folder_task(prepared, images: str, settings: dict, progress: Progress | None = None) -> dict:
    return acquire_folder(prepared, images, {k: settings[k] for k in LOCAL_SETTINGS}, progress=progress)


def catalog_stats(summary: dict) -> dict:
    """The acquire summary as the catalog keeps it (beside the read counts)."""
    return {k: v for k, v in summary.items() if k not in ("settings", "source", "version")}


class AcquireStage:
    """``acquire`` as a :class:`storage.stage.Stage`: plan = prepare the metadata (the version is
    :func:`storage.sources.prepare_source`'s), execute = download the images (resumable, so never
    ``completed``), publish = the summary table and the shards' link."""

    def __init__(self, spec: AcquireSpec, root: str | None, settings: dict, progress: Progress | None = None):
        self.spec, self.root, self.settings, self.progress = spec, root, settings, progress
        self.prepared: PreparedSource | None = None

    def plan(self) -> StagePlan:
        spec = self.spec
        self.prepared = prepared = prepare_task(spec.source, list(spec.metadata) if spec.metadata else None,
                                                self.root, spec.limit, spec.download_params())
        params, _ = catalog_fields(prepared)
        return StagePlan(kind="source", name=prepared.source, version=prepared.version, path=prepared.directory,
                         params=params)

    def completed(self, plan: StagePlan) -> Outcome | None:
        return None  # the download resumes itself: a complete source downloads nothing

    def execute(self, plan: StagePlan) -> Outcome:
        summary = self._images()
        summary["path"] = self.prepared.directory
        # A source with shards left unfinished is recorded once a rerun finishes them.
        return Outcome(summary, catalog_fields(self.prepared, catalog_stats(summary))[1],
                       complete=not summary["shards_incomplete"])

    def _images(self) -> dict:
        """The images: downloaded, from the mirror, both (the mirror fills what the web lost) or from a folder."""
        spec, prepared, directory = self.spec, self.prepared, self.prepared.directory
        if spec.images:
            return folder_task(prepared, spec.images, self.settings, self.progress)
        unfinished = unfinished_fill(directory)
        if not spec.from_webdataset:
            if unfinished is not None:
                raise CCRKError(f"{directory} has an unfinished fill from mirror {', '.join(unfinished['mirror'])}: "
                                f"run the same command with --from-webdataset again to finish it first")
            return download_task(prepared, self.settings, spec.ray_address)
        if spec.retry_failed and unfinished is None and not starts_from_mirror(directory):
            web = download_task(prepared, {**self.settings, "retry_failed": False}, spec.ray_address)
            if web["shards_incomplete"]:
                return web  # the download first: the mirror fills what it lost once it is complete
        return mirror_task(prepared, list(spec.from_webdataset), self.settings, spec.retry_failed, self.progress)

    def publish(self, plan: StagePlan, summary: dict) -> None:
        source, version = plan.name, plan.version
        publish_table(f"acquire-{source}", summary_rows(summary), description=f"Acquire summary of {source} {version}")
        publish_link(f"acquire-{source}-dir", plan.path, description=f"{source} {version} shards")


def summary_rows(summary: dict) -> list[dict]:
    """The summary as (metric, value) rows: the table artifact and the CLI table."""
    rows = [{"metric": k, "value": summary[k]} for k in
            ("source", "version", "rows_read", "images", "images_ok", "images_failed", "not_attempted",
             "retried", "recovered_by_retry", "shards", "shards_incomplete", "bytes", "images_per_s", "wall_s")]
    rows += [{"metric": f"rejected: {k}", "value": v} for k, v in summary["rows_rejected"].items()]
    rows += [{"metric": f"fixed: {k}", "value": v} for k, v in summary.get("rows_fixed", {}).items()]
    rows += [{"metric": f"failed: {k}", "value": v} for k, v in summary["failures"].items() if v]
    if "mirror" in summary:
        rows.append({"metric": "images_from_mirror", "value": summary["images_from_mirror"]})
        rows += [{"metric": f"mirror: {k}", "value": v} for k, v in summary["mirror"].items()
                 if k not in ("mirror", "only_failures") and v]
    return rows


@flow(name="acquire")
def acquire_flow(spec: AcquireSpec | dict | None = None, root: str | None = None,
                 progress: bool | Progress = False) -> dict:
    """Acquire one source into ``<root>/sources/<source>/<version>/``; returns its summary.

    ``spec``: an :class:`AcquireSpec` or its dict (``source`` required). Its ``executor``: ``local``
    (img2dataset's multiprocessing distributor, ``processes`` workers) or ``ray`` (its Ray
    distributor: one task per shard on the cluster at ``ray_address``, or on a local cluster started
    for the download). Same shards either way; not part of the source version, which hashes
    ``spec.download_params()``. ``progress``: img2dataset's own progress bar (true or a
    :data:`storage.progress.Progress`, which also draws the mirror's and the folder's).
    """
    spec = AcquireSpec.parse(spec, where="acquire_flow")
    check_executor(spec.executor)
    settings = {k: getattr(spec, k) for k in DOWNLOAD_SETTINGS}
    settings.update(progress=bool(progress), distributor="ray" if spec.executor == "ray" else "multiprocessing")
    stage = AcquireStage(spec, layout.data_root(root), settings, progress if callable(progress) else None)
    return run_stage(stage, stage.root)
