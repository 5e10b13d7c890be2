"""`ccrk build`: join sources, captions and translations into a versioned K-lingual dataset."""
from __future__ import annotations


# The spec's fields this verb takes as flags (BuildSpec holds their defaults and help); source_versions
# comes as repeated --source-version SRC=VERSION.
FLAGS = ("name", "sources", "langs", "min_langs", "drop_flagged", "shard_size", "seed", "translations",
         "shards_per_task", "memory")


def add_parser(sub) -> None:
    from ccrk.app.cli import add_root_argument
    from storage.spec import add_arguments
    from storage.specs import BuildSpec

    p = sub.add_parser("build", help="build K-lingual WebDataset shards + manifest (datasets/<name>/<version>/)")
    add_root_argument(p)
    add_arguments(p, BuildSpec, fields=FLAGS)
    p.add_argument("--source-version", action="append", default=[], metavar="SRC=VERSION",
                   help="use this source version instead of the catalog's latest (repeatable)")
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
    from storage.spec import from_arguments
    from storage.specs import BuildSpec

    versions = {}
    for item in args.source_version:
        src, sep, ver = item.partition("=")
        if not sep or not src or not ver:
            raise CCRKError(f"--source-version {item!r}: expected SOURCE=VERSION")
        versions[src.strip()] = ver.strip()
    spec = from_arguments(BuildSpec, args, base={"source_versions": versions or None}, fields=FLAGS,
                          where="ccrk build")
    print_dataset_summary(build_flow(spec, root=args.root, progress=progress_bar))
    return 0
