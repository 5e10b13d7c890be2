"""`ccrk acquire`: official metadata of one source -> images.parquet, captions.parquet, image shards."""
from __future__ import annotations

SOURCES = ("cc3m", "sbu", "vg", "coco")


def add_parser(sub) -> None:
    from ccrk.app.cli import add_root_argument

    p = sub.add_parser("acquire", help="read a source's metadata and download its images (sources/<source>/<version>/)")
    add_root_argument(p)
    p.add_argument("--source", required=True, choices=SOURCES, help="which dataset's metadata format")
    p.add_argument("--metadata", action="append", default=None, metavar="PATH_OR_URL",
                   help="official metadata file or archive, local or http(s) (repeatable; default: official urls)")
    p.add_argument("--limit", type=int, default=None, help="read at most N images")
    p.add_argument("--image-size", type=int, default=256, help="side of the stored images (pixels)")
    p.add_argument("--resize-mode", default="border", choices=("no", "keep_ratio", "center_crop", "border",
                                                                 "keep_ratio_largest"), help="img2dataset resize mode")
    p.add_argument("--processes", type=int, default=1, help="download processes")
    p.add_argument("--threads", type=int, default=16, help="download threads per process")
    p.add_argument("--timeout", type=int, default=10, help="seconds before a request times out")
    p.add_argument("--shard-size", type=int, default=10_000, help="images per shard")
    p.add_argument("--retry-failed", action="store_true",
                   help="download again the images that failed with retryable errors (timeouts, 5xx, connection)")
    p.add_argument("--executor", choices=("local", "ray"), default="local",
                   help="local: download processes on this machine; ray: one Ray task per shard")
    p.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="with --executor ray: a running cluster (HOST:PORT, ray://HOST:10001 or auto); "
                        "default: a local cluster for this run")
    p.set_defaults(func=run, runs_flows=True)


def print_summary(summary: dict) -> None:
    """The summary table of one source (also used by ``make demo``)."""
    from ccrk.app.console import console, print_table
    from flows.acquire import summary_rows

    print_table(f"acquire {summary['source']} {summary['version']}", ["", "value"],
                [(r["metric"], r["value"]) for r in summary_rows(summary)][2:])
    console.print(f"shards: {summary['path']}/shards")
    if summary["shards_incomplete"]:
        console.print(f"[yellow]{summary['shards_incomplete']} shard(s) did not finish: run the same command again")


def run(args) -> int:
    from flows.acquire import acquire_flow
    from storage.errors import CCRKError

    for name in ("limit", "image_size", "processes", "threads", "timeout", "shard_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise CCRKError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if args.ray_address and args.executor != "ray":
        raise CCRKError("--ray-address needs --executor ray")
    summary = acquire_flow(source=args.source, metadata=args.metadata, root=args.root, limit=args.limit,
                           image_size=args.image_size, resize_mode=args.resize_mode, processes=args.processes,
                           thread_count=args.threads, timeout=args.timeout, retry_failed=args.retry_failed,
                           number_sample_per_shard=args.shard_size, progress=True, executor=args.executor,
                           ray_address=args.ray_address)
    print_summary(summary)
    return 0 if summary["shards_incomplete"] == 0 else 1
