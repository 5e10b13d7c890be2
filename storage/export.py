"""Publish a dataset's translated corpus: ``data/<lang>.parquet`` per language (caption,
translation, scores, image url, source ids -- no image bytes), a dataset card ``README.md`` with a
Hugging Face YAML header, and ``croissant.json`` (MLCommons Croissant 1.0 JSON-LD).
"""
from __future__ import annotations

import os

import yaml

from storage import atomic, manifest
from storage.errors import CCRKError
from storage.versioning import file_sha256

# Each source's terms (one place for these facts; the card lists them per source used).
SOURCE_TERMS = {
    "cc3m": {"title": "Conceptual Captions (CC3M)", "hf": "conceptual_captions",
             "terms": "Google LLC terms: may be freely used for any purpose, acknowledgement of Google "
                      "appreciated, provided as is; images stay under their owners' rights",
             "url": "https://github.com/google-research-datasets/conceptual-captions/blob/master/LICENSE"},
    "sbu": {"title": "SBU Captioned Photo Dataset", "hf": "sbu_captions",
            "terms": "captions and images from Flickr, distributed for research; images under the Flickr "
                     "terms of use and their owners' rights",
            "url": "https://www.cs.rice.edu/~vo9/sbucaptions/"},
    "vg": {"title": "Visual Genome", "hf": "visual_genome",
           "terms": "annotations CC BY 4.0; images under their owners' rights",
           "url": "https://homes.cs.washington.edu/~ranjay/visualgenome/"},
    "coco": {"title": "COCO Captions", "hf": "coco",
             "terms": "annotations CC BY 4.0; images under the Flickr terms of use",
             "url": "https://cocodataset.org/#termsofuse"},
}
SIZE_CATEGORIES = ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
                   (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"), (1_000_000_000, "100M<n<1B"))
COLUMNS = (("sample_key", "sc:Text"), ("image_key", "sc:Text"), ("source", "sc:Text"), ("source_id", "sc:Text"),
           ("image_url", "sc:URL"), ("caption_id", "sc:Text"), ("caption", "sc:Text"), ("translation", "sc:Text"),
           ("lang", "sc:Text"), ("model_id", "sc:Text"), ("decode_id", "sc:Text"), ("uniformity", "sc:Float"),
           ("copy_sim", "sc:Float"), ("len_ratio", "sc:Float"), ("script_ok", "sc:Boolean"), ("ok", "sc:Boolean"))


def model_licence(model_id: str) -> str:
    m = model_id.lower()
    if m.startswith("import:"):
        return f"imported translations ({model_id[7:]}): see that set's own licence"
    if "m2m" in m:
        return "MIT (M2M-100, Fan et al. 2021)"
    return "see the translation model's licence"


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
    card = dataset_card(s, langs, models, files)
    atomic.write_text(os.path.join(out_dir, "README.md"), card)
    croissant = croissant_metadata(s, out_dir, files, models)
    atomic.write_json(os.path.join(out_dir, "croissant.json"), croissant)
    return {"name": s["name"], "version": s["version"], "out": out_dir,
            "files": {**files, "README.md": None, "croissant.json": None}}


def _sources(s: dict) -> list[str]:
    return [name for kind, name, _ in s["lineage"] if kind == "source"]


def dataset_card(s: dict, langs: list[str], models: list[tuple], files: dict) -> str:
    sources = _sources(s)
    model_ids = sorted({m for _, m, _ in models})
    header = {
        "pretty_name": f"{s['name']} (K-lingual captions, version {s['version']})",
        "language": langs,
        "multilinguality": "multilingual",
        "license": "other",
        "license_name": "mixed-source-terms",
        "license_details": "Translations: " + "; ".join(f"{m}: {model_licence(m)}" for m in model_ids)
                           + ". Captions and image urls: " + "; ".join(
                               f"{SOURCE_TERMS.get(x, {}).get('title', x)}: {SOURCE_TERMS.get(x, {}).get('terms', 'see source')}"
                               for x in sources),
        "size_categories": [size_category(max(files.values()) if files else 0)],
        "source_datasets": [f"extended|{SOURCE_TERMS.get(x, {}).get('hf', x)}" for x in sources],
        "task_categories": ["image-to-text", "text-to-image", "translation"],
        "configs": [{"config_name": lang, "data_files": [{"split": "train", "path": f"data/{lang}.parquet"}]}
                    for lang in langs],
    }
    lines = ["---", yaml.safe_dump(header, sort_keys=False, allow_unicode=True).rstrip(), "---", "",
             f"# {s['name']} — K-lingual image captions", "",
             f"Dataset version `{s['version']}` (code version {s['code_version']}): {s['n_samples']:,} images "
             f"with captions in {', '.join(langs)}. Each language file has one row per caption: the English "
             "caption, its translation, the translation's quality scores, the image url and the source ids. "
             "No image bytes are distributed; fetch images from their urls under their owners' terms.", "",
             "## Captions per language", "", "| language | captions |", "|---|---|"]
    lines += [f"| {lang} | {n:,} |" for lang, n in s["captions_by_lang"].items()]
    lines += ["", "## Translation", "", "| language | model_id | decode_id | licence |", "|---|---|---|---|"]
    lines += [f"| {lang} | {m} | {d} | {model_licence(m)} |" for lang, m, d in models]
    lines += ["", "## Sources and their terms", "", "| source | images | terms |", "|---|---|---|"]
    for x in sources:
        t = SOURCE_TERMS.get(x, {"title": x, "terms": "see the source", "url": ""})
        lines.append(f"| [{t['title']}]({t['url']}) | {s['samples_by_source'].get(x, 0):,} | {t['terms']} |")
    lines += ["", "## Dropped rows (language policy and join)", "", "| unit | reason | language | count |",
              "|---|---|---|---|"]
    lines += [f"| {d['unit']} | {d['reason']} | {d['lang'] or ''} | {d['count']:,} |" for d in s["drops"]]
    lines += ["", "## Lineage", "", "| kind | name | value |", "|---|---|---|"]
    lines += [f"| {k} | {n} | `{v}` |" for k, n, v in s["lineage"]]
    return "\n".join(lines) + "\n"


CROISSANT_CONTEXT = {
    "@language": "en", "@vocab": "https://schema.org/", "citeAs": "cr:citeAs", "column": "cr:column",
    "conformsTo": "dct:conformsTo", "cr": "http://mlcommons.org/croissant/", "rai": "http://mlcommons.org/croissant/RAI/",
    "data": {"@id": "cr:data", "@type": "@json"}, "dataType": {"@id": "cr:dataType", "@type": "@vocab"},
    "dct": "http://purl.org/dc/terms/", "equivalentProperty": "cr:equivalentProperty", "examples": {"@id": "cr:examples", "@type": "@json"},
    "extract": "cr:extract", "field": "cr:field", "fileProperty": "cr:fileProperty", "fileObject": "cr:fileObject",
    "fileSet": "cr:fileSet", "format": "cr:format", "includes": "cr:includes", "isLiveDataset": "cr:isLiveDataset",
    "jsonPath": "cr:jsonPath", "key": "cr:key", "md5": "cr:md5", "parentField": "cr:parentField", "path": "cr:path",
    "recordSet": "cr:recordSet", "references": "cr:references", "regex": "cr:regex", "samplingRate": "cr:samplingRate", "repeated": "cr:repeated",
    "replace": "cr:replace", "sc": "https://schema.org/", "separator": "cr:separator", "source": "cr:source",
    "subField": "cr:subField", "transform": "cr:transform",
}


def croissant_metadata(s: dict, out_dir: str, files: dict, models: list[tuple]) -> dict:
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
    sources = _sources(s)
    return {
        "@context": CROISSANT_CONTEXT, "@type": "sc:Dataset", "conformsTo": "http://mlcommons.org/croissant/1.0",
        "name": s["name"],
        "description": f"K-lingual image captions ({', '.join(s['captions_by_lang'])}), dataset version "
                       f"{s['version']}: English captions from {', '.join(sources)} with machine translations "
                       f"({', '.join(sorted({m for _, m, _ in models})) or 'none'}). Image urls only, no image bytes.",
        # Translations: the model's licence; captions: each source's terms (listed in README.md).
        "license": ["https://spdx.org/licenses/MIT.html"]
                   + [SOURCE_TERMS[x]["url"] for x in sources if x in SOURCE_TERMS],
        "version": "1.0.0",
        "citeAs": "ccrk K-lingual captions, dataset version " + s["version"],
        "distribution": distribution,
        "recordSet": record_sets,
    }
