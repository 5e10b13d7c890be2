"""`ccrk translate`: English captions of acquired sources -> ES/ID/RU/TR with M2M-100 (resumable, scored).

Also `ccrk translate --import FILE --name NAME` to import existing translations (CCLM/UC2 JSON
lines or parquet) as model_id ``import:NAME``.
"""
from __future__ import annotations


def add_parser(sub) -> None:
    from ccrk.app.cli import add_root_argument

    p = sub.add_parser("translate", help="translate captions with M2M-100 into the translation store",
                       description=__doc__)
    add_root_argument(p)
    p.add_argument("--sources", default=None,
                   help="comma-separated sources: name, name@version or version (default: latest of each)")
    p.add_argument("--langs", default=None, help="target languages (default from configs/translation.yaml)")
    p.add_argument("--model", default=None, help="local M2M-100 directory (default: the committed demo model)")
    p.add_argument("--engine", choices=("ctranslate2", "transformers"), default=None)
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N | auto (all visible GPUs)")
    p.add_argument("--compute-type", default=None,
                   help="ctranslate2: float32 int8 (cpu), float16 bfloat16 int8_float16 (gpu); auto")
    p.add_argument("--beam", type=int, default=None, help="beam size (1 = greedy, the default)")
    p.add_argument("--part-size", type=int, default=None, help="unique texts per stored part / task")
    p.add_argument("--token-budget", type=int, default=None, help="padded source tokens per batch")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for the engine (0 = library default)")
    p.add_argument("--executor", choices=("local", "ray"), default="local",
                   help="local: one worker per device of this machine; ray: one Ray task per part (one GPU each)")
    p.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="with --executor ray: a running cluster (HOST:PORT, ray://HOST:10001 or auto); "
                        "default: a local cluster for this run")
    p.add_argument("--import", dest="import_path", default=None, metavar="FILE",
                   help="import existing translations (JSON lines or parquet) instead of translating")
    p.add_argument("--name", default=None, help="with --import: the import's name (model_id import:NAME)")
    p.set_defaults(func=run, runs_flows=True)


def run(args) -> int:
    from storage.errors import CCRKError
    from storage.languages import parse_langs
    from translation.scores import load_config

    defaults = load_config()["defaults"]
    langs = list(parse_langs(args.langs)) if args.langs else list(defaults["langs"])
    if args.import_path:
        if not args.name:
            raise CCRKError("--import needs --name (the imported rows get model_id import:NAME)")
        return _run_import(args, langs if args.langs else None)

    if args.ray_address and args.executor != "ray":
        raise CCRKError("--ray-address needs --executor ray")
    from ccrk.app.console import progress_bar
    from flows.translate import translate_flow

    summary = translate_flow(
        root=args.root, langs=langs, model=args.model,
        sources=[s for s in args.sources.split(",") if s] if args.sources else None,
        engine=args.engine or defaults["engine"], device=args.device or defaults["device"],
        compute_type=args.compute_type or defaults["compute_type"],
        beam_size=args.beam or defaults["beam_size"], max_len_a=defaults["max_len_a"],
        max_len_b=defaults["max_len_b"], part_size=args.part_size or defaults["part_size"],
        token_budget=args.token_budget or defaults["token_budget"], max_batch_size=defaults["max_batch_size"],
        threads=args.threads, progress=progress_bar, executor=args.executor, ray_address=args.ray_address)
    print_translation_summary(summary)
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
    console.print(f"recorded translation {summary['version']} -> {summary['path']}", markup=False)


def _run_import(args, langs) -> int:
    from ccrk.app.console import print_table
    from storage import layout
    from translation.imports import import_translations

    stats = import_translations(layout.data_root(args.root), args.import_path, args.name, langs=langs)
    print_table(f"import:{args.name} ({stats.rows} rows, {stats.bad_rows} bad rows skipped)",
                ["lang", "imported", "already", "flagged"],
                [(lang, n, stats.already.get(lang, 0), stats.flagged.get(lang, 0))
                 for lang, n in sorted(stats.imported.items())])
    return 0
