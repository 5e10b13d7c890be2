"""Benchmark: ranks, Recall@K and MRV for 5,000 images x 25,000 texts x 8 languages (random embeddings).

Prints one row per stage with its share of the total time; the last line is ``seconds=X.X``
(metrics only: similarity products + ranks + recalls + MRV; drawing random numbers is excluded).
Usage: .venv/bin/python benchmarks/eval_metrics.py [--images 5000] [--texts-per-image 5] [--langs 8]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from ccrk.evaluation.metrics import mean_rank_variance, recall_at_k, retrieval_ranks  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=5000)
    ap.add_argument("--texts-per-image", type=int, default=5)
    ap.add_argument("--langs", type=int, default=8)
    ap.add_argument("--dim", type=int, default=256)
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    n_img, n_txt = args.images, args.images * args.texts_per_image
    text_image = np.repeat(np.arange(n_img), args.texts_per_image)

    def unit(x):
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    image_feat = unit(rng.standard_normal((n_img, args.dim), dtype=np.float32))
    cpu0 = time.process_time()
    times = {"similarity (matmul)": 0.0, "ranks": 0.0, "recall@k": 0.0, "mrv": 0.0}
    tr_all, ir_all = [], []
    # One similarity buffer reused across languages: a fresh 500 MB array per language costs
    # as much in page faults as the product itself.
    sim = np.empty((n_img, n_txt), dtype=np.float32)
    for _ in range(args.langs):
        # Text features lean towards their image so that recalls are not all zero.
        text_feat = unit(image_feat[text_image] * 1.5 + rng.standard_normal((n_txt, args.dim), dtype=np.float32))
        t0 = time.perf_counter()
        np.matmul(image_feat, text_feat.T, out=sim)
        t1 = time.perf_counter()
        tr, ir = retrieval_ranks(sim, text_image)
        t2 = time.perf_counter()
        recall_at_k(tr), recall_at_k(ir)
        t3 = time.perf_counter()
        times["similarity (matmul)"] += t1 - t0
        times["ranks"] += t2 - t1
        times["recall@k"] += t3 - t2
        tr_all.append(tr)
        ir_all.append(ir)
    t0 = time.perf_counter()
    mrv_tr = mean_rank_variance(np.stack(tr_all))
    mrv_ir = mean_rank_variance(np.stack(ir_all))
    times["mrv"] += time.perf_counter() - t0

    total = sum(times.values())
    cpu = time.process_time() - cpu0  # all threads; on a shared machine wall time / cpu time shows contention
    print(f"{n_img} images x {n_txt} texts x {args.langs} languages, dim {args.dim}")
    print(f"{'stage':<22}{'seconds':>10}{'share':>8}")
    for name, sec in times.items():
        print(f"{name:<22}{sec:>10.2f}{sec / total:>8.1%}")
    print(f"MRV(TR)={mrv_tr:.1f} MRV(IR)={mrv_ir:.1f} TR R@1 last lang={recall_at_k(tr_all[-1])[1]:.2f}")
    print(f"cpu_seconds={cpu:.1f} (includes drawing the random text features)")
    print(f"seconds={total:.1f}")


if __name__ == "__main__":
    main()
