"""`ccrk build`: join sources, captions and translations into a versioned K-lingual dataset, keeping
the images of evaluation benchmarks out (``--exclude`` lists, or ``--exclude-benchmark`` made here)."""
from __future__ import annotations


# The spec's fields this verb takes as flags (BuildSpec holds their defaults and help); source_versions
# comes as repeated --source-version SRC=VERSION, exclude as --exclude / --exclude-benchmark.
FLAGS = ("name", "sources", "langs", "min_langs", "drop_flagged", "shard_size", "seed", "translations",
         "exclude_kinds", "exclude_phash_distance", "shards_per_task", "memory")


def add_parser(sub) -> None:
    from ccrk.app.cli import add_root_argument
    from ccrk.evaluation.benchmarks import BENCHMARKS
    from storage.spec import add_arguments
    from storage.specs import BuildSpec, ExcludeBenchmark

    p = sub.add_parser("build", help="build K-lingual WebDataset shards + manifest (datasets/<name>/<version>/)",
                       description="Build a K-lingual dataset. Evaluation images are kept out with --exclude "
                                   "(exclusion lists) or --exclude-benchmark (its list is made first, under "
                                   "exclusions/<benchmark>/<version>/): a source image is dropped when its COCO or "
                                   "Flickr id, url, downloaded bytes (sha256) or pHash match one of the benchmark's "
                                   "evaluation images; the drops are counted as benchmark_overlap.")
    add_root_argument(p)
    add_arguments(p, BuildSpec, fields=FLAGS)
    p.add_argument("--source-version", action="append", default=[], metavar="SRC=VERSION",
                   help="use this source version instead of the catalog's latest (repeatable)")
    p.add_argument("--exclude", action="append", default=[], metavar="LIST",
                   help="keep out the images of this exclusion list: a parquet file (benchmark, split, kind, "
                        "value), a folder holding exclusion.parquet, or an exclusion artifact's version "
                        "(repeatable, or comma-separated)")
    info = ExcludeBenchmark.model_fields
    p.add_argument("--exclude-benchmark", choices=list(BENCHMARKS), metavar="BENCHMARK",
                   help=f"keep out this benchmark's evaluation images ({', '.join(BENCHMARKS)}; its test and val "
                        "splits as ccrk.evaluation.exclusion.EVALUATION_SPLITS lists them: the README's Benchmark "
                        "exclusion), its files given by --benchmark-data, --benchmark-images and "
                        "--benchmark-coco-images")
    p.add_argument("--benchmark-data", metavar="DIR", help=info["data"].description)
    p.add_argument("--benchmark-images", metavar="DIR", help=info["images"].description)
    p.add_argument("--benchmark-coco-images", metavar="DIR", help=info["coco_images"].description)
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
    for made in result.get("exclusion_lists") or ():
        missing = f" ({made['missing']} without their file: matched by id and url only)" if made["missing"] else ""
        console.print(f"exclusion list {made['benchmark']} {made['version']}: {made['n_images']} evaluation "
                      f"images{missing} -> {made['list']}")
    if result.get("overlap_by_kind"):
        print_table("benchmark overlap (evaluation images kept out)", ["benchmark", "kind", "images"],
                    [(r["benchmark"], r["kind"], r["n_images"]) for r in result["overlap_by_kind"]]
                    + [(bench, "all", n) for bench, n in result.get("benchmark_overlap", {}).items()])


def run(args) -> int:
    from ccrk.app.console import progress_bar
    from flows.build import build_flow
    from storage.errors import CCRKError
    from storage.spec import from_arguments
    from storage.specs import BuildSpec

    versions = {}
    for item in args.source_version:
        src, sep, ver = item.partition("=")
        if not sep or not src or not ver:
            raise CCRKError(f"--source-version {item!r}: expected SOURCE=VERSION")
        versions[src.strip()] = ver.strip()
    exclude: list = [part.strip() for item in args.exclude for part in item.split(",") if part.strip()]
    if args.exclude_benchmark:
        if not args.benchmark_data:
            raise CCRKError(f"--exclude-benchmark {args.exclude_benchmark} needs --benchmark-data DIR")
        exclude.append({"benchmark": args.exclude_benchmark, "data": args.benchmark_data,
                        "images": args.benchmark_images, "coco_images": args.benchmark_coco_images})
    elif args.benchmark_data or args.benchmark_images or args.benchmark_coco_images:
        raise CCRKError("--benchmark-data/--benchmark-images name the files of --exclude-benchmark: give it too")
    base = {"source_versions": versions or None, **({"exclude": exclude} if exclude else {})}
    spec = from_arguments(BuildSpec, args, base=base, fields=FLAGS, where="ccrk build")
    print_dataset_summary(build_flow(spec, root=args.root, progress=progress_bar))
    return 0
