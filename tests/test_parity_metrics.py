"""Parity with the authors' metric code: MRV as ``analysis_ranks`` prints it, ranks and Recall@K as ``itm_eval``.

The numbers come from the reference-parity fixture's ``mrv.json`` (see its README, "mrv.json" and
"MRV"), made by calling the authors' functions unmodified. The folder is ``$CCRK_PARITY_FIXTURE``,
by default ``shared/reference-parity`` next to the repository; without it these tests skip.
Every size (languages, instances, matrix shapes) is read from the fixture.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from ccrk.evaluation import benchmarks, metrics, reports
from ccrk.evaluation.retrieval import LangResult, SetResult
from parity_fixture import require

# Float64 means of the same values in the same order; a tolerance only for numpy's summation details.
REL = 1e-12


@pytest.fixture(scope="module")
def mrv_fixture() -> dict:
    return json.loads(require("mrv.json").read_text(encoding="utf-8"))


def _stack(ranks_by_lang: dict, langs: list[str]) -> np.ndarray:
    return np.array([ranks_by_lang[lang] for lang in langs])


def _lang_result(lang: str, tr: list, ir: list) -> LangResult:
    """One language's ranks as evaluation returns them, instance i of every language under the same key."""
    tr, ir = np.asarray(tr, dtype=np.int64), np.asarray(ir, dtype=np.int64)
    s = SetResult(lang, lang, tr, ir, [f"img{i}" for i in range(len(tr))], [f"txt{i}" for i in range(len(ir))],
                  metrics.recall_at_k(tr), metrics.recall_at_k(ir))
    return LangResult(lang, s.tr_recall, s.ir_recall, [s])


def test_the_papers_xflickrco_mrv_languages_are_the_references(mrv_fixture):
    assert list(benchmarks.PAPER_MRV_LANGS["xflickrco"]) == mrv_fixture["lanls_used"]


@pytest.mark.parametrize("direction", ["tr", "ir"])
def test_mrv_as_published_equals_analysis_ranks(mrv_fixture, direction):
    ref = mrv_fixture["analysis_ranks_2000"]
    langs = mrv_fixture["lanls_used"]
    ranks = _stack(ref["ranks"][direction], langs)
    assert metrics.mean_rank_variance(ranks, variant="std") == pytest.approx(ref["mrv"][direction], rel=REL)
    # The printed line carries the same number.
    assert ref["printed"][direction].endswith(repr(ref["mrv"][direction]))


def test_report_headline_mrv_equals_analysis_ranks(mrv_fixture):
    ref = mrv_fixture["analysis_ranks_2000"]
    langs = mrv_fixture["lanls_used"]
    results = {lang: _lang_result(lang, ref["ranks"]["tr"][lang], ref["ranks"]["ir"][lang]) for lang in langs}
    # A fifth language, off the paper's list, must not enter the default MRV.
    n_tr, n_ir = len(ref["ranks"]["tr"][langs[0]]), len(ref["ranks"]["ir"][langs[0]])
    rng = np.random.default_rng(0)
    results["es"] = _lang_result("es", rng.integers(0, 50, n_tr), rng.integers(0, 50, n_ir))
    mrv = reports.build_metrics(results, "xflickrco")["mrv"]
    assert mrv["langs"] == langs and (mrv["n_tr"], mrv["n_ir"]) == (n_tr, n_ir)
    assert mrv["tr_std"] == pytest.approx(ref["mrv"]["tr"], rel=REL)
    assert mrv["ir_std"] == pytest.approx(ref["mrv"]["ir"], rel=REL)
    # Eq. 7 sits beside it: the variance, never below the squared mean std (Jensen).
    assert mrv["tr"] >= mrv["tr_std"] ** 2 and mrv["ir"] >= mrv["ir_std"] ** 2
    assert reports.mrv_lines(mrv)[0].startswith(f"{reports.MRV_LABEL} over {', '.join(langs)}")


def test_mrv_as_published_equals_the_exact_reference_lines(mrv_fixture):
    langs = mrv_fixture["lanls_used"]
    for case in mrv_fixture["exact_lines_4x50"]:
        ranks = _stack(case["ranks"], langs)
        got = metrics.mean_rank_variance(ranks, variant="std")
        assert got == pytest.approx(case["mrv"], rel=REL, abs=1e-15), case["case"]


def _itm_eval_case(case: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    scores_i2t, scores_t2i = np.array(case["scores_i2t"]), np.array(case["scores_t2i"])
    text_image = np.empty(scores_i2t.shape[1], dtype=np.int64)
    for t, i in case["txt2img"].items():
        text_image[int(t)] = i
    assert all(sorted(case["img2txt"][str(i)]) == np.flatnonzero(text_image == i).tolist()
               for i in range(scores_i2t.shape[0]))
    return scores_i2t, scores_t2i, text_image, case["result"]


def _argsort_ranks(scores_i2t, scores_t2i, text_image):
    """The reference's rank definition: position of the first ground truth in ``np.argsort(score)[::-1]``."""
    tr = [min(np.flatnonzero(np.argsort(row)[::-1] == t)[0] for t in np.flatnonzero(text_image == i))
          for i, row in enumerate(scores_i2t)]
    ir = [np.flatnonzero(np.argsort(row)[::-1] == text_image[t])[0] for t, row in enumerate(scores_t2i)]
    return np.array(tr), np.array(ir)


def test_ranks_and_recalls_equal_itm_evals(mrv_fixture):
    cases = mrv_fixture["itm_eval"]["cases"]
    assert cases
    for n, case in enumerate(cases):
        scores_i2t, scores_t2i, text_image, ref = _itm_eval_case(case)
        # No ties in these matrices (as the fixture notes), so the reference's argsort order, which breaks
        # ties by index, and our rule, which counts a tie against the ground truth, must agree exactly.
        for scores in (scores_i2t, scores_t2i):
            assert all(len(np.unique(row)) == len(row) for row in scores), f"case {n} has ties"
        tr = metrics.text_retrieval_ranks(scores_i2t, text_image)
        ir = metrics.image_retrieval_ranks(scores_t2i, text_image)
        tr_ref, ir_ref = _argsort_ranks(scores_i2t, scores_t2i, text_image)
        assert np.array_equal(tr, tr_ref) and np.array_equal(ir, ir_ref), f"case {n}"
        for rule in metrics.TIE_RULES:
            assert np.array_equal(metrics.text_retrieval_ranks(scores_i2t, text_image, ties=rule), tr)
            assert np.array_equal(metrics.image_retrieval_ranks(scores_t2i, text_image, ties=rule), ir)
        tr_recall, ir_recall = metrics.recall_at_k(tr), metrics.recall_at_k(ir)
        for k in (1, 5, 10):
            assert tr_recall[k] == pytest.approx(ref[f"txt_r{k}"], rel=REL), f"case {n} TR R@{k}"
            assert ir_recall[k] == pytest.approx(ref[f"img_r{k}"], rel=REL), f"case {n} IR R@{k}"
        assert metrics.mean_recall(tr_recall, ir_recall) == pytest.approx(ref["r_mean"], rel=REL)


def test_on_ties_our_rank_is_never_better_than_the_references(mrv_fixture):
    """Rounded fixture scores tie often: argsort's order puts a tied ground truth anywhere among its
    equals, our default rule puts it after all of them, the optimistic rule before all of them."""
    for case in mrv_fixture["itm_eval"]["cases"]:
        scores_i2t, scores_t2i, text_image, _ = _itm_eval_case(case)
        scores_i2t, scores_t2i = np.round(scores_i2t), np.round(scores_t2i)
        ref = _argsort_ranks(scores_i2t, scores_t2i, text_image)
        ours = (metrics.text_retrieval_ranks(scores_i2t, text_image),
                metrics.image_retrieval_ranks(scores_t2i, text_image))
        optimistic = (metrics.text_retrieval_ranks(scores_i2t, text_image, ties="optimistic"),
                      metrics.image_retrieval_ranks(scores_t2i, text_image, ties="optimistic"))
        for mine, low, theirs in zip(ours, optimistic, ref):
            assert np.all(low <= theirs) and np.all(theirs <= mine)
