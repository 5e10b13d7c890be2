"""What a published dataset states about itself, gathered once from its manifest (and the catalog
where the dataset still sits under its data root): the sources with their terms and how their
captions and images came to be, the translation model and decoding of every language, the
language policy and quality filters, the evaluation-benchmark exclusion, how many samples have how
many languages. ``storage.export`` renders these facts twice, as the dataset card and as
Croissant's Responsible-AI fields, so the two never disagree.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone

import duckdb

from storage import layout
from storage.catalog import Catalog
from storage.manifest import manifest_path

CC_BY_4 = "https://creativecommons.org/licenses/by/4.0/"
FLICKR_TERMS = "https://www.flickr.com/help/terms"


@dataclass(frozen=True)
class SourceTerms:
    """One source's facts: its terms, where its captions and images come from, who may be in them."""

    title: str
    hf: str  # the Hugging Face dataset id (the card's source_datasets)
    terms: str
    url: str  # the terms' page
    licence_urls: tuple[str, ...]
    origin: str  # who wrote the captions, where the images are from
    collection_types: tuple[str, ...]  # rai:dataCollectionType values of the original collection
    people: str  # what its captions may say about people


# One place for each source's facts (the card and the Croissant fields list those of the sources used).
SOURCE_TERMS = {
    "cc3m": SourceTerms(
        "Conceptual Captions (CC3M)", "conceptual_captions",
        "Google LLC terms: may be freely used for any purpose, acknowledgement of Google appreciated, provided "
        "as is; images stay under their owners' rights",
        "https://github.com/google-research-datasets/conceptual-captions/blob/master/LICENSE",
        ("https://github.com/google-research-datasets/conceptual-captions/blob/master/LICENSE",),
        "web images with the HTML alt-text of the pages that showed them, filtered and rewritten by Google's "
        "pipeline (Sharma et al., ACL 2018), which replaces named entities such as people's names by hypernyms",
        ("Web Scraping",),
        "alt-text written for the web, names hypernymised (\"actor\", \"person\") but gender, age and appearance "
        "words kept"),
    "sbu": SourceTerms(
        "SBU Captioned Photo Dataset", "sbu_captions",
        "captions and images from Flickr, distributed for research; images under the Flickr terms of use and "
        "their owners' rights",
        "https://www.cs.rice.edu/~vo9/sbucaptions/", (FLICKR_TERMS,),
        "Flickr photos with the descriptions their owners wrote, kept where visually descriptive "
        "(Ordonez et al., NeurIPS 2011)",
        ("Web Scraping", "User-generated content data"),
        "descriptions written by the photos' owners, which can name people, family relations and places"),
    "vg": SourceTerms(
        "Visual Genome", "visual_genome", "annotations CC BY 4.0; images under their owners' rights",
        "https://homes.cs.washington.edu/~ranjay/visualgenome/", (CC_BY_4,),
        "region descriptions written by crowd workers on Amazon Mechanical Turk for images of YFCC100M and "
        "MS-COCO (Krishna et al., IJCV 2017)",
        ("Others: crowdsourced annotation (Amazon Mechanical Turk)",),
        "crowd workers' descriptions, which can describe people's gender, age and appearance"),
    "coco": SourceTerms(
        "COCO Captions", "coco", "annotations CC BY 4.0; images under the Flickr terms of use",
        "https://cocodataset.org/#termsofuse", (CC_BY_4, FLICKR_TERMS),
        "Flickr images with captions written by crowd workers on Amazon Mechanical Turk (Chen et al., 2015)",
        ("Others: crowdsourced annotation (Amazon Mechanical Turk)",),
        "crowd workers' captions, which can describe people's gender, age and appearance"),
    "multi30k": SourceTerms(
        "Multi30K (Flickr30K images, English descriptions)", "bentrevett/multi30k",
        "Flickr30K images under the Flickr terms of use, for non-commercial research; annotations: see the "
        "Multi30K release",
        "https://github.com/multi30k/dataset", (FLICKR_TERMS,),
        "Flickr30K images with English descriptions written by crowd workers (Young et al., 2014; Elliott et al., "
        "2016)",
        ("Others: crowdsourced annotation (Amazon Mechanical Turk)",),
        "crowd workers' descriptions, which can describe people's gender, age and appearance"),
}


def source_terms(name: str) -> SourceTerms:
    """The source's facts; a source without an entry gets neutral ones that say so."""
    return SOURCE_TERMS.get(name) or SourceTerms(
        name, name, "see the source's own terms", "", (), f"the {name} source (no facts recorded in ccrk)",
        ("Others: see the source",), "see the source")


@dataclass(frozen=True)
class ModelFacts:
    name: str
    licence: str
    licence_url: str | None


_M2M_SIZE = re.compile(r"m2m[-_]?100[-_]?(418m|1\.2b|12b)", re.I)
_NLLB_SIZE = re.compile(r"nllb(?:[-_]?200)?[-_]?(?:distilled[-_]?)?(600m|1\.3b|3\.3b|54b)", re.I)


def model_facts(model_id: str) -> ModelFacts:
    """What a translation store's model_id (the model directory's name + a content hash, or
    ``import:<name>``) says about the model, and its licence."""
    low = model_id.lower()
    if low.startswith("import:"):
        return ModelFacts(f"imported translations ({model_id[7:]})", f"see the {model_id[7:]} release's licence",
                          None)
    if "nllb" in low:
        size = _NLLB_SIZE.search(low)
        return ModelFacts("NLLB-200" + (f" {size.group(1).upper()}" if size else ""), "CC-BY-NC 4.0 (NLLB-200)",
                          "https://creativecommons.org/licenses/by-nc/4.0/")
    if low.startswith("demo_model"):  # translation/demo_model, the committed demo translator
        return ModelFacts("the ccrk demo translator (a small M2M-100 trained on the demo captions; not a real "
                          "translation model)", "MIT (ccrk)", "https://spdx.org/licenses/MIT.html")
    if "m2m" in low:
        size = _M2M_SIZE.search(low)
        return ModelFacts("M2M-100" + (f" {size.group(1).upper()}" if size else ""), "MIT (M2M-100, Fan et al. 2021)",
                          "https://spdx.org/licenses/MIT.html")
    return ModelFacts(f"model directory {model_id.rsplit('-', 1)[0]}", "see the translation model's licence", None)


@dataclass
class TranslationUse:
    """One language's translation set as the dataset used it."""

    lang: str
    model_id: str
    decode_id: str
    settings: dict | None = None  # the translate stage's decoding settings, where the catalog recorded them
    thresholds: dict | None = None  # its quality thresholds (the ok flag)

    @property
    def model(self) -> ModelFacts:
        return model_facts(self.model_id)

    @property
    def imported(self) -> bool:
        return self.model_id.startswith("import:")

    @property
    def decoding(self) -> str:
        if self.imported:
            return "as released (decoding not recorded by ccrk)"
        if not self.settings:
            return f"not recorded in the lineage (decode_id {self.decode_id})"
        beam = int(self.settings.get("beam_size", 1))
        out = "greedy" if beam == 1 else f"beam search, beam {beam}"
        a, b = self.settings.get("max_len_a"), self.settings.get("max_len_b")
        if a is not None and b is not None:
            out += f", output at most {a} x source tokens + {b}"
        if self.settings.get("max_input_tokens"):
            out += f", sources cut at {self.settings['max_input_tokens']} tokens"
        return out


@dataclass
class SourceUse:
    name: str
    version: str
    images: int
    acquired_at: datetime | None = None
    params: dict = field(default_factory=dict)  # the acquire stage's recorded params

    @property
    def terms(self) -> SourceTerms:
        return source_terms(self.name)

    @property
    def mirror(self) -> str | None:
        """The WebDataset mirror the images were read from, where the source's record names one."""
        for where in (self.params, self.params.get("download_params") or {}):
            for key, value in where.items():
                if value and ("webdataset" in key.lower() or "mirror" in key.lower()):
                    return str(value)
        return None

    @property
    def fetched(self) -> str:
        if self.mirror:
            return f"read from the WebDataset mirror {self.mirror}"
        return "downloaded by img2dataset from the urls in the official metadata"


@dataclass
class DatasetFacts:
    name: str
    version: str
    code_version: str
    langs: list[str]
    n_samples: int
    captions_by_lang: dict[str, int]
    sources: list[SourceUse]
    translations: list[TranslationUse]
    policy: dict  # the build's lineage params (langs, min_langs, drop_flagged, ...)
    lang_counts: dict[int, int]  # {number of languages: samples}
    benchmark_overlap: dict[str, int]  # {benchmark: images excluded}; {} = none configured
    drops: list[dict]
    overlap_by_kind: dict[str, dict[str, int]] = field(default_factory=dict)  # {benchmark: {kind of match: images}}
    lineage: list = field(default_factory=list)  # the manifest's (kind, name, value) rows
    built_at: datetime | None = None

    @property
    def models(self) -> list[ModelFacts]:
        seen: dict[str, ModelFacts] = {}
        for t in self.translations:
            seen.setdefault(t.model_id, t.model)
        return list(seen.values())

    @property
    def collection_timeframe(self) -> str | None:
        """ISO 8601 interval: the first source's acquisition to the build."""
        times = [s.acquired_at for s in self.sources if s.acquired_at] + ([self.built_at] if self.built_at else [])
        if not times:
            return None
        return f"{_iso(min(times))}/{_iso(max(times))}"


def _iso(t: datetime) -> str:
    return t.replace(microsecond=0).isoformat() + ("" if t.tzinfo else "Z")


def dataset_facts(s: dict, models: list[tuple], dataset_dir: str | None = None,
                  lang_counts: dict | None = None) -> DatasetFacts:
    """The facts of the dataset whose :func:`storage.manifest.summary` is ``s``. ``models``: the
    (lang, model_id, decode_id) of the translations its captions hold. ``dataset_dir``: where it
    is (its build time and its sources' acquisition come from the catalog when the dataset sits
    under its data root, else the build time is the manifest's). ``lang_counts``: used where ``s``
    has none (manifests written before it was recorded)."""
    lineage = s.get("lineage") or []
    params = {name: _json(value) for kind, name, value in lineage if kind == "param"}
    settings = _translation_settings(lineage)
    catalog = _catalog(dataset_dir, s["name"], s["version"]) if dataset_dir else None
    sources = []
    for kind, name, version in lineage:
        if kind != "source":
            continue
        art = _get(catalog, version)
        sources.append(SourceUse(name, version, int(s.get("samples_by_source", {}).get(name, 0)),
                                 art.created_at if art else None, art.params if art else {}))
    built = _get(catalog, s["version"])
    built_at = built.created_at if built else _manifest_time(dataset_dir)
    translations = [TranslationUse(lang, m, d, *settings.get((m, d, lang), (None, None)))
                    for lang, m, d in models if m != "source"]
    counts = s.get("lang_counts") or lang_counts or {}
    return DatasetFacts(
        name=s["name"], version=s["version"], code_version=str(s.get("code_version", "")),
        langs=list(s["captions_by_lang"]), n_samples=int(s["n_samples"]), captions_by_lang=dict(s["captions_by_lang"]),
        sources=sources, translations=translations, policy=params,
        lang_counts={int(k): int(v) for k, v in sorted(counts.items(), key=lambda kv: int(kv[0]))},
        benchmark_overlap={str(k): int(v) for k, v in (s.get("benchmark_overlap") or {}).items()},
        overlap_by_kind=_by_kind(s.get("overlap_by_kind") or []),
        drops=list(s.get("drops") or []), lineage=[list(r) for r in lineage], built_at=built_at)


def _by_kind(rows: list[dict]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for r in rows:
        kinds = out.setdefault(str(r["benchmark"]), {})
        kinds[str(r["kind"])] = kinds.get(str(r["kind"]), 0) + int(r["n_images"])
    return out


def _json(value: str):
    try:
        return json.loads(value)
    except (TypeError, ValueError):
        return value


def _translation_settings(lineage) -> dict:
    """{(model_id, decode_id, lang): (decoding settings, thresholds)} from the lineage's
    ``translation_artifact`` rows (name ``<model_id>/<decode_id>/<lang>``, value ``<version> <params json>``)."""
    out = {}
    for kind, name, value in lineage:
        if kind != "translation_artifact" or name.count("/") < 2:
            continue
        set_id, lang = name.rsplit("/", 1)
        model_id, decode_id = set_id.rsplit("/", 1)
        params = _json(value.split(" ", 1)[1]) if " " in value else {}
        if isinstance(params, dict) and params.get("settings"):
            out.setdefault((model_id, decode_id, lang), (params["settings"], params.get("thresholds")))
    return out


def _catalog(dataset_dir: str, name: str, version: str) -> Catalog | None:
    """The catalog of the data root the dataset sits under (``<root>/datasets/<name>/<version>``), if any."""
    d = os.path.abspath(dataset_dir)
    parent = os.path.dirname(d)
    root = os.path.dirname(os.path.dirname(parent))
    if (os.path.basename(d), os.path.basename(parent), os.path.basename(os.path.dirname(parent))) != \
            (version, name, "datasets") or not os.path.exists(layout.catalog_path(root)):
        return None
    return Catalog(root)


def _get(catalog: Catalog | None, version: str):
    if catalog is None:
        return None
    try:
        return catalog.get(version)
    except duckdb.Error:  # held by a writer just now: the facts go without the catalog's dates
        return None


def _manifest_time(dataset_dir: str | None) -> datetime | None:
    if not dataset_dir or not os.path.exists(manifest_path(dataset_dir)):
        return None
    return datetime.fromtimestamp(os.path.getmtime(manifest_path(dataset_dir)), timezone.utc).replace(tzinfo=None)
