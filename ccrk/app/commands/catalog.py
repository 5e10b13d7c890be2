"""`ccrk catalog` and `ccrk lineage VERSION`: read the artifact catalog."""
from __future__ import annotations


def add_parser(sub) -> None:
    from ccrk.app.cli import add_root_argument

    p = sub.add_parser("catalog", help="list the artifacts recorded in the catalog")
    add_root_argument(p)
    p.add_argument("--kind", default=None, help="only this kind (source, translation, dataset, run, report)")
    p.set_defaults(func=run_catalog)

    p = sub.add_parser("lineage", help="walk an artifact back to its sources")
    add_root_argument(p)
    p.add_argument("version", help="artifact version (or a unique prefix)")
    p.set_defaults(func=run_lineage)


def run_catalog(args) -> int:
    from ccrk.app.console import print_table
    from storage.catalog import Catalog

    arts = Catalog(args.root).list(args.kind)
    print_table(f"catalog ({len(arts)} artifacts)", ["kind", "name", "version", "parents", "path"],
                [(a.kind, a.name, a.version, len(a.parents), a.path) for a in arts])
    return 0


def run_lineage(args) -> int:
    from ccrk.app.console import print_table
    from storage.catalog import Catalog
    from storage.errors import CCRKError

    cat = Catalog(args.root)
    art = cat.find(args.version)
    if art is None:
        raise CCRKError(f"no artifact with version {args.version!r} in {cat.path}")
    rows = cat.lineage(art.version)
    print_table(f"lineage of {art.kind} {art.name} {art.version}", ["depth", "kind", "name", "version", "path"],
                [("  " * d + str(d), a.kind, a.name, a.version, a.path) for d, a in rows])
    return 0
