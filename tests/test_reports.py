"""Reports: metrics.json, a Table-1-style report.md, plots, comparisons, catalog lineage, Prefect artifacts."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from ccrk.evaluation import reports
from ccrk.evaluation.retrieval import LangResult, SetResult
from ccrk.evaluation.metrics import recall_at_k
from storage.catalog import Artifact, Catalog


def _lang(lang, tr, ir, distinct_text_frac=1.0):
    tr, ir = np.array(tr), np.array(ir)
    s = SetResult(lang, lang, tr, ir, [f"img{i}" for i in range(len(tr))], [f"img{i}#0" for i in range(len(ir))],
                  recall_at_k(tr), recall_at_k(ir), distinct_text_frac)
    return LangResult(lang, s.tr_recall, s.ir_recall, [s])


@pytest.fixture
def results():
    # 4 instances; en perfect, de off on two of them.
    return {"en": _lang("en", [0, 0, 0, 0], [0, 0, 0, 0]),
            "de": _lang("de", [0, 2, 0, 12], [0, 0, 6, 0])}


def test_metrics_hold_recalls_per_language_and_mrv(results):
    m = reports.build_metrics(results, "xflickrco", mrv_langs=["en", "de"], k_test=128)
    assert m["langs"]["de"]["tr"] == {"1": 50.0, "5": 75.0, "10": 75.0}
    assert m["langs"]["en"]["mean_recall"] == 100.0
    # As Table 1: TR stds across (en, de): 0, 1, 0, 6 -> 1.75; IR: 0, 0, 3, 0 -> 0.75
    assert m["mrv"]["tr_std"] == pytest.approx(1.75) and m["mrv"]["ir_std"] == pytest.approx(0.75)
    assert m["mrv"]["mean_std"] == pytest.approx(1.25)
    # Eq. 7: TR variances 0, 1, 0, 36 -> 9.25; IR: 0, 0, 9, 0 -> 2.25
    assert m["mrv"]["tr"] == pytest.approx(9.25) and m["mrv"]["ir"] == pytest.approx(2.25)
    assert m["mrv"]["mean"] == pytest.approx(5.75)
    assert m["mrv"]["paper_langs"] == ["en", "de", "ja", "zh"]
    assert m["average"]["tr"]["1"] == 75.0
    assert m["rank_ties"] == "pessimistic" and m["collapsed_langs"] == []


def test_mrv_languages_default_to_the_papers_set_per_benchmark():
    ranks = {lang: _lang(lang, [0, 1], [1, 0]) for lang in ("de", "en", "es", "ja", "zh", "fr", "cs")}
    assert reports.build_metrics(ranks, "xflickrco")["mrv"]["langs"] == ["en", "de", "ja", "zh"]
    assert reports.build_metrics(ranks, "multi30k")["mrv"]["langs"] == ["en", "de", "fr", "cs"]
    assert reports.build_metrics(ranks, "demo")["mrv"]["langs"] == list(ranks)
    # A paper language not evaluated: every evaluated language, and the report says it is not the paper's set.
    partial = {lang: ranks[lang] for lang in ("en", "de", "es")}
    m = reports.build_metrics(partial, "xflickrco")
    assert m["mrv"]["langs"] == ["en", "de", "es"]
    assert "the paper's set is en, de, ja, zh" in reports.mrv_lines(m["mrv"])[0]
    assert reports.build_metrics(ranks, "xflickrco", mrv_langs=["en", "es"])["mrv"]["langs"] == ["en", "es"]


def test_a_collapsed_language_is_flagged_in_metrics_and_report(results, tmp_path):
    results = {**results, "ja": _lang("ja", [3, 3, 3, 3], [3, 3, 3, 3], distinct_text_frac=0.25)}
    m = reports.build_metrics(results, "demo")
    assert m["collapsed_langs"] == ["ja"] and m["langs"]["ja"]["distinct_text_frac"] == 0.25
    assert m["langs"]["en"]["distinct_text_frac"] == 1.0
    reports.write_report(str(tmp_path), m, results)
    [line] = [x for x in (tmp_path / "report.md").read_text().splitlines() if "Collapsed" in x]
    assert line.startswith("**Collapsed text embeddings** (under 50% distinct text vectors per distinct caption): "
                           "ja 25%.")
    assert "Collapsed" not in reports.render_report(reports.build_metrics({"en": results["en"]}, "demo"))


def test_report_directory_has_table_plots_and_metrics(results, tmp_path):
    m = reports.build_metrics(results, "xflickrco", mrv_langs=["en", "de"])
    reports.write_report(str(tmp_path), m, results)
    md = (tmp_path / "report.md").read_text()
    assert "| lang | TR R@1 | TR R@5 | TR R@10 | IR R@1 | IR R@5 | IR R@10 | mean recall |" in md
    assert "| de | 50.00 | 75.00 | 75.00 | 75.00 | 75.00 | 100.00 |" in md
    assert ("MRV (mean rank std, as Table 1) over en, de (K=2; 4 TR, 4 IR instances; the paper's set is "
            "en, de, ja, zh): TR 1.75, IR 0.75; mean 1.25." in md)
    assert "MRV Eq. 7 (variance): TR 9.25, IR 2.25; mean 5.75." in md
    assert json.loads((tmp_path / "metrics.json").read_text())["mrv"]["ir"] == pytest.approx(2.25)
    for png in ("recall.png", "rank_variance.png"):
        assert Image.open(tmp_path / png).format == "PNG"
    ranks = np.load(tmp_path / "ranks.npz")
    assert ranks["de/tr"].tolist() == [0, 2, 0, 12]


def test_compare_report_puts_runs_side_by_side(results, tmp_path):
    a = reports.build_metrics(results, "demo")
    b = reports.build_metrics({"en": results["en"]}, "demo")
    reports.write_report(str(tmp_path / "a"), a, results)
    out = reports.compare_report([str(tmp_path / "a"), b], ["1-to-K", "1-to-1"], str(tmp_path / "cmp"))
    rows = out["rows"]
    assert [r["run"] for r in rows] == ["1-to-K", "1-to-1"]
    assert rows[0]["de"] == round(a["langs"]["de"]["mean_recall"], 2) and rows[1]["de"] is None
    assert rows[0]["MRV TR (std, Table 1)"] == 1.75 and rows[0]["MRV TR (Eq. 7)"] == 9.25
    assert rows[0]["MRV langs"] == "en,de"
    assert rows[1]["MRV TR (std, Table 1)"] is None and rows[1]["MRV IR (Eq. 7)"] is None  # one language: no MRV
    assert "| 1-to-K | 75.00 | 100.00 | 87.50 | 1.75 | 0.75 | 9.25 | 2.25 | en,de |" in (
        tmp_path / "cmp" / "compare.md").read_text()


def test_a_report_directory_names_its_run_and_stats_and_leaves_the_catalog_to_the_stage(results, root):
    run_dir = os.path.join(root, "runs", "r1")
    Catalog(root).record(Artifact("run0001", "run", "finetune", run_dir))
    m = reports.build_metrics(results, "demo", checkpoint=os.path.join(run_dir, "checkpoints", "step-0000010"))
    out = reports.write_report_dir(root, m, results, params={"benchmark": "demo"})
    assert out["run_version"] == "run0001" and out["dir"] == os.path.join(root, "reports", out["report_id"])
    assert out["stats"]["mrv_tr_std"] == pytest.approx(1.75) and out["stats"]["mrv_tr"] == pytest.approx(9.25)
    assert os.path.exists(os.path.join(out["dir"], "report.md"))
    assert Catalog(root).get(out["report_id"]) is None  # storage.stage.run_stage records it
    again = reports.existing_report(root, m["checkpoint"], {"benchmark": "demo"})
    assert again["report_id"] == out["report_id"] and reports.report_stats(again["metrics"]) == out["stats"]


@pytest.fixture
def demo_setup(root, tmp_path):
    """A random-init tiny CCRk checkpoint recorded as a run, and a small demo benchmark."""
    import torch
    import yaml

    from ccrk.evaluation.demo_benchmark import write_demo_benchmark
    from ccrk.model import build_model, save_model
    from storage.demo.corpus import generate_demo_corpus

    torch.manual_seed(0)
    config = yaml.safe_load(open(os.path.join(os.path.dirname(__file__), "..", "configs", "tiny.yaml")))
    model, _ = build_model(config)
    run_dir = os.path.join(root, "runs", "pretrained")
    save_model(model, config, os.path.join(run_dir, "checkpoints", "step-0000001"))
    Catalog(root).record(Artifact("pre0001", "run", "tiny", run_dir))
    generate_demo_corpus(str(tmp_path / "corpus"), n_train=8, n_heldout=4, image_px=64)
    write_demo_benchmark(str(tmp_path / "corpus"), str(tmp_path / "bench"), langs=("en", "es", "ru"))
    return run_dir, str(tmp_path / "bench")


def test_finetune_then_evaluate_flows_end_to_end(demo_setup, root):
    """`ccrk finetune` (zero-shot) then `ccrk evaluate --itc-only`: runs, reports, lineage, artifacts."""
    from ccrk.app.cli import main

    run_dir, bench = demo_setup
    assert main(["finetune", "--checkpoint", run_dir, "--benchmark", "demo", "--data", bench, "--epochs", "1",
                 "--batch-size", "8", "--lr", "1e-4", "--select", "last", "--k-test", "4", "--root", root,
                 "--device", "cpu"]) == 0
    cat = Catalog(root)
    [ft] = [a for a in cat.list("run") if a.name == "finetune-demo-zero-shot"]
    assert ft.parents == ["pre0001"] and ft.stats["pairs"] == 8 * 3
    [report] = cat.list("report")
    assert report.parents == [ft.version]
    m = json.loads(open(os.path.join(report.path, "metrics.json")).read())
    assert list(m["langs"]) == ["en", "es", "ru"] and m["k_test"] == 4
    assert m["mrv"]["n_tr"] == 4 and m["mrv"]["n_ir"] == 12
    assert m["mrv"]["langs"] == ["en", "es", "ru"] and m["collapsed_langs"] == []
    assert all(v["distinct_text_frac"] == 1.0 for v in m["langs"].values())
    assert report.stats["mean_recall"] == pytest.approx(m["average"]["mean_recall"])

    assert main(["evaluate", "--checkpoint", run_dir, "--benchmark", "demo", "--data", bench, "--langs", "en,es",
                 "--itc-only", "--root", root]) == 0
    itc = [a for a in cat.list("report") if a.parents == ["pre0001"]]
    assert len(itc) == 1 and "Scoring: ITC only." in open(os.path.join(itc[0].path, "report.md")).read()

    from prefect.client.orchestration import get_client

    async def keys():
        async with get_client() as client:
            return {a.key for a in await client.read_artifacts()}

    import asyncio

    assert f"report-demo-{report.version}" in asyncio.run(keys())
