"""`ccrk acquire`: official metadata of one source -> images.parquet, captions.parquet, image shards
(downloaded, from a WebDataset mirror with --from-webdataset, or from a local folder with --images)."""
from __future__ import annotations

# The spec's fields this verb takes as flags (AcquireSpec holds their defaults and help); the source,
# the repeatable --metadata, --from-webdataset and --allow-address, and --images are added by hand
# (--source is required).
FLAGS = ("limit", "image_size", "resize_mode", "resize_only_if_bigger", "processes", "thread_count", "timeout",
         "fetch_deadline", "max_image_bytes", "retries", "retry_failed", "number_sample_per_shard", "max_image_area",
         "encode_quality", "executor", "ray_address")
FLAG_NAMES = {"thread_count": "--threads", "number_sample_per_shard": "--shard-size"}


def add_parser(sub) -> None:
    import typing

    from ccrk.app.cli import add_root_argument
    from storage.spec import add_arguments
    from storage.specs import AcquireSpec

    fields = AcquireSpec.model_fields
    p = sub.add_parser("acquire", help="read a source's metadata and download its images (sources/<source>/<version>/)")
    add_root_argument(p)
    p.add_argument("--source", required=True, choices=list(typing.get_args(fields["source"].annotation)),
                   help=fields["source"].description)
    p.add_argument("--metadata", action="append", default=None, metavar="PATH_OR_URL",
                   help=f"{fields['metadata'].description} (repeatable; default: "
                        f"{fields['metadata'].json_schema_extra['shown']})")
    mirror = fields["from_webdataset"]
    p.add_argument("--from-webdataset", action="append", default=None, metavar="PATH_OR_URL", dest="from_webdataset",
                   help=f"{mirror.description} (repeatable; default: {mirror.json_schema_extra['shown']})")
    p.add_argument("--images", default=None, metavar="DIR", help=fields["images"].description)
    allow = fields["allow_addresses"]
    p.add_argument("--allow-address", action="append", default=None, metavar="HOST:PORT", dest="allow_addresses",
                   help=f"{allow.description} (repeatable; default: {allow.json_schema_extra['shown']})")
    add_arguments(p, AcquireSpec, fields=FLAGS, flags=FLAG_NAMES)
    p.set_defaults(func=run, runs_flows=True)


def print_summary(summary: dict) -> None:
    """The summary table of one source (also used by ``make demo``)."""
    from ccrk.app.console import console, print_table
    from flows.acquire import summary_rows

    print_table(f"acquire {summary['source']} {summary['version']}", ["", "value"],
                [(r["metric"], r["value"]) for r in summary_rows(summary)][2:])
    console.print(f"shards: {summary['path']}/shards")
    mirror = summary.get("mirror")
    if mirror:
        unmatched = mirror["unmatched_url"] + mirror["unmatched_caption"] + mirror["ambiguous_caption"]
        console.print(f"mirror: {mirror['filled']} of {mirror['targets']} images found, {mirror['not_in_mirror']} "
                      f"not in it; {unmatched} of its {mirror['samples']} samples matched no official row")
    if summary["shards_incomplete"]:
        console.print(f"[yellow]{summary['shards_incomplete']} shard(s) did not finish: run the same command again")


def run(args) -> int:
    from flows.acquire import acquire_flow
    from storage.spec import from_arguments
    from storage.specs import AcquireSpec

    from ccrk.app.console import progress_bar

    spec = from_arguments(AcquireSpec, args, base={"source": args.source, "metadata": args.metadata,
                                                   "from_webdataset": args.from_webdataset, "images": args.images,
                                                   "allow_addresses": args.allow_addresses},
                          fields=FLAGS, where="ccrk acquire")
    summary = acquire_flow(spec, root=args.root, progress=progress_bar)
    print_summary(summary)
    return 0 if summary["shards_incomplete"] == 0 else 1
