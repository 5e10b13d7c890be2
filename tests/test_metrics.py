"""Retrieval metrics on hand-made cases: ranks, ties, several texts per image, Recall@K, MRV."""
import numpy as np
import pytest

from ccrk.evaluation import metrics
from ccrk.evaluation.metrics import mean_rank_variance, recall_at_k, retrieval_ranks


def argsort_ranks(sim, text_image):
    """The reference's ranks, spelled out: position of the first ground truth in descending argsort order."""
    tr = [min(np.flatnonzero(np.argsort(row)[::-1] == t)[0] for t in np.flatnonzero(text_image == i))
          for i, row in enumerate(sim)]
    ir = [np.flatnonzero(np.argsort(sim[:, t])[::-1] == text_image[t])[0] for t in range(sim.shape[1])]
    return np.array(tr), np.array(ir)


def test_ranks_count_higher_candidates():
    # 3 images x 3 texts, text t belongs to image t.
    sim = np.array([[0.9, 0.1, 0.95],   # image 0: text 2 beats its own text -> TR rank 1
                    [0.2, 0.8, 0.10],   # image 1: own text best -> 0
                    [0.3, 0.7, 0.50]])  # image 2: text 1 beats text 2 -> 1
    tr, ir = retrieval_ranks(sim, np.array([0, 1, 2]))
    assert tr.tolist() == [1, 0, 1]
    # text 0: image 0 best -> 0; text 1: image 1 (0.8) best -> 0; text 2: image 0 (0.95) beats 0.5 -> 1
    assert ir.tolist() == [0, 0, 1]


def test_ties_count_against_the_ground_truth():
    sim = np.array([[0.5, 0.5, 0.5],
                    [0.5, 0.5, 0.5]])
    text_image = np.array([0, 1, 1])
    tr, ir = retrieval_ranks(sim, text_image)
    # Image 0 ties with texts 1, 2; image 1 ties with text 0 only (its own texts 1, 2 never count).
    assert tr.tolist() == [2, 1]
    assert ir.tolist() == [1, 1, 1]
    tr, ir = retrieval_ranks(sim, text_image, ties="optimistic")  # the former rule
    assert tr.tolist() == [0, 0] and ir.tolist() == [0, 0, 0]


def test_tied_ground_truth_texts_of_one_image_do_not_count_against_it():
    sim = np.array([[0.7, 0.7, 0.2],
                    [0.1, 0.1, 0.9]])
    tr, _ = retrieval_ranks(sim, np.array([0, 0, 1]))
    assert tr.tolist() == [0, 0]


def test_constant_scores_give_at_most_chance_recall():
    n_images, per = 100, 2
    text_image = np.repeat(np.arange(n_images), per)
    tr, ir = retrieval_ranks(np.zeros((n_images, n_images * per)), text_image)
    # Chance R@1: TR 2 ground truths among 200 texts = 1%; IR 1 image among 100 = 1%.
    assert recall_at_k(tr)[1] <= 100 * per / (n_images * per) and recall_at_k(ir)[1] <= 100 / n_images
    # Every candidate ties, so each ground truth comes last: 198 other texts, 99 other images.
    assert set(tr.tolist()) == {n_images * per - per} and set(ir.tolist()) == {n_images - 1}
    assert recall_at_k(tr) == recall_at_k(ir) == {1: 0.0, 5: 0.0, 10: 0.0}


def test_distinct_scores_give_the_former_ranks_and_the_reference_argsort_ranks():
    rng = np.random.default_rng(0)
    n_img, per = 300, 3  # more than one row block
    text_image = np.repeat(np.arange(n_img), per)
    sim = rng.standard_normal((n_img, n_img * per))
    assert len(np.unique(sim)) == sim.size
    tr, ir = retrieval_ranks(sim, text_image)
    tr_opt, ir_opt = retrieval_ranks(sim, text_image, ties="optimistic")
    assert np.array_equal(tr, tr_opt) and np.array_equal(ir, ir_opt)
    tr_ref, ir_ref = argsort_ranks(sim, text_image)
    assert np.array_equal(tr, tr_ref) and np.array_equal(ir, ir_ref)


def test_nan_scores_count_against_the_ground_truth():
    sim = np.array([[np.nan, 0.1, 0.2],
                    [0.3, 0.9, np.nan]])
    tr, ir = retrieval_ranks(sim, np.array([0, 1, 1]))
    # Image 0's only text is NaN: every other text counts above it. Image 1's best own text is NaN too.
    assert tr.tolist() == [2, 1]
    # Text 0's own score is NaN -> 1; text 1 (0.9 vs 0.1) -> 0; text 2: own NaN -> 1.
    assert ir.tolist() == [1, 0, 1]


def test_image_tr_rank_is_the_best_over_its_texts():
    # Image 0 owns texts 0, 1, 2; its best own text (text 2, 0.8) is beaten only by text 3 (0.9).
    sim = np.array([[0.1, 0.3, 0.8, 0.9, 0.2],
                    [0.0, 0.0, 0.0, 0.5, 0.6]])
    text_image = np.array([0, 0, 0, 1, 1])
    tr, ir = retrieval_ranks(sim, text_image)
    assert tr.tolist() == [1, 0]
    # IR: text 0 (0.1 vs 0.0) -> 0; text 3 own image 1 (0.5) < image 0 (0.9) -> 1; text 4 -> 0
    assert ir.tolist() == [0, 0, 0, 1, 0]


@pytest.mark.parametrize("ties", metrics.TIE_RULES)
def test_split_functions_agree_with_one_pass_on_tied_scores(ties):
    rng = np.random.default_rng(1)
    n_img, per = 300, 3  # more than one row block
    text_image = np.repeat(np.arange(n_img), per)
    sim = rng.integers(0, 20, size=(n_img, n_img * per)).astype(np.float32)  # many ties
    tr, ir = retrieval_ranks(sim, text_image, ties=ties)
    assert np.array_equal(tr, metrics.text_retrieval_ranks(sim, text_image, ties=ties))
    assert np.array_equal(ir, metrics.image_retrieval_ranks(sim.T.copy(), text_image, ties=ties))
    above = np.greater_equal if ties == "pessimistic" else np.greater
    # Brute force, the definition spelled out: other candidates scoring above (or level with) the ground truth.
    for i in (0, 137, 299):
        own = sim[i, text_image == i].max()
        assert tr[i] == np.sum(above(sim[i, text_image != i], own))
    for t in (0, 500, 899):
        others = np.arange(n_img) != text_image[t]
        assert ir[t] == np.sum(above(sim[others, t], sim[text_image[t], t]))


def test_perfect_retrieval_gives_recall_100_and_mrv_0():
    n = 20
    text_image = np.repeat(np.arange(n), 2)
    sim = np.where(np.arange(n)[:, None] == text_image[None, :], 1.0, 0.0)
    tr, ir = retrieval_ranks(sim, text_image)
    assert recall_at_k(tr) == {1: 100.0, 5: 100.0, 10: 100.0}
    assert recall_at_k(ir) == {1: 100.0, 5: 100.0, 10: 100.0}
    assert mean_rank_variance(np.stack([tr, tr, tr])) == 0.0


def test_recall_at_k_percentages():
    ranks = np.array([0, 1, 4, 5, 9, 10, 30, 0])
    assert recall_at_k(ranks, ks=(1, 5, 10)) == {1: 25.0, 5: 50.0, 10: 75.0}
    assert recall_at_k(ranks, ks=(100,)) == {100: 100.0}


def test_mrv_by_hand():
    # Two languages, three instances: ranks (0, 2), (1, 1), (0, 6).
    ranks = np.array([[0, 1, 0],
                      [2, 1, 6]])
    # population variances: 1, 0, 9 -> mean 10/3; standard deviations 1, 0, 3 -> mean 4/3
    assert mean_rank_variance(ranks) == pytest.approx(10 / 3)
    assert mean_rank_variance(ranks, variant="std") == pytest.approx(4 / 3)


def test_mrv_any_number_of_languages_and_instances():
    ranks = np.array([[0, 3], [0, 0], [0, 0], [0, 0], [0, 3]])  # 5 languages, 2 instances
    # instance 1: values 3,0,0,0,3 -> mean 1.2, variance (2*1.8^2 + 3*1.2^2) / 5 = 2.16
    assert mean_rank_variance(ranks) == pytest.approx(2.16 / 2)
    assert mean_rank_variance(ranks, variant="std") == pytest.approx(np.sqrt(2.16) / 2)


def test_bad_inputs_are_rejected():
    with pytest.raises(ValueError, match="one image index per text"):
        retrieval_ranks(np.zeros((2, 3)), np.array([0, 1]))
    with pytest.raises(ValueError, match="no ground-truth text"):
        retrieval_ranks(np.zeros((3, 2)), np.array([0, 1]))
    with pytest.raises(ValueError, match="unknown MRV variant"):
        mean_rank_variance(np.zeros((2, 2)), variant="iqr")
    with pytest.raises(ValueError, match="unknown tie rule"):
        retrieval_ranks(np.zeros((2, 2)), np.array([0, 1]), ties="random")
