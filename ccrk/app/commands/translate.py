"""`ccrk translate`: English captions of acquired sources -> ES/ID/RU/TR with M2M-100 (resumable, scored).

Also `ccrk translate --import FILE --name NAME` to import existing translations (CCLM/UC2 JSON
lines or parquet) as model_id ``import:NAME``.
"""
from __future__ import annotations


# The spec's fields this verb takes as flags (TranslateSpec holds their defaults and help).
FLAGS = ("langs", "model", "sources", "engine", "device", "compute_type", "beam_size", "max_len_a", "max_len_b",
         "max_input_tokens", "part_size", "token_budget", "max_batch_size", "threads", "executor", "ray_address")
FLAG_NAMES = {"beam_size": ["--beam", "--beam-size"]}


def add_parser(sub) -> None:
    from ccrk.app.cli import add_root_argument
    from storage.spec import add_arguments
    from translation.spec import TranslateSpec

    p = sub.add_parser("translate", help="translate captions with M2M-100 into the translation store",
                       description=__doc__)
    add_root_argument(p)
    add_arguments(p, TranslateSpec, fields=FLAGS, flags=FLAG_NAMES)
    p.add_argument("--import", dest="import_path", default=None, metavar="FILE",
                   help="import existing translations (JSON lines or parquet) instead of translating")
    p.add_argument("--name", default=None, help="with --import: the import's name (model_id import:NAME)")
    p.set_defaults(func=run, runs_flows=True)


def run(args) -> int:
    from ccrk.app.console import progress_bar
    from flows.translate import translate_flow
    from storage.errors import CCRKError
    from storage.spec import from_arguments
    from translation.spec import TranslateSpec

    if args.import_path:
        if not args.name:
            raise CCRKError("--import needs --name (the imported rows get model_id import:NAME)")
        return _run_import(args, args.langs)
    spec = from_arguments(TranslateSpec, args, fields=FLAGS, where="ccrk translate")
    print_translation_summary(translate_flow(spec, root=args.root, progress=progress_bar))
    return 0


def print_translation_summary(summary: dict) -> None:
    """Counts per language and a few sample translations with their scores (also used by ``make demo``)."""
    from ccrk.app.console import console, print_table

    console.print(f"model_id {summary['model_id']}  decode_id {summary['decode_id']}  "
                  f"sources {', '.join(summary['sources'])}", markup=False)
    console.print(f"{summary['captions']} captions, {summary['unique_texts']} unique texts, "
                  f"{summary['skipped_empty']} empty skipped, {summary['parts']} parts in {summary['wall_s']} s")
    print_table("translation summary", ["lang", "texts", "already", "translated", "skipped", "flagged",
                                        "truncated", "captions/s"],
                [(r["lang"], r["texts"], r["already_stored"], r["translated"], r["skipped_empty"], r["flagged"],
                  r["truncated"], r["captions_per_s"]) for r in summary["per_lang"]])
    print_table("sample translations", ["lang", "source", "translation", "ok", "unif", "copy", "len"],
                [(lang, r["src_text"], r["tgt_text"], r["ok"], r["uniformity"], r["copy_sim"], r["len_ratio"])
                 for lang, rows in summary["samples"].items() for r in rows])
    for imp in summary.get("imports", []):
        if imp["sources"]:
            print_table(f"import:{imp['name']} ({imp['rows']} rows, {imp['unmatched_rows']} matching no caption)",
                        ["source", "unique captions", "matched", "rate"],
                        [(m["source"], m["captions"], m["matched"], f"{m['rate']:.1%}") for m in imp["sources"]])
    for warning in summary.get("warnings", []):
        console.print(f"warning: {warning}", markup=False)
    console.print(f"recorded translation {summary['version']} -> {summary['path']}", markup=False)


def _run_import(args, langs) -> int:
    from ccrk.app.console import console, print_table
    from storage import layout
    from translation.imports import bad_key_warning, import_translations

    stats = import_translations(layout.data_root(args.root), args.import_path, args.name, langs=langs)
    print_table(f"import:{args.name} ({stats.rows} rows, {stats.bad_rows} bad rows skipped)",
                ["lang", "imported", "already", "flagged"],
                [(lang, n, stats.already.get(lang, 0), stats.flagged.get(lang, 0))
                 for lang, n in sorted(stats.imported.items())])
    warning = bad_key_warning(args.name, stats)
    if warning:
        console.print(f"warning: {warning}", markup=False)
    return 0
