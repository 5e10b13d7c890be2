"""Benchmark: peak memory of img2dataset's resizer on an RGBA PNG, with and without flatten_alpha, in one run.

The image is the demo server's half-transparent RGBA PNG (``storage.demo.server.bomb_png``), ``--side``
pixels square (6000: 144 MB of pixels in about 140 KB, under the default area limit). Each variant runs
in a fresh process under a wrapper that reads the child's peak resident memory (``ru_maxrss`` of
``RUSAGE_CHILDREN``); the child reports its own peak before the resize (imports and the PNG's bytes),
the floor the increment is measured from:
  img2dataset  -- img2dataset's Resizer on the PNG (its decode and float64 alpha matting)
  flattened    -- storage.image_prep.flatten_alpha first, then the same Resizer on its PPM
Prints each peak and its increment over its floor, and last ``ratio=X.XX identical=True``:
flattened's increment over img2dataset's, and whether the two resized images are the same bytes.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = ("img2dataset", "flattened")

# The wrapper: the peak resident memory of the child it waits for (KiB on Linux), and the child's output.
_PEAK = ("import resource, subprocess, sys; p = subprocess.run(sys.argv[1:], stdout=subprocess.PIPE, text=True); "
         "print(p.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, p.stdout.strip() or '-')")

CHILD = """
import hashlib, io, os, resource, sys, time
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
sys.path.insert(0, {repo!r})
from img2dataset.resizer import Resizer
from storage.demo.server import bomb_png
from storage.image_prep import flatten_alpha

png = bomb_png({side})
resizer = Resizer(image_size={image_size}, resize_mode="border", resize_only_if_bigger=False)
floor_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
stream = io.BytesIO(png)
if {variant!r} == "flattened":
    stream = flatten_alpha(stream)
out, *_, err = resizer(stream)
assert err is None, err
print(floor_kib, time.perf_counter() - t0, hashlib.sha256(out).hexdigest())
"""


def peak_of(variant: str, side: int, image_size: int) -> tuple[int, int, float, str]:
    """(peak resident bytes, the peak before the resize, seconds, sha256 of the resized image) of one
    variant in a fresh process."""
    child = CHILD.format(repo=_REPO, side=side, image_size=image_size, variant=variant)
    out = subprocess.run([sys.executable, "-c", _PEAK, sys.executable, "-c", child], stdout=subprocess.PIPE,
                         text=True, timeout=600).stdout.split()
    rc, peak_kib, floor_kib, secs, digest = (out + ["-"] * 3)[:5]
    if rc != "0":
        raise SystemExit(f"{variant}: the child failed (exit {rc})")
    return int(peak_kib) * 1024, int(floor_kib) * 1024, float(secs), digest


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--side", type=int, default=6000, help="the PNG's width and height (a multiple of 100)")
    ap.add_argument("--image-size", type=int, default=256, help="img2dataset's image_size")
    args = ap.parse_args(argv)
    runs = {v: peak_of(v, args.side, args.image_size) for v in VARIANTS}
    over = {v: peak - floor for v, (peak, floor, _, _) in runs.items()}
    print(f"{args.side}x{args.side} RGBA PNG, resized to {args.image_size}")
    print(f"{'variant':12s} {'peak MB':>8s} {'floor MB':>8s} {'over floor MB':>13s} {'seconds':>8s}")
    for v, (peak, floor, secs, _) in runs.items():
        print(f"{v:12s} {peak / 2**20:8.0f} {floor / 2**20:8.0f} {over[v] / 2**20:13.0f} {secs:8.2f}")
    ratio = over["flattened"] / max(1, over["img2dataset"])
    print(f"ratio={ratio:.2f} identical={runs['flattened'][3] == runs['img2dataset'][3]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
