"""Retrieval metrics: ranks, Recall@K and Mean Rank Variance (MRV), numpy in and numpy out.

Ranks are 0-based and count the candidates that score *strictly* higher than the ground truth,
so ties go to the ground truth (a deterministic, order-free rule; the reference's argsort breaks
ties arbitrarily). Text retrieval (TR, image -> text) ranks an image by its best ground-truth text;
image retrieval (IR, text -> image) ranks each text by its one image.

Every function works on blocks of rows so that a 5,000 x 25,000 matrix never needs a second
full-size temporary (no Python loop over candidates).
"""
from __future__ import annotations

from typing import Iterable

import numpy as np

# Rows of the similarity matrix compared per block (~ rows x n_texts booleans in flight).
BLOCK_ROWS = 128


def _check(sim: np.ndarray, text_image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    sim = np.asarray(sim)
    text_image = np.asarray(text_image, dtype=np.int64)
    if sim.ndim != 2:
        raise ValueError(f"sim must be (n_images, n_texts), got shape {sim.shape}")
    n_images, n_texts = sim.shape
    if text_image.shape != (n_texts,):
        raise ValueError(f"text_image must have one image index per text ({n_texts}), got shape {text_image.shape}")
    if n_texts and (text_image.min() < 0 or text_image.max() >= n_images):
        raise ValueError(f"text_image holds an image index outside [0, {n_images})")
    return sim, text_image


def ground_truth_scores(sim: np.ndarray, text_image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(per-text score of its own image, per-image best score over its own texts)."""
    sim, text_image = _check(sim, text_image)
    gt = sim[text_image, np.arange(sim.shape[1])]
    best = np.full(sim.shape[0], -np.inf, dtype=np.float64)
    np.maximum.at(best, text_image, gt.astype(np.float64))
    missing = np.flatnonzero(np.bincount(text_image, minlength=sim.shape[0]) == 0)
    if missing.size:
        raise ValueError(f"{missing.size} image(s) have no ground-truth text (first: index {missing[0]})")
    return gt, best.astype(sim.dtype, copy=False)


def text_retrieval_ranks(sim_i2t: np.ndarray, text_image: np.ndarray) -> np.ndarray:
    """TR rank of each image: texts scoring strictly above its best ground-truth text."""
    sim_i2t, text_image = _check(sim_i2t, text_image)
    _, best = ground_truth_scores(sim_i2t, text_image)
    ranks = np.empty(sim_i2t.shape[0], dtype=np.int64)
    for r0 in range(0, sim_i2t.shape[0], BLOCK_ROWS):
        r1 = min(r0 + BLOCK_ROWS, sim_i2t.shape[0])
        ranks[r0:r1] = np.count_nonzero(sim_i2t[r0:r1] > best[r0:r1, None], axis=1)
    return ranks


def image_retrieval_ranks(sim_t2i: np.ndarray, text_image: np.ndarray) -> np.ndarray:
    """IR rank of each text: images scoring strictly above its own image. ``sim_t2i`` is (n_texts, n_images)."""
    sim_t2i = np.asarray(sim_t2i)
    if sim_t2i.ndim != 2:
        raise ValueError(f"sim_t2i must be (n_texts, n_images), got shape {sim_t2i.shape}")
    _check(sim_t2i.T, text_image)
    text_image = np.asarray(text_image, dtype=np.int64)
    ranks = np.empty(sim_t2i.shape[0], dtype=np.int64)
    for r0 in range(0, sim_t2i.shape[0], BLOCK_ROWS):
        r1 = min(r0 + BLOCK_ROWS, sim_t2i.shape[0])
        block = sim_t2i[r0:r1]
        gt = block[np.arange(r1 - r0), text_image[r0:r1]]
        ranks[r0:r1] = np.count_nonzero(block > gt[:, None], axis=1)
    return ranks


def retrieval_ranks(sim: np.ndarray, text_image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(tr_ranks per image, ir_ranks per text) from one (n_images, n_texts) score matrix.

    One pass over row blocks: each block gives its images' TR ranks and adds its images'
    votes to every text's IR rank.
    """
    sim, text_image = _check(sim, text_image)
    gt, best = ground_truth_scores(sim, text_image)
    n_images, n_texts = sim.shape
    tr = np.empty(n_images, dtype=np.int64)
    ir = np.zeros(n_texts, dtype=np.int64)
    for r0 in range(0, n_images, BLOCK_ROWS):
        r1 = min(r0 + BLOCK_ROWS, n_images)
        block = sim[r0:r1]
        tr[r0:r1] = np.count_nonzero(block > best[r0:r1, None], axis=1)
        ir += np.count_nonzero(block > gt[None, :], axis=0)
    return tr, ir


def recall_at_k(ranks: np.ndarray, ks: Iterable[int] = (1, 5, 10)) -> dict[int, float]:
    """{k: percent of instances whose 0-based rank is below k}."""
    ranks = np.asarray(ranks)
    if ranks.size == 0:
        raise ValueError("recall_at_k needs at least one rank")
    return {int(k): float(100.0 * np.count_nonzero(ranks < k) / ranks.size) for k in ks}


def rank_variance_per_instance(ranks: np.ndarray, variant: str = "variance") -> np.ndarray:
    """Population variance (or std) across the K languages of each instance's rank: shape (N,)."""
    ranks = np.asarray(ranks, dtype=np.float64)
    if ranks.ndim != 2 or ranks.shape[0] < 1 or ranks.shape[1] < 1:
        raise ValueError(f"ranks must be (K languages, N instances) with K, N >= 1, got shape {ranks.shape}")
    var = ranks.var(axis=0)  # ddof=0: the population variance, as in the paper
    if variant == "variance":
        return var
    if variant == "std":
        return np.sqrt(var)
    raise ValueError(f"unknown MRV variant {variant!r}; use 'variance' or 'std'")


def mean_rank_variance(ranks: np.ndarray, variant: str = "variance") -> float:
    """MRV_K: mean over instances of the variance of the K languages' ranks of that instance.

    ``variant="std"`` averages the standard deviation instead, which is what the reference
    code computes (``analysis_ranks``), for comparison with published numbers.
    """
    return float(rank_variance_per_instance(ranks, variant).mean())


def mean_recall(tr_recall: dict[int, float], ir_recall: dict[int, float]) -> float:
    """The papers' "mean recall": the average of TR and IR R@1/5/10 (six numbers)."""
    values = list(tr_recall.values()) + list(ir_recall.values())
    return float(sum(values) / len(values))
