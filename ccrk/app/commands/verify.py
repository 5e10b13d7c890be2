"""`ccrk verify DATASET_DIR`: re-read every shard against the manifest; non-zero exit on any fault."""
from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("verify", help="re-read every shard of a dataset and report faults")
    p.add_argument("dataset_dir", help="a dataset version directory (datasets/<name>/<version>)")
    p.add_argument("--quick", action="store_true", help="sizes and sha256 only (do not parse samples)")
    p.add_argument("--workers", type=int, default=None,
                   help="shards checked at once, in threads (default: one per CPU, at most 8)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ccrk.app.console import console, print_table, progress_bar
    from storage.manifest import shard_records
    from storage.verify import verify_dataset

    total = len(shard_records(args.dataset_dir))
    with progress_bar("verify shards", total, unit="shards") as advance:
        report = verify_dataset(args.dataset_dir, deep=not args.quick, progress=advance,
                                workers=args.workers)
    if report.ok:
        console.print(f"ok: {report.n_shards} shards, {report.n_samples} samples, "
                      f"{report.bytes_read:,} bytes verified in {report.path}")
        return 0
    print_table(f"{len(report.problems)} problem(s) in {report.path}", ["kind", "shard", "detail"],
                [(p.kind, p.shard, p.detail) for p in report.problems])
    return 1
