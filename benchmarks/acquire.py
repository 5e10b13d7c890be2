"""Benchmark: ``ccrk acquire`` against bare ``img2dataset.download`` on the same loopback urls, in one run.

Draws a demo-like corpus (small shape JPEGs, :mod:`storage.demo.corpus`), serves it with
:mod:`storage.demo.server` and writes a CC3M training tsv of ``--urls`` distinct urls (>= 2,000).
Then, alternating, best of ``--repeat``:
  img2dataset -- ``img2dataset.download`` of that source's images.parquet, same settings
  ccrk        -- ``ccrk acquire --source cc3m --metadata TSV`` as a user runs it (a fresh root each
                 time): Prefect flow, metadata adapter, shard validation, img2dataset, status,
                 summary.json, catalog record, table artifact.
One-time costs are excluded from both: Prefect's local server is started (and img2dataset imported)
before timing. Prints a table; the last line is ``overhead_vs_img2dataset=X.XX`` (ccrk / bare, wall).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")


def write_tsv(corpus_dir: str, base_url: str, n_urls: int) -> str:
    """``n_urls`` distinct urls (a query string per row) over the corpus images, as CC3M's tsv."""
    from storage.demo.corpus import load_manifest

    files = [im["file"] for im in load_manifest(corpus_dir)["images"]]
    path = os.path.join(corpus_dir, "Train_GCC-training.tsv")
    with open(path, "w", encoding="utf-8") as f:
        for n in range(n_urls):
            f.write(f"shapes on a plain background, picture {n}\t{base_url}/{files[n % len(files)]}?n={n}\n")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--urls", type=int, default=2000)
    parser.add_argument("--images", type=int, default=200, help="distinct demo images behind the urls")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--threads", type=int, default=32)
    parser.add_argument("--shard-size", type=int, default=500)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args(argv)
    if args.urls < 2000:
        parser.error("--urls must be at least 2000")

    import img2dataset  # noqa: F401 - one-time import, outside the timings
    from prefect import flow

    from ccrk.app.cli import main as ccrk
    from ccrk.app.console import print_table
    from storage.demo.corpus import generate_demo_corpus
    from storage.demo.server import serve
    from storage.download import ENCODE_FORMAT, OOM_SHARD_COUNT, OPT_OUT_DIRECTIVES

    @flow(name="benchmark-warm-up")
    def warm_up() -> int:
        return 0

    work = args.workdir or tempfile.mkdtemp(prefix="ccrk-bench-acquire-")
    corpus = os.path.join(work, "corpus")
    generate_demo_corpus(corpus, seed=0, n_train=args.images, n_heldout=0, image_px=128)
    warm_up()  # starts Prefect's local server once (not part of a download)

    times: dict[str, list[float]] = {"img2dataset": [], "ccrk": []}
    ok: dict[str, int] = {}
    with serve(corpus) as server:
        tsv = write_tsv(corpus, server.url, args.urls)
        command = ["acquire", "--source", "cc3m", "--metadata", tsv, "--image-size", str(args.image_size),
                   "--processes", str(args.processes), "--threads", str(args.threads),
                   "--shard-size", str(args.shard_size), "--allow-address", server.address]
        for r in range(args.repeat):
            root = os.path.join(work, f"ccrk-{r}")
            t0 = time.perf_counter()
            if ccrk([*command, "--root", root]) != 0:
                raise SystemExit("ccrk acquire failed")
            times["ccrk"].append(time.perf_counter() - t0)
            (version,) = os.listdir(os.path.join(root, "sources", "cc3m"))
            images = os.path.join(root, "sources", "cc3m", version, "images.parquet")
            import json

            ok["ccrk"] = json.load(open(os.path.join(root, "sources", "cc3m", version, "summary.json")))["images_ok"]

            out = os.path.join(work, f"bare-{r}")
            t0 = time.perf_counter()
            img2dataset.download(url_list=images, output_folder=out, input_format="parquet", url_col="url",
                                 save_additional_columns=["image_key"], output_format="webdataset",
                                 image_size=args.image_size, resize_mode="border", processes_count=args.processes,
                                 thread_count=args.threads, number_sample_per_shard=args.shard_size, timeout=10,
                                 encode_format=ENCODE_FORMAT, oom_shard_count=OOM_SHARD_COUNT,
                                 max_image_area=89_478_485, incremental_mode="incremental",
                                 disallowed_header_directives=list(OPT_OUT_DIRECTIVES), enable_wandb=False)
            times["img2dataset"].append(time.perf_counter() - t0)
            import pyarrow.parquet as pq

            ok["img2dataset"] = sum(int((pq.read_table(p, columns=["status"])["status"].to_pylist()).count("success"))
                                    for p in sorted(os.path.join(out, f) for f in os.listdir(out) if f.endswith(".parquet")))

    best = {k: min(v) for k, v in times.items()}
    print_table(f"acquire {args.urls} loopback urls (best of {args.repeat})",
                ["path", "wall s", "images ok", "images/s", "runs (s)"],
                [(k, best[k], ok[k], args.urls / best[k], ", ".join(f"{t:.1f}" for t in times[k])) for k in times])
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    print(f"overhead_vs_img2dataset={best['ccrk'] / best['img2dataset']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
