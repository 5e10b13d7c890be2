"""`ccrk export DATASET_DIR --out DIR`: the translated corpus for publishing (parquet per language,
dataset card, croissant.json) -- no image bytes."""
from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="write per-language parquet, a dataset card and croissant.json")
    p.add_argument("dataset_dir", help="a dataset version directory (datasets/<name>/<version>)")
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(func=run)


def run(args) -> int:
    from ccrk.app.console import print_table
    from storage.export import export_dataset

    result = export_dataset(args.dataset_dir, args.out)
    print_table(f"exported {result['name']} {result['version']} to {result['out']}", ["file", "rows"],
                [(f, n) for f, n in result["files"].items()])
    return 0
