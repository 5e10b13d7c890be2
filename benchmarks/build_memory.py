"""Benchmark: the build's peak memory as the dataset grows, bounded against unbounded, in one run.

Writes two synthetic sources (``--images`` N and 4N images; small JPEGs, since memory goes with
the number of images and captions, not their bytes), then builds each in a fresh process
(``storage.build.build_dataset``) twice:
  bounded   -- the plan in buckets of ``--bucket-rows`` kept captions and DuckDB's temp tables
               under ``--duckdb-memory`` (``CCRK_PLAN_BUCKET_ROWS`` / ``CCRK_BUILD_MEMORY``: the
               defaults, 100,000 captions and a third of RAM, scaled down to this corpus)
  unbounded -- one bucket and DuckDB's memory up to 80% of RAM: the plan holds the whole dataset
Prints each build's peak memory of its own (anonymous and shared resident memory, sampled every
5 ms; the child's ru_maxrss, also printed, counts besides the page-cache pages of the source tars
the shard writers map, which grow with the images' bytes and which the kernel reclaims at need)
and, last, how much that grows from N to 4N images: ``growth_bounded=X.XX growth_unbounded=Y.YY``
(peak at 4N over peak at N).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _REPO)

CHILD = """
import resource, sys, threading, time
sys.path.insert(0, {repo!r})
from storage.build import build_dataset

def own_kb():
    # Resident memory of the process's own: anonymous and shared memory (not the page-cache pages
    # of files it maps, such as the source tars the shard writers copy images from).
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return sum(int(fields[k].split()[0]) for k in ("RssAnon", "RssShmem") if k in fields)

peak, done = [own_kb()], threading.Event()
def sample():
    while not done.wait(0.005):
        peak[0] = max(peak[0], own_kb())
threading.Thread(target=sample, daemon=True).start()
t0 = time.perf_counter()
r = build_dataset({root!r}, name="bench", sources=["cc3m"], langs="en,es,id,ru,tr", shard_size=1000)
secs = time.perf_counter() - t0
done.set()
assert r.n_samples == {n}, r
print(secs, max(peak[0], own_kb()) / 1024, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def peak_build(root: str, n: int, env: dict) -> tuple[float, float, float]:
    """(peak own memory MB -- anonymous and shared resident memory, sampled every 5 ms --, peak
    resident MB -- ru_maxrss, which also counts the mapped source tars' page-cache pages --,
    seconds) of one build in a fresh process."""
    import shutil

    shutil.rmtree(os.path.join(root, "datasets"), ignore_errors=True)
    proc = subprocess.Popen([sys.executable, "-c", CHILD.format(repo=_REPO, root=root, n=n)],
                            env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"build failed:\n{err[-3000:]}")
    secs, own, rss = out.strip().splitlines()[-1].split()
    return float(own), float(rss), float(secs)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=40000, help="the small corpus; the large one has 4x")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--bucket-rows", type=int, default=None, help="default: images / 4")
    ap.add_argument("--duckdb-memory", default="160MB")
    args = ap.parse_args(argv)
    sys.path.insert(0, os.path.join(_REPO, "benchmarks"))
    from build import make_source  # benchmarks/build.py

    bucket = args.bucket_rows or max(1, args.images // 4)
    configs = {"bounded": {"CCRK_PLAN_BUCKET_ROWS": str(bucket), "CCRK_BUILD_MEMORY": args.duckdb_memory},
               "unbounded": {"CCRK_PLAN_BUCKET_ROWS": str(10 ** 12), "CCRK_BUILD_MEMORY": "80%"}}
    sizes = [args.images, 4 * args.images]
    peaks = {}
    with tempfile.TemporaryDirectory() as tmp:
        roots = {}
        for n in sizes:
            t0 = time.perf_counter()
            roots[n] = os.path.join(tmp, f"n{n}")
            os.makedirs(roots[n])
            make_source(roots[n], n, args.image_size)
            print(f"source of {n} images written in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        print(f"{'build':10s} {'images':>8s} {'peak MB':>8s} {'max RSS MB':>10s} {'seconds':>8s}")
        for n in sizes:
            for name, env in configs.items():
                peak, rss, secs = peak_build(roots[n], n, env)
                peaks[name, n] = peak
                print(f"{name:10s} {n:8d} {peak:8.0f} {rss:10.0f} {secs:8.1f}", flush=True)
    print("peak MB: the build's own memory (anonymous and shared); max RSS also counts the page-cache "
          "pages of the source tars it maps")
    print(f"bounded: buckets of {bucket} captions, DuckDB memory {args.duckdb_memory}")
    growth = {name: peaks[name, sizes[1]] / peaks[name, sizes[0]] for name in configs}
    print(f"growth_bounded={growth['bounded']:.2f} growth_unbounded={growth['unbounded']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
