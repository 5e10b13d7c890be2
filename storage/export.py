"""Publish a dataset's translated corpus: ``data/<lang>.parquet`` per language (caption,
translation, scores, image url, source ids -- no image bytes), a dataset card ``README.md`` with a
Hugging Face YAML header, and ``croissant.json`` (MLCommons Croissant 1.1 JSON-LD with the
Responsible-AI vocabulary, ``rai:``). Both state the same facts (:mod:`storage.dataset_facts`): the
sources and their terms, the translation model and decoding per language, the filters, the
evaluation-benchmark exclusion and how many samples have how many languages.
"""
from __future__ import annotations

import os

import yaml

from storage import atomic, manifest
from storage.dataset_facts import DatasetFacts, dataset_facts
from storage.errors import CCRKError
from storage.versioning import file_sha256

SIZE_CATEGORIES = ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
                   (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"), (1_000_000_000, "100M<n<1B"))
COLUMNS = (("sample_key", "sc:Text"), ("image_key", "sc:Text"), ("source", "sc:Text"), ("source_id", "sc:Text"),
           ("image_url", "sc:URL"), ("caption_id", "sc:Text"), ("caption", "sc:Text"), ("translation", "sc:Text"),
           ("lang", "sc:Text"), ("model_id", "sc:Text"), ("decode_id", "sc:Text"), ("uniformity", "sc:Float"),
           ("copy_sim", "sc:Float"), ("len_ratio", "sc:Float"), ("script_ok", "sc:Boolean"), ("ok", "sc:Boolean"))


def size_category(n: int) -> str:
    for bound, label in SIZE_CATEGORIES:
        if n < bound:
            return label
    return "n>1B"




def export_dataset(dataset_dir: str, out_dir: str) -> dict:
    dataset_dir = os.path.abspath(dataset_dir)
    out_dir = os.path.abspath(out_dir)
    s = manifest.summary(dataset_dir)
    langs = list(s["captions_by_lang"])
    if not langs:
        raise CCRKError(f"{dataset_dir}: the manifest lists no captions to export")
    os.makedirs(os.path.join(out_dir, "data"), exist_ok=True)
    con = manifest.connect(dataset_dir)
    files, models = {}, []
    try:
        models = con.execute("SELECT DISTINCT lang, model_id, decode_id FROM captions "
                             "WHERE model_id <> 'source' ORDER BY lang, model_id").fetchall()
        # A manifest from before the summary counted languages per sample: its samples say.
        lang_counts = None if "lang_counts" in s else dict(con.execute(
            "SELECT len(string_split(langs, ',')), count(*) FROM samples GROUP BY 1").fetchall())
        for lang in langs:
            path = os.path.join(out_dir, "data", f"{lang}.parquet")
            with atomic.atomic_path(path) as tmp:
                con.execute(f"""
                    COPY (
                      SELECT s.key AS sample_key, s.image_key, s.source, s.source_id, s.url AS image_url,
                             t.caption_id, en.text AS caption, t.text AS translation, t.lang, t.model_id, t.decode_id,
                             t.uniformity, t.copy_sim, t.len_ratio, t.script_ok, t.ok
                      FROM captions t JOIN samples s ON s.key = t.key
                      LEFT JOIN captions en ON en.key = t.key AND en.caption_index = t.caption_index AND en.lang = 'en'
                      WHERE t.lang = ? ORDER BY s.idx, t.caption_index
                    ) TO {manifest.sql_str(tmp)} (FORMAT parquet)""", [lang])
            files[f"data/{lang}.parquet"] = con.execute(
                "SELECT count(*) FROM captions WHERE lang = ?", [lang]).fetchone()[0]
    finally:
        con.close()
    facts = dataset_facts(s, models, dataset_dir, lang_counts)
    atomic.write_text(os.path.join(out_dir, "README.md"), dataset_card(facts, files))
    atomic.write_json(os.path.join(out_dir, "croissant.json"), croissant_metadata(facts, out_dir, files))
    return {"name": s["name"], "version": s["version"], "out": out_dir,
            "files": {**files, "README.md": None, "croissant.json": None}}


# --- the facts as sentences: the card and the Croissant RAI fields both use these ---------------

def collection_text(f: DatasetFacts) -> str:
    per_source = "; ".join(f"{x.terms.title} (source version {x.version}, {x.images:,} images in this dataset): "
                           f"{x.terms.origin}; images {x.fetched}"
                           + (f", acquired {x.acquired_at:%Y-%m-%d}" if x.acquired_at else "") for x in f.sources)
    built = f", built {f.built_at:%Y-%m-%d %H:%M} UTC" if f.built_at else ""
    return (f"English captions and image urls from existing datasets: {per_source}. The non-English captions are "
            f"machine translations of the English ones made for this dataset (see the preprocessing protocol). "
            f"Dataset version {f.version} (ccrk code version {f.code_version}){built}. This release carries "
            "image urls, not image bytes.")


def collection_types(f: DatasetFacts) -> list[str]:
    types = ["Secondary Data analysis"]
    for x in f.sources:
        types += [t for t in x.terms.collection_types if t not in types]
    if f.translations:
        types.append("Others: machine translation of the English captions")
    return types


def missing_data_text(f: DatasetFacts) -> str:
    if not f.drops:
        return "Nothing was dropped at build time."
    parts = [f"{d['count']:,} {d['unit']}(s) {d['reason'].replace('_', ' ')}" + (f" ({d['lang']})" if d["lang"] else "")
             for d in f.drops]
    return ("Dropped at build time (images whose download failed or that the web has lost have no image bytes and "
            "are dropped; so are captions and translations the language policy rejects): " + "; ".join(parts) + ".")


def translation_lines(f: DatasetFacts) -> list[str]:
    """One line per (model, decoding): the languages it translated."""
    groups: dict[tuple, list[str]] = {}
    for t in f.translations:
        groups.setdefault((t.model.name, t.model_id, t.decoding, t.decode_id), []).append(t.lang)
    return [f"{', '.join(langs)}: machine-translated from English by {name} (model_id {mid}), decoding: {dec} "
            f"(decode_id {did})" for (name, mid, dec, did), langs in groups.items()]


def threshold_text(thresholds: dict | None, lang: str) -> str:
    if not thresholds:
        return "not recorded"
    merged = {**(thresholds.get("default") or {}),
              **{k: v for k, v in ((thresholds.get("by_lang") or {}).get(lang) or {}).items() if v is not None}}
    return ", ".join(f"{k} {v}" for k, v in merged.items())


def filter_lines(f: DatasetFacts) -> list[str]:
    p = f.policy
    n = len(p.get("langs") or f.langs)
    min_langs = p.get("min_langs")
    lines = ["Caption normalisation: Unicode NFC, runs of whitespace collapsed to one space, stripped (the text "
             "that is translated and joined on)."]
    caps = sorted({x.params["max_caption_chars"] for x in f.sources if x.params.get("max_caption_chars")})
    if caps:
        lines.append(f"Captions longer than {', '.join(map(str, caps))} characters were rejected when the sources "
                     "were read.")
    if min_langs == "all":
        lines.append(f"Language policy min_langs = all: every sample has all {n} languages (complete K-lingual "
                     "tuples); captions missing a language were dropped.")
    elif min_langs is not None:
        lines.append(f"Language policy min_langs = {min_langs}: captions with fewer than {min_langs} of the {n} "
                     "languages were dropped (and images left without captions).")
    if "drop_flagged" in p:
        lines.append("Quality filter drop_flagged = true: translations flagged by the quality scores (ok = false) "
                     "were dropped." if p["drop_flagged"] else
                     "Quality filter drop_flagged = false: flagged translations (ok = false) are kept, with their "
                     "scores, so users can filter them.")
    for t in f.translations:
        if t.thresholds:
            lines.append(f"{t.lang}: ok when {threshold_text(t.thresholds, t.lang)} (scores: uniformity, copy_sim, "
                         "len_ratio, script share).")
    lines.append(benchmark_text(f))
    return lines


def benchmark_text(f: DatasetFacts) -> str:
    if not f.benchmark_overlap:
        return ("No evaluation benchmark was excluded (none was configured at build time): images of evaluation "
                "sets (COCO Karpathy test, xFlickr&CO, Multi30K, WIT) may be in this data, and a model trained on "
                "it may score inflated on them.")
    counts = "; ".join(f"{b}: {n:,} images{_kinds(f, b)}" for b, n in f.benchmark_overlap.items())
    return ("Evaluation-benchmark exclusion: images of the configured benchmarks were removed at build time, "
            "matched by source id, image url, sha256 of the image bytes and a perceptual hash (near-duplicates): "
            f"{counts} (total {sum(f.benchmark_overlap.values()):,}).")


def _kinds(f: DatasetFacts, benchmark: str) -> str:
    kinds = {k: n for k, n in f.overlap_by_kind.get(benchmark, {}).items() if n}
    return f" (by {', '.join(f'{k} {n:,}' for k, n in kinds.items())})" if kinds else ""


def lang_count_text(f: DatasetFacts) -> str:
    if not f.lang_counts:
        return "Languages per sample: not recorded in this manifest."
    return "Languages per sample: " + "; ".join(f"{n:,} samples with {k} languages" for k, n in
                                                 sorted(f.lang_counts.items(), reverse=True)) + "."


def personal_information(f: DatasetFacts) -> list[str]:
    lines = ["Images are photographs from the web and Flickr that may show identifiable people (faces, bodies, "
             "homes, licence plates, places); ccrk blurs nothing, and this release carries their urls only."]
    lines += [f"{x.terms.title} captions: {x.terms.people}." for x in f.sources]
    lines += ["No identity, demographic or other personal annotation was made or added; the translations carry over "
              "whatever the English captions say.",
              "Removal: anyone depicted or named can ask the publisher of this release to remove a sample (give its "
              "image_url or image_key); it is removed by rebuilding without that image (a new dataset version) and "
              "should also be reported to the source's maintainers."]
    return lines


def biases(f: DatasetFacts) -> list[str]:
    translated = sorted({t.lang for t in f.translations})
    return ["English pivot: every non-English caption is a translation of an English caption, so content, cultural "
            "references and ways of describing follow English-speaking web authors and annotators, not speakers of "
            "the other languages.",
            "Machine translation picks defaults where English is unmarked (grammatical gender, formality)"
            + (f" in {', '.join(translated)}" if translated else "") + ", which can skew how people are described.",
            "The images are Flickr and web photographs, mostly from North America and Europe; the sources' own "
            "selection biases carry over."]


LIMITATIONS = ("Translations are machine-made and not checked by people: mistranslations, repetition loops, copied "
               "English and truncation remain; the quality scores and ok flag catch only some of them.",
               "Image urls rot: a share of them no longer resolves, so what a user can download shrinks over time.",
               "Not an evaluation set, and not a measure of translation quality.")
USE_CASES = ("Pre-training multilingual image-text models (cross-lingual cross-modal retrieval, e.g. CCRk, CCLM, "
             "CL2CM).",
             "Not intended for identifying or profiling people, nor as an evaluation benchmark.")


def maintenance(f: DatasetFacts) -> str:
    return (f"Content-versioned: dataset version {f.version} is a hash of its sources' and translations' versions, "
            f"its build parameters and the code version ({f.code_version}); any change yields a new version and "
            "this one does not change. No scheduled updates; rebuild and re-export with ccrk build and ccrk export.")


def licences(f: DatasetFacts) -> list[tuple[str, str, str | None]]:
    """(what, licence, url) for every translation model and every source."""
    out = [(f"translations by {m.name}", m.licence, m.licence_url) for m in f.models]
    for x in f.sources:
        t = x.terms
        out += [(t.title, t.terms, url) for url in (t.licence_urls or (None,))]
    return out


def responsible_ai(f: DatasetFacts) -> dict:
    """Croissant's RAI properties (vocabulary http://mlcommons.org/croissant/RAI/)."""
    rai = {
        "rai:dataCollection": collection_text(f),
        "rai:dataCollectionType": collection_types(f),
        "rai:dataCollectionRawData": "; ".join(f"{x.terms.title} ({x.terms.url or 'no url recorded'})" for x in f.sources),
        "rai:dataCollectionMissingData": missing_data_text(f),
        "rai:dataPreprocessingProtocol": translation_lines(f) + filter_lines(f) + [lang_count_text(f)],
        "rai:dataAnnotationProtocol": [f"English captions as the sources have them: {x.terms.title}: {x.terms.origin}."
                                       for x in f.sources]
                                      + ["Non-English captions: machine translations, no human annotation or review."],
        "rai:machineAnnotationTools": [f"{t.model.name} ({t.model_id}, {t.decoding}) for {t.lang}" for t in f.translations]
                                      + ["img2dataset (image download and resizing)",
                                         f"ccrk {f.code_version} (quality scores, language policy, shards)"],
        "rai:personalSensitiveInformation": personal_information(f),
        "rai:dataBiases": biases(f),
        "rai:dataLimitations": list(LIMITATIONS) + ([] if f.benchmark_overlap else [benchmark_text(f)]),
        "rai:dataUseCases": list(USE_CASES),
        "rai:dataSocialImpact": "Extends image-text models beyond English; the biases and limitations above travel "
                                "with any model trained on it.",
        "rai:dataReleaseMaintenancePlan": maintenance(f),
    }
    if f.collection_timeframe:
        rai["rai:dataCollectionTimeframe"] = f.collection_timeframe
    return rai


# --- the dataset card ---------------------------------------------------------------------------

def dataset_card(f: DatasetFacts, files: dict) -> str:
    header = {
        "pretty_name": f"{f.name} (K-lingual captions, version {f.version})",
        "language": f.langs,
        "multilinguality": "multilingual",
        "license": "other",
        "license_name": "mixed-source-terms",
        "license_details": "Translations: " + ("; ".join(f"{m.name}: {m.licence}" for m in f.models) or "none")
                           + ". Captions and image urls: " + "; ".join(f"{x.terms.title}: {x.terms.terms}"
                                                                     for x in f.sources),
        "size_categories": [size_category(max(files.values()) if files else 0)],
        "source_datasets": [f"extended|{x.terms.hf}" for x in f.sources],
        "task_categories": ["image-to-text", "text-to-image", "translation"],
        "configs": [{"config_name": lang, "data_files": [{"split": "train", "path": f"data/{lang}.parquet"}]}
                    for lang in f.langs],
    }
    lines = ["---", yaml.safe_dump(header, sort_keys=False, allow_unicode=True).rstrip(), "---", "",
             f"# {f.name} — K-lingual image captions", "",
             f"Dataset version `{f.version}` (code version {f.code_version}): {f.n_samples:,} images "
             f"with captions in {', '.join(f.langs)}. Each language file has one row per caption: the English "
             "caption, its translation, the translation's quality scores, the image url and the source ids. "
             "No image bytes are distributed; fetch images from their urls under their owners' terms.", ""]
    if not f.benchmark_overlap:
        lines += [f"> **Warning:** {benchmark_text(f)}", ""]
    lines += ["## Captions per language", "", "| language | captions |", "|---|---|"]
    lines += [f"| {lang} | {n:,} |" for lang, n in f.captions_by_lang.items()]
    lines += ["", "## Languages per sample", ""]
    if f.lang_counts:
        lines += ["| languages | samples |", "|---|---|"]
        lines += [f"| {k} | {n:,} |" for k, n in sorted(f.lang_counts.items(), reverse=True)]
    else:
        lines.append("Not recorded in this manifest.")
    lines += ["", "## Evaluation benchmarks excluded", ""]
    if f.benchmark_overlap:
        lines += ["Images of these benchmarks were removed at build time (matched by source id, url, sha256 of the "
                  "image bytes and a perceptual hash):", "", "| benchmark | images removed | matched by |",
                  "|---|---|---|"]
        lines += [f"| {b} | {n:,} | {_kinds(f, b).strip(' ()').removeprefix('by ')} |"
                  for b, n in f.benchmark_overlap.items()]
    else:
        lines.append("No benchmark excluded.")
    lines += ["", "## Translation", "", "| language | model | decoding | model_id | decode_id | licence |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {t.lang} | {t.model.name} | {t.decoding} | {t.model_id} | {t.decode_id} | {t.model.licence} |"
              for t in f.translations]
    lines += ["", "## Filters", ""] + [f"- {line}" for line in filter_lines(f)]
    lines += ["", "## Sources and their terms", "", "| source | images | captions and images | terms |",
              "|---|---|---|---|"]
    for x in f.sources:
        t = x.terms
        lines.append(f"| [{t.title}]({t.url}) | {x.images:,} | {t.origin}; images {x.fetched} | {t.terms} |")
    lines += ["", "## Personal and sensitive information", ""] + [f"- {x}" for x in personal_information(f)]
    lines += ["", "## Biases and limitations", ""] + [f"- {x}" for x in biases(f) + list(LIMITATIONS)]
    lines += ["", "## Uses", ""] + [f"- {x}" for x in USE_CASES]
    lines += ["", "## Dropped rows (language policy and join)", "", "| unit | reason | language | count |",
              "|---|---|---|---|"]
    lines += [f"| {d['unit']} | {d['reason']} | {d['lang'] or ''} | {d['count']:,} |" for d in f.drops]
    lines += ["", "## Lineage", "", "| kind | name | value |", "|---|---|---|"]
    lines += [f"| {k} | {n} | `{v}` |" for k, n, v in f.lineage]
    lines += ["", "## Maintenance", "", maintenance(f)]
    return "\n".join(lines) + "\n"


# --- croissant.json -----------------------------------------------------------------------------

# Croissant 1.1's context (its spec's Appendix 1, as mlcroissant writes it), with the RAI prefix.
CROISSANT_CONTEXT = {
    "@language": "en", "@vocab": "https://schema.org/", "annotation": "cr:annotation", "arrayShape": "cr:arrayShape",
    "citeAs": "cr:citeAs", "column": "cr:column", "conformsTo": "dct:conformsTo", "containedIn": "cr:containedIn",
    "cr": "http://mlcommons.org/croissant/", "rai": "http://mlcommons.org/croissant/RAI/",
    "data": {"@id": "cr:data", "@type": "@json"}, "dataType": {"@id": "cr:dataType", "@type": "@vocab"},
    "dct": "http://purl.org/dc/terms/", "equivalentProperty": "cr:equivalentProperty",
    "examples": {"@id": "cr:examples", "@type": "@json"}, "excludes": "cr:excludes", "extract": "cr:extract",
    "field": "cr:field", "fileProperty": "cr:fileProperty", "fileObject": "cr:fileObject", "fileSet": "cr:fileSet",
    "format": "cr:format", "includes": "cr:includes", "isArray": "cr:isArray", "isLiveDataset": "cr:isLiveDataset",
    "jsonPath": "cr:jsonPath", "key": "cr:key", "md5": "cr:md5", "parentField": "cr:parentField", "path": "cr:path",
    "readLines": "cr:readLines", "recordSet": "cr:recordSet", "references": "cr:references", "regex": "cr:regex",
    "repeated": "cr:repeated", "replace": "cr:replace", "samplingRate": "cr:samplingRate", "sc": "https://schema.org/",
    "sdVersion": "cr:sdVersion", "separator": "cr:separator", "source": "cr:source", "subField": "cr:subField",
    "transform": "cr:transform", "unArchive": "cr:unArchive", "value": "cr:value",
}
CONFORMS_TO = ["http://mlcommons.org/croissant/1.1", "http://mlcommons.org/croissant/RAI/1.0"]


def croissant_metadata(f: DatasetFacts, out_dir: str, files: dict) -> dict:
    distribution, record_sets = [], []
    for rel in files:
        lang = os.path.splitext(os.path.basename(rel))[0]
        fid = f"{lang}-parquet"
        distribution.append({"@type": "cr:FileObject", "@id": fid, "name": fid, "contentUrl": rel,
                             "encodingFormat": "application/x-parquet",
                             "sha256": file_sha256(os.path.join(out_dir, rel))})
        record_sets.append({"@type": "cr:RecordSet", "@id": lang, "name": lang,
                            "description": f"captions with their {lang} text",
                            "field": [{"@type": "cr:Field", "@id": f"{lang}/{col}", "name": col, "dataType": dtype,
                                       "source": {"fileObject": {"@id": fid}, "extract": {"column": col}}}
                                      for col, dtype in COLUMNS]})
    meta = {
        "@context": CROISSANT_CONTEXT, "@type": "sc:Dataset", "conformsTo": CONFORMS_TO,
        "name": f.name,
        "description": f"K-lingual image captions ({', '.join(f.langs)}), dataset version {f.version}: English "
                       f"captions from {', '.join(x.name for x in f.sources)} with machine translations "
                       f"({', '.join(m.name for m in f.models) or 'none'}). Image urls only, no image bytes.",
        "inLanguage": f.langs,
        # Every translation model's licence and every source's terms, each named.
        "license": [{"@type": "sc:CreativeWork", "name": f"{what}: {licence}", **({"url": url} if url else {})}
                    for what, licence, url in licences(f)],
        "version": "1.0.0",
        "citeAs": "ccrk K-lingual captions, dataset version " + f.version,
        "distribution": distribution,
        "recordSet": record_sets,
        **responsible_ai(f),
    }
    if f.built_at:  # the build's date, not the export's: exporting a version again gives the same file
        meta["dateCreated"] = meta["datePublished"] = f"{f.built_at:%Y-%m-%dT%H:%M:%S}"
    return meta
