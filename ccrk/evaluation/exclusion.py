"""A benchmark's evaluation images as an exclusion list, so that ``ccrk build`` keeps them out of
pre-training (the list's format and the match: :mod:`storage.exclusion`).

:func:`evaluation_images` lists the images of a benchmark's evaluation splits
(:data:`EVALUATION_SPLITS`) from the same published files ``ccrk evaluate`` reads, whether or not
the image files are there; :func:`exclusion_rows` turns each into its identities -- ids from its
file name (``COCO_val2014_000000391895.jpg`` -> COCO id 391895, Flickr30K's ``1000092795.jpg`` ->
Flickr id 1000092795) or the split file (Karpathy's ``cocoid``), the url where the benchmark has one
(WIT), and the sha256 and pHash of the image's bytes where they can be read (the others are
counted as missing). :func:`make_exclusion` writes them as a versioned artifact,
``<root>/exclusions/<benchmark>/<version>/exclusion.parquet`` (with ``summary.json``), recorded
in the catalog as kind ``exclusion``.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pyarrow as pa

from ccrk.evaluation import benchmarks as bm
from ccrk.evaluation import coco, multi30k, wit
from storage import atomic, layout
from storage.errors import CCRKError
from storage.exclusion import (EXCLUSION_FILE, decimal_id, exclusion_table, phash_bytes, url_identities,
                               write_exclusion_list)
from storage.sidecar import cached_beside
from storage.specs import ExcludeBenchmark
from storage.stage import Outcome, StagePlan, run_stage
from storage.versioning import CODE_VERSION, canonical_json, content_version, file_sha256

# The splits a benchmark is evaluated (or its checkpoints selected) on, whose images never reach
# pre-training. The demo benchmark's val split is a tenth of the corpus's train split by
# construction (ccrk.evaluation.demo_benchmark): pre-training images, so only its test split.
EVALUATION_SPLITS = {
    "xflickrco": ("test",),                           # annotations/<lang>/test.jsonl, every language
    "multi30k": ("test_2016_flickr", "val"),
    "coco": ("test", "val", "coco-cn_test"),          # Karpathy's 5K test and 5K val; COCO-CN's test list
    "wit": ("test",),                                 # test_<lang>.jsonl, every language
    "demo": ("test",),
}
_COCO_NAME = re.compile(r"COCO_[A-Za-z]+\d{4}_0*(\d+)")
_FLICKR_NAME = re.compile(r"(\d+)(?:_[0-9a-f]+)?(?:_[a-z])?\.(?:jpg|jpeg|png)", re.IGNORECASE)
SUMMARY = "summary.json"


@dataclass
class EvaluationImage:
    """One image of an evaluation split: where its bytes are (a file, or WIT's inline base64), the
    url it is published under, its ids."""
    split: str
    name: str
    path: str | None = None
    b64: str | None = None
    url: str | None = None
    ids: list[tuple[str, str]] = field(default_factory=list)


def ids_from_name(name: str) -> list[tuple[str, str]]:
    """The ids an image file name carries: COCO's ``COCO_<split><year>_<12 digits>`` (a COCO id),
    else Flickr30K's ``<photo id>.jpg`` (also ``<photo id>_<secret>.jpg``, Flickr's own name)."""
    base = os.path.basename(name)
    coco_match = _COCO_NAME.search(base)
    if coco_match:
        return [("coco_id", decimal_id(coco_match.group(1)))]
    flickr_match = _FLICKR_NAME.fullmatch(base)
    return [("flickr_id", decimal_id(flickr_match.group(1)))] if flickr_match else []


def _file_image(split: str, name: str, path: str, ids=None) -> EvaluationImage:
    return EvaluationImage(split, name, path=path, ids=list(ids) if ids is not None else ids_from_name(name))


def _xflickrco_images(data: str, images: str | None, coco_images: str | None, split: str) -> list[EvaluationImage]:
    ann = os.path.join(data, "annotations")
    if not os.path.isdir(ann):
        raise CCRKError(f"{ann} not found: the xFlickrCO folder holds annotations/<lang>/test.jsonl")
    flickr, coco_dir = bm._image_dirs(data, images, coco_images)
    out = []
    for lang in sorted(os.listdir(ann)):
        path = os.path.join(ann, lang, f"{split}.jsonl")
        if os.path.exists(path):
            bm.listed_lang(lang, path)
            for n, row in bm._read_jsonl(path):
                img_path = str(row.get("img_path", ""))
                if img_path:
                    out.append(_file_image(split, img_path,
                                           bm.xflickrco_image_path(img_path, flickr, coco_dir, f"{path}:{n}")))
    return out


def _multi30k_images(data: str, images: str | None, split: str) -> list[EvaluationImage]:
    image_root = images or os.path.join(data, "images")
    root = multi30k.find_raw_root(data)
    if root:
        if split not in multi30k.available_splits(root):
            return []
        path, names = multi30k.read_image_split(root, split)
        return [_file_image(split, n, bm.image_file(image_root, n, f"{path}:{i}")) for i, n in enumerate(names, 1) if n]
    return _cclm_images([os.path.join(data, f"{split}.{lang}.json") for lang in bm.MULTI30K_LANGS], image_root, split)


def _cclm_images(paths: list[str], image_root: str, split: str) -> list[EvaluationImage]:
    out = []
    for path in paths:
        if os.path.exists(path):
            for i, row in enumerate(bm._read_json_list(path)):
                if isinstance(row, dict) and row.get("image"):
                    out.append(_file_image(split, str(row["image"]),
                                           bm.image_file(image_root, row["image"], f"{path} entry {i}")))
    return out


def _coco_images(data: str, images: str | None, split: str) -> list[EvaluationImage]:
    image_root = images or os.path.join(data, "images")
    found = coco.find_published(data)
    if found is None:  # CCLM's json
        if split == "coco-cn_test":
            return []
        return _cclm_images([os.path.join(data, f"{lang}.{split}.json") for lang in bm.COCO_LANGS], image_root, split)
    if split == "coco-cn_test":
        if "zh" not in found:
            return []
        list_file = os.path.join(found["zh"], "coco-cn_test.txt")
        if not os.path.exists(list_file):
            return []
        out = []
        with open(list_file, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    cocoid, rel = coco._cococn_image(line.strip(), f"{list_file}:{n}")
                    out.append(_file_image(split, rel, os.path.join(image_root, rel), [("coco_id", str(cocoid))]))
        return out
    out = []
    for img in coco.karpathy_split(found["en"]).get(split, []):
        rel = os.path.join(str(img["filepath"]), str(img["filename"]))
        path = bm.image_file(image_root, rel, f"{found['en']} (COCO id {img['cocoid']})")
        out.append(_file_image(split, rel, path, [("coco_id", decimal_id(img["cocoid"]))]))
    return out


def _wit_images(data: str, pixels: str | None, split: str) -> list[EvaluationImage]:
    groups: dict[str, dict] = {}
    for lang in bm.wit_langs(data, split):
        path = bm._wit_file(data, f"{split}_{lang}.jsonl")
        if os.path.exists(path):
            for url, g in bm.wit_groups(path).items():
                if groups.get(url, {}).get("b64") is None:
                    groups[url] = g
    if not groups:
        raise CCRKError(f"no WIT {split}_<lang>.jsonl under {data}")
    wanted = {url for url, g in groups.items() if g["b64"] is None}
    found = wit.collect_images(wit.pixel_files(pixels), wanted)[0] if wanted and pixels else {}
    return [EvaluationImage(split, url, b64=g["b64"] or found.get(url), url=url) for url, g in sorted(groups.items())]


def evaluation_images(benchmark: str, data: str, images: str | None = None,
                      coco_images: str | None = None) -> list[EvaluationImage]:
    """Every image of ``benchmark``'s evaluation splits (:data:`EVALUATION_SPLITS`), read from its
    published files under ``data`` (the layouts :func:`ccrk.evaluation.loaders.load_benchmark`
    reads), with or without the image files; an image listed twice in a split (several
    languages) once."""
    if benchmark not in EVALUATION_SPLITS:
        raise CCRKError(f"unknown benchmark {benchmark!r}; choose one of {', '.join(EVALUATION_SPLITS)}")
    if not data or not os.path.isdir(data):
        raise CCRKError(f"benchmark {benchmark}: folder {data!r} not found (give its data folder)")
    out, seen = [], set()
    for split in EVALUATION_SPLITS[benchmark]:
        if benchmark in ("xflickrco", "demo"):
            got = _xflickrco_images(data, images, coco_images, split)
        elif benchmark == "multi30k":
            got = _multi30k_images(data, images, split)
        elif benchmark == "coco":
            got = _coco_images(data, images, split)
        else:
            got = _wit_images(data, images, split)
        for im in got:
            key = (im.split, im.url or os.path.abspath(im.path))
            if key not in seen:
                seen.add(key)
                out.append(im)
    if not out:
        raise CCRKError(f"benchmark {benchmark}: no evaluation image listed under {data}")
    return out


def _image_bytes(im: EvaluationImage) -> bytes | None:
    if im.b64 is not None:
        try:
            return base64.b64decode(im.b64)
        except (binascii.Error, ValueError):
            return None
    if im.path and os.path.isfile(im.path):
        with open(im.path, "rb") as f:
            return f.read()
    return None


def _image_rows(im: EvaluationImage) -> tuple[list[tuple[str, str, str]], bool]:
    """(split, kind, value) rows of one image, and whether its bytes were read."""
    rows = [(im.split, kind, value) for kind, value in im.ids if value]
    if im.url:
        found = url_identities(pa.array([im.url], pa.string()))
        rows += [(im.split, kind, v) for kind, values in found.items() if (v := values[0].as_py())]
    data = _image_bytes(im)
    if data is None:
        return rows, False
    rows.append((im.split, "sha256", hashlib.sha256(data).hexdigest()))
    h = phash_bytes(data)
    if h is not None:
        rows.append((im.split, "phash", f"{h:016x}"))
    return rows, True


def exclusion_rows(benchmark: str, images: list[EvaluationImage], threads: int | None = None) -> tuple[pa.Table, dict]:
    """The exclusion list of ``images`` (:func:`storage.exclusion.exclusion_table`) and its counts:
    images, those whose bytes could not be read (``missing``), per split and per kind."""
    with ThreadPoolExecutor(max(1, threads or os.cpu_count() or 1)) as pool:  # reads and decoding release the GIL
        found = list(pool.map(_image_rows, images))
    table = exclusion_table(benchmark, [r for rows, _ in found for r in rows])
    by_split: dict[str, int] = {}
    for im in images:
        by_split[im.split] = by_split.get(im.split, 0) + 1
    kinds: dict[str, int] = {}
    for kind in table.column("kind").to_pylist():
        kinds[kind] = kinds.get(kind, 0) + 1
    return table, {"n_images": len(images), "missing": sum(1 for _, ok in found if not ok),
                   "by_split": by_split, "by_kind": kinds}


class ExclusionStage:
    """A benchmark's exclusion list as a :class:`storage.stage.Stage`: its version derives from the
    benchmark, its splits, the digests of the files that list the images and every image file's
    name, size and mtime (a changed file is a new version; the list's content is what a build's
    version holds)."""

    def __init__(self, root: str, entry: ExcludeBenchmark):
        self.root, self.entry = layout.data_root(root), entry
        self.images: list[EvaluationImage] = []

    def plan(self) -> StagePlan:
        e = self.entry
        self.images = evaluation_images(e.benchmark, e.data, e.images, e.coco_images)
        listing = []
        for im in self.images:
            try:
                st = os.stat(im.path) if im.path else None
            except OSError:
                st = None
            listing.append([im.split, im.name, im.url, st.st_size if st else None, st.st_mtime_ns if st else None,
                            hashlib.sha256(im.b64.encode()).hexdigest() if im.b64 else None])
        params = {"benchmark": e.benchmark, "splits": list(EVALUATION_SPLITS[e.benchmark]),
                  "files": self._list_files_digest(), "images": hashlib.sha256(canonical_json(listing).encode()).hexdigest()}
        version = content_version("exclusion", [], params, CODE_VERSION)
        path = layout.exclusion_dir(self.root, e.benchmark, version)
        return StagePlan(kind="exclusion", name=e.benchmark, version=version, path=path,
                         params={**params, "data": layout.rooted(self.root, os.path.abspath(e.data))})

    def _list_files_digest(self) -> str:
        """The digest of the benchmark's files that list its images (annotations, split files)."""
        e = self.entry
        files = []
        for d, _, names in os.walk(e.data):
            files += [os.path.join(d, n) for n in names if n.endswith((".json", ".jsonl", ".txt", ".gz"))
                      and not n.startswith(".")]
        digest = lambda f: cached_beside(f, "sha256", file_sha256)  # noqa: E731 - kept beside it where writable
        return hashlib.sha256("".join(f"{os.path.relpath(f, e.data)}:{digest(f)};"
                                      for f in sorted(files)).encode()).hexdigest()

    def completed(self, plan: StagePlan) -> Outcome | None:
        summary_path = os.path.join(plan.path, SUMMARY)
        if not (os.path.exists(summary_path) and os.path.exists(os.path.join(plan.path, EXCLUSION_FILE))):
            return None
        with open(summary_path, encoding="utf-8") as f:
            summary = json.load(f)
        return Outcome(summary, _stats(summary))

    def execute(self, plan: StagePlan) -> Outcome:
        table, counts = exclusion_rows(self.entry.benchmark, self.images)
        write_exclusion_list(table, os.path.join(plan.path, EXCLUSION_FILE))
        summary = {"benchmark": self.entry.benchmark, "version": plan.version, "path": plan.path,
                   "list": os.path.join(plan.path, EXCLUSION_FILE), **counts}
        atomic.write_json(os.path.join(plan.path, SUMMARY), summary)  # last: its presence marks the list done
        return Outcome(summary, _stats(summary))

    def publish(self, plan: StagePlan, summary: dict) -> None:
        pass


def _stats(summary: dict) -> dict:
    return {k: summary[k] for k in ("n_images", "missing", "by_split", "by_kind")}


def make_exclusion(root: str | None, entry: ExcludeBenchmark | dict) -> dict:
    """The exclusion list of a benchmark entry (made unless this version is there already);
    returns its summary: ``list`` (the parquet file), ``version``, ``n_images``, ``missing``
    (images whose bytes were not found: matched by id and url only), per split and kind, and
    ``skipped``."""
    return run_stage(ExclusionStage(root, ExcludeBenchmark.parse(entry)), layout.data_root(root))
