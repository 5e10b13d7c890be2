"""`ccrk evaluate`: retrieval Recall@K and MRV of a checkpoint on a benchmark, as a Prefect flow -> reports/<id>/."""
from __future__ import annotations

# The spec fields every benchmark verb takes as flags (BenchmarkSpec holds their defaults and help),
# besides the required --checkpoint, --benchmark and --data; FLAGS: ccrk evaluate's.
REQUIRED = ("checkpoint", "benchmark", "data")
BENCHMARK_FLAGS = ("images", "coco_images", "langs", "mrv_langs", "k_test", "itc_only", "skip_missing", "device")
FLAGS = BENCHMARK_FLAGS + ("batch_size",)


def add_benchmark_arguments(p, spec_cls, fields, required: bool = True) -> None:
    """The --checkpoint, --benchmark, --data (``required``), then ``fields`` of ``spec_cls`` as flags."""
    import typing

    from storage.spec import add_arguments

    info = spec_cls.model_fields
    p.add_argument("--checkpoint", required=required, help=info["checkpoint"].description)
    p.add_argument("--benchmark", required=required, choices=list(typing.get_args(info["benchmark"].annotation)),
                   help=info["benchmark"].description)
    p.add_argument("--data", required=required, help=info["data"].description)
    add_arguments(p, spec_cls, fields=fields)


def spec_from_arguments(spec_cls, args, fields, where: str):
    """The verb's spec from its flags (languages lower-cased, duplicates dropped, as before)."""
    from storage.languages import parse_langs
    from storage.spec import from_arguments

    values = dict(vars(args))
    for name in ("langs", "mrv_langs"):
        if values.get(name):
            values[name] = list(parse_langs(values[name]))
    return from_arguments(spec_cls, values, fields=REQUIRED + tuple(fields), where=where)


def add_parser(sub) -> None:
    from ccrk.app.cli import add_root_argument
    from ccrk.specs import EvaluateSpec

    p = sub.add_parser("evaluate", help="evaluate a checkpoint on a retrieval benchmark (Recall@K, MRV), or "
                                        "combine reports of one model per language (--combine)")
    add_root_argument(p)
    add_benchmark_arguments(p, EvaluateSpec, FLAGS, required=False)
    p.add_argument("--combine", nargs="+", metavar="REPORT[:LANGS]",
                   help="report directories or ids, each optionally with the languages taken from it "
                        "(e.g. reports/abc:de): one report, MRV over their ranks together (Table 1's few-shot "
                        "and single-language rows); --checkpoint/--benchmark/--data are then not used")
    p.set_defaults(func=run, runs_flows=True, parser=p)


def print_report(report: dict) -> None:
    from ccrk.app.console import console, print_table
    from ccrk.evaluation.reports import mrv_lines, table1_rows

    m = report["metrics"]
    rows = table1_rows(m)
    print_table(f"{m['benchmark']} (report {report['report_id']})", list(rows[0]), [list(r.values()) for r in rows])
    for line in mrv_lines(m["mrv"]):
        console.print(line)
    if m.get("collapsed_langs"):
        console.print(f"collapsed text embeddings: {', '.join(m['collapsed_langs'])}")
    console.print(f"report: {report['dir']}/report.md")


def run(args) -> int:
    from ccrk.specs import EvaluateSpec
    from flows.evaluate import evaluate_flow

    if args.combine:
        from flows.evaluate import combine_flow
        from storage.languages import parse_langs

        mrv = list(parse_langs(args.mrv_langs)) if args.mrv_langs else None
        print_report(combine_flow(args.combine, root=args.root, mrv_langs=mrv))
        return 0
    missing = [f"--{name}" for name in REQUIRED if not getattr(args, name)]
    if missing:
        args.parser.error(f"the following arguments are required: {', '.join(missing)}")
    spec = spec_from_arguments(EvaluateSpec, args, FLAGS, where="ccrk evaluate")
    print_report(evaluate_flow(spec, root=args.root))
    return 0
