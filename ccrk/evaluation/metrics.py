"""Retrieval metrics: ranks, Recall@K and Mean Rank Variance (MRV), numpy in and numpy out.

Ranks are 0-based: the number of *other* candidates ranked above the ground truth. Text retrieval
(TR, image -> text) ranks an image by its best ground-truth text, whose fellow ground-truth texts
never count against it; image retrieval (IR, text -> image) ranks each text by its one image.

Ties: by default (``ties="pessimistic"``) a candidate counts as ranked above the ground truth
unless it scores strictly below it, so a tie never favours the ground truth and constant scores
(a collapsed model) give zero recall instead of perfect recall; a NaN score counts against the
ground truth too. On distinct scores this is the reference's rank (position of the first ground
truth in ``np.argsort(score)[::-1]``); on ties that position depends on the candidates' indices
(a stable sort, reversed, puts the last index first), i.e. on the data's layout, not on the model.
``ties="optimistic"`` (only strictly higher candidates count) is the former rule, kept for comparison.

MRV: :func:`mean_rank_variance` averages, over instances, the population variance (the paper's
Eq. 7) or, with ``variant="std"``, the standard deviation (the authors' ``analysis_ranks``, which
produced Table 1) of an instance's rank across K languages.

Every function works on blocks of rows so that a 5,000 x 25,000 matrix never needs a second
full-size temporary (no Python loop over candidates).
"""
from __future__ import annotations

from typing import Iterable

import numpy as np

# Rows of the similarity matrix compared per block (~ rows x n_texts booleans in flight).
BLOCK_ROWS = 128
TIE_RULES = ("pessimistic", "optimistic")
DEFAULT_TIES = "pessimistic"


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


def _check_ties(ties: str) -> None:
    if ties not in TIE_RULES:
        raise ValueError(f"unknown tie rule {ties!r}; use one of {', '.join(TIE_RULES)}")


def _count_above(block: np.ndarray, ref: np.ndarray, axis: int, ties: str) -> np.ndarray:
    """Candidates of ``block`` (along ``axis``) that count as ranked above ``ref`` (broadcast against it)."""
    if ties == "optimistic":
        return np.count_nonzero(block > ref, axis=axis)
    # "not below" rather than ">=": a NaN on either side counts against the ground truth.
    return block.shape[axis] - np.count_nonzero(block < ref, axis=axis)


def ground_truth_scores(sim: np.ndarray, text_image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(per-text score of its own image, per-image best score over its own texts)."""
    sim, text_image = _check(sim, text_image)
    gt = sim[text_image, np.arange(sim.shape[1])]
    best = np.full(sim.shape[0], -np.inf, dtype=np.float64)
    with np.errstate(invalid="ignore"):  # a NaN score is a valid input: it propagates to the image's best
        np.maximum.at(best, text_image, gt.astype(np.float64))
    missing = np.flatnonzero(np.bincount(text_image, minlength=sim.shape[0]) == 0)
    if missing.size:
        raise ValueError(f"{missing.size} image(s) have no ground-truth text (first: index {missing[0]})")
    return gt, best.astype(sim.dtype, copy=False)


def _own_texts_counted(gt: np.ndarray, best: np.ndarray, text_image: np.ndarray, ties: str) -> np.ndarray:
    """Per image, how many of its own texts :func:`_count_above` counted against its best one."""
    if ties == "optimistic":
        return np.zeros(len(best), dtype=np.int64)
    counted = ~(gt < best[text_image])  # the best text itself, its equals, and NaNs
    return np.bincount(text_image, weights=counted, minlength=len(best)).astype(np.int64)


def text_retrieval_ranks(sim_i2t: np.ndarray, text_image: np.ndarray, ties: str = DEFAULT_TIES) -> np.ndarray:
    """TR rank of each image: texts of other images that count as above its best ground-truth text."""
    _check_ties(ties)
    sim_i2t, text_image = _check(sim_i2t, text_image)
    gt, best = ground_truth_scores(sim_i2t, text_image)
    ranks = -_own_texts_counted(gt, best, text_image, ties)
    for r0 in range(0, sim_i2t.shape[0], BLOCK_ROWS):
        r1 = min(r0 + BLOCK_ROWS, sim_i2t.shape[0])
        ranks[r0:r1] += _count_above(sim_i2t[r0:r1], best[r0:r1, None], 1, ties)
    return ranks


def image_retrieval_ranks(sim_t2i: np.ndarray, text_image: np.ndarray, ties: str = DEFAULT_TIES) -> np.ndarray:
    """IR rank of each text: other images that count as above its own. ``sim_t2i`` is (n_texts, n_images)."""
    _check_ties(ties)
    sim_t2i = np.asarray(sim_t2i)
    if sim_t2i.ndim != 2:
        raise ValueError(f"sim_t2i must be (n_texts, n_images), got shape {sim_t2i.shape}")
    _check(sim_t2i.T, text_image)
    text_image = np.asarray(text_image, dtype=np.int64)
    own = 0 if ties == "optimistic" else 1  # the pessimistic count includes the ground truth itself
    ranks = np.empty(sim_t2i.shape[0], dtype=np.int64)
    for r0 in range(0, sim_t2i.shape[0], BLOCK_ROWS):
        r1 = min(r0 + BLOCK_ROWS, sim_t2i.shape[0])
        block = sim_t2i[r0:r1]
        gt = block[np.arange(r1 - r0), text_image[r0:r1]]
        ranks[r0:r1] = _count_above(block, gt[:, None], 1, ties) - own
    return ranks


def retrieval_ranks(sim: np.ndarray, text_image: np.ndarray,
                    ties: str = DEFAULT_TIES) -> tuple[np.ndarray, np.ndarray]:
    """(tr_ranks per image, ir_ranks per text) from one (n_images, n_texts) score matrix.

    One pass over row blocks: each block gives its images' TR ranks and adds its images'
    votes to every text's IR rank.
    """
    _check_ties(ties)
    sim, text_image = _check(sim, text_image)
    gt, best = ground_truth_scores(sim, text_image)
    n_images, n_texts = sim.shape
    tr = -_own_texts_counted(gt, best, text_image, ties)
    ir = np.full(n_texts, 0 if ties == "optimistic" else -1, dtype=np.int64)  # -1: the own image's vote
    for r0 in range(0, n_images, BLOCK_ROWS):
        r1 = min(r0 + BLOCK_ROWS, n_images)
        block = sim[r0:r1]
        tr[r0:r1] += _count_above(block, best[r0:r1, None], 1, ties)
        ir += _count_above(block, gt[None, :], 0, ties)
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

    ``variant="variance"`` is the paper's Eq. 7; ``variant="std"`` averages the standard deviation
    instead, which is what the authors' code computes (``analysis_ranks``) and Table 1 reports.
    """
    return float(rank_variance_per_instance(ranks, variant).mean())


def mean_recall(tr_recall: dict[int, float], ir_recall: dict[int, float]) -> float:
    """The papers' "mean recall": the average of TR and IR R@1/5/10 (six numbers)."""
    values = list(tr_recall.values()) + list(ir_recall.values())
    return float(sum(values) / len(values))
