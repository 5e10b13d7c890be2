"""`ccrk evaluate`: retrieval Recall@K and MRV of a checkpoint on a benchmark, as a Prefect flow -> reports/<id>/."""
from __future__ import annotations

BENCHMARKS = ("xflickrco", "multi30k", "coco", "wit", "demo")


def add_benchmark_arguments(p) -> None:
    p.add_argument("--checkpoint", required=True, help="run directory, checkpoint directory, run id or run version")
    p.add_argument("--benchmark", required=True, choices=BENCHMARKS)
    p.add_argument("--data", required=True, help="benchmark folder (xFlickrCO: holds annotations/<lang>/; "
                                                 "Multi30K/COCO: the CCLM json files; WIT: test_<lang>.jsonl)")
    p.add_argument("--images", default=None, help="image folder (Flickr30K images for xFlickrCO; the CCLM image "
                                                  "root for Multi30K/COCO); default <data>/images")
    p.add_argument("--coco-images", default=None, help="COCO val2014 folder (xFlickrCO's COCO half)")
    p.add_argument("--langs", default=None, help="comma-separated languages to evaluate (default: all present)")
    p.add_argument("--mrv-langs", default=None, help="languages over which MRV is computed (default: the paper's set for the "
                                                       "benchmark when all its languages are evaluated, else --langs)")
    p.add_argument("--k-test", type=int, default=None, help="candidates re-ranked by ITM (default 128; COCO 256)")
    p.add_argument("--itc-only", action="store_true", help="rank by ITC similarity only (no ITM re-ranking)")
    p.add_argument("--skip-missing", action="store_true", help="skip (and count) images that are missing")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")


def add_parser(sub) -> None:
    from ccrk.app.cli import add_root_argument

    p = sub.add_parser("evaluate", help="evaluate a checkpoint on a retrieval benchmark (Recall@K, MRV)")
    add_root_argument(p)
    add_benchmark_arguments(p)
    p.add_argument("--batch-size", type=int, default=64)
    p.set_defaults(func=run, runs_flows=True)


def device_of(args) -> str:
    if args.device:
        return args.device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


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
    from flows.evaluate import evaluate_flow
    from storage.languages import parse_langs

    out = evaluate_flow(root=args.root, checkpoint=args.checkpoint, benchmark=args.benchmark, data_dir=args.data,
                        langs=list(parse_langs(args.langs)) if args.langs else None,
                        mrv_langs=list(parse_langs(args.mrv_langs)) if args.mrv_langs else None,
                        k_test=args.k_test, itc_only=args.itc_only, images=args.images, coco_images=args.coco_images,
                        skip_missing=args.skip_missing, batch_size=args.batch_size, device=device_of(args))
    print_report(out)
    return 0
