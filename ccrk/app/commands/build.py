"""`ccrk build`: join sources, captions and translations into a versioned K-lingual dataset."""
from __future__ import annotations


def add_parser(sub) -> None:
    from ccrk.app.cli import add_root_argument

    p = sub.add_parser("build", help="build K-lingual WebDataset shards + manifest (datasets/<name>/<version>/)")
    add_root_argument(p)
    p.add_argument("--name", default="default", help="dataset name (directory under datasets/)")
    p.add_argument("--sources", default="cc3m,sbu,vg,coco", help="comma-separated sources")
    p.add_argument("--langs", default="en,es,id,ru,tr", help="comma-separated languages of every caption")
    policy = p.add_mutually_exclusive_group()
    policy.add_argument("--min-langs", type=int, default=None,
                        help="keep a caption with at least N of the languages (default: all of them)")
    policy.add_argument("--all-langs", action="store_true", help="keep only captions with every language (default)")
    p.add_argument("--drop-flagged", action="store_true",
                   help="remove translations whose quality flag ok is false (default: keep them)")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample order")
    p.add_argument("--source-version", action="append", default=[], metavar="SRC=VERSION",
                   help="use this source version instead of the catalog's latest (repeatable)")
    p.add_argument("--translations", action="append", default=None, metavar="MODEL_ID/DECODE_ID",
                   help="use only these translation sets, in this priority order (repeatable; default: all)")
    p.add_argument("--shards-per-task", type=int, default=16, help="shards written by one Prefect task")
    p.add_argument("--memory", default=None, metavar="SIZE",
                   help="DuckDB's memory limit while planning, e.g. 8GB; beyond it temp tables spill to "
                        "the dataset's _build/duckdb-tmp (default: CCRK_BUILD_MEMORY, else a third of RAM). "
                        "The plan holds one bucket of CCRK_PLAN_BUCKET_ROWS kept captions (default 100000) "
                        "in memory at a time")
    p.set_defaults(func=run, runs_flows=True)


def print_dataset_summary(result: dict) -> None:
    """The summary table of a build (also used by ``make demo``)."""
    from ccrk.app.console import console, print_table

    console.print(result["message"])
    print_table(f"dataset {result['name']} {result['version']}", ["", "value"],
                [("path", result["path"]), ("samples", result["n_samples"]), ("shards", result["n_shards"]),
                 ("bytes", result["bytes"])]
                + [(f"captions [{lang}]", n) for lang, n in result["captions_by_lang"].items()])
    print_table("drops by reason", ["unit", "reason", "lang", "count"],
                [(d["unit"], d["reason"], d["lang"] or "", d["count"]) for d in result["drops"]]
                or [("-", "none", "", 0)])


def run(args) -> int:
    from ccrk.app.console import progress_bar
    from flows.build import build_flow
    from storage.errors import CCRKError
    from storage.languages import parse_langs

    versions = {}
    for item in args.source_version:
        src, sep, ver = item.partition("=")
        if not sep or not src or not ver:
            raise CCRKError(f"--source-version {item!r}: expected SOURCE=VERSION")
        versions[src.strip()] = ver.strip()
    result = build_flow(root=args.root, name=args.name, sources=list(parse_langs(args.sources)),
                        langs=list(parse_langs(args.langs)), min_langs=args.min_langs,
                        drop_flagged=args.drop_flagged, shard_size=args.shard_size, seed=args.seed,
                        source_versions=versions, translations=args.translations,
                        shards_per_task=args.shards_per_task, memory=args.memory, progress=progress_bar)
    print_dataset_summary(result)
    return 0

