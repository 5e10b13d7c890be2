"""`ccrk evaluate`: retrieval Recall@K and MRV of a checkpoint on a benchmark, as a Prefect flow -> reports/<id>/."""
from __future__ import annotations

# The spec fields every benchmark verb takes as flags (BenchmarkSpec holds their defaults and help),
# besides the required --checkpoint, --benchmark and --data; FLAGS: ccrk evaluate's.
REQUIRED = ("checkpoint", "benchmark", "data")
BENCHMARK_FLAGS = ("images", "coco_images", "langs", "mrv_langs", "k_test", "itc_only", "skip_missing", "device")
FLAGS = BENCHMARK_FLAGS + ("batch_size",)


def add_benchmark_arguments(p, spec_cls, fields) -> None:
    """The required --checkpoint, --benchmark, --data, then ``fields`` of ``spec_cls`` as flags."""
    import typing

    from storage.spec import add_arguments

    info = spec_cls.model_fields
    p.add_argument("--checkpoint", required=True, help=info["checkpoint"].description)
    p.add_argument("--benchmark", required=True, choices=list(typing.get_args(info["benchmark"].annotation)),
                   help=info["benchmark"].description)
    p.add_argument("--data", required=True, help=info["data"].description)
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

    p = sub.add_parser("evaluate", help="evaluate a checkpoint on a retrieval benchmark (Recall@K, MRV)")
    add_root_argument(p)
    add_benchmark_arguments(p, EvaluateSpec, FLAGS)
    p.set_defaults(func=run, runs_flows=True)


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

    spec = spec_from_arguments(EvaluateSpec, args, FLAGS, where="ccrk evaluate")
    print_report(evaluate_flow(spec, root=args.root))
    return 0
