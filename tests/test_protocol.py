"""The paper's protocols end to end on small data: ``ccrk evaluate`` on Multi30K's raw published layout,
MRV across one model per language (``--combine``), the zero-shot -> few-shot protocol with its runs'
parents, the presets' settings, and the Table-1-shaped report with the paper's figures."""
from __future__ import annotations

import gzip
import os

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from ccrk.evaluation import metrics as M
from ccrk.evaluation import reports
from ccrk.evaluation.demo_benchmark import write_demo_benchmark
from ccrk.model import build_model, save_model
from ccrk.specs import FINETUNE_PRESETS, FinetuneSpec, ProtocolSpec
from storage.catalog import Catalog
from storage.demo.corpus import generate_demo_corpus
from storage.errors import CCRKError

torch.set_num_threads(1)
CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "tiny.yaml")
IMAGES = ["1009434119.jpg", "1007129816.jpg", "22439193117_4183a49ec2.jpg", "1000092795.jpg"]
CAPTIONS = {"en": ["a dog runs on grass", "a man in an orange hat", "a yellow dog on dirt", "two men outside"],
            "de": ["ein hund läuft", "ein mann mit hut", "ein gelber hund", "zwei männer draußen"],
            "fr": ["un chien court", "un homme au chapeau", "un chien jaune", "deux hommes dehors"],
            "cs": ["pes běží", "muž v klobouku", "žlutý pes", "dva muži venku"]}


def _checkpoint(path, seed: int) -> str:
    torch.manual_seed(seed)
    with open(CONFIG, encoding="utf-8") as f:
        config = yaml.safe_load(f)
    model, _ = build_model(config)
    ckpt = os.path.join(path, "checkpoints", "step-0000001")
    save_model(model, config, ckpt)
    return str(path)


@pytest.fixture(scope="module")
def multi30k_repo(tmp_path_factory):
    """A checkout of github.com/multi30k/dataset in miniature (data/task1/raw/*.gz + image_splits) with images."""
    repo = tmp_path_factory.mktemp("multi30k")
    task1 = repo / "data" / "task1"
    (task1 / "raw").mkdir(parents=True)
    (task1 / "image_splits").mkdir()
    (task1 / "image_splits" / "test_2016_flickr.txt").write_text("".join(n + "\n" for n in IMAGES))
    for lang, lines in CAPTIONS.items():
        with gzip.open(task1 / "raw" / f"test_2016_flickr.{lang}.gz", "wt", encoding="utf-8") as f:
            f.writelines(line + "\n" for line in lines)
    (repo / "images").mkdir()
    for i, name in enumerate(IMAGES):
        Image.new("RGB", (16, 16), (60 * i, 255 - 60 * i, 90)).save(repo / "images" / name)
    return str(repo)


def test_evaluate_reads_the_raw_multi30k_layout_and_combines_one_model_per_language(multi30k_repo, root, tmp_path,
                                                                                    capsys):
    from ccrk.app.cli import main
    from flows.evaluate import evaluate_flow

    a, b = _checkpoint(tmp_path / "a", 0), _checkpoint(tmp_path / "b", 1)
    args = ["--benchmark", "multi30k", "--data", multi30k_repo, "--k-test", "2", "--root", root, "--device", "cpu"]
    assert main(["evaluate", "--checkpoint", a, *args]) == 0
    out = capsys.readouterr().out
    assert "over en, de, fr, cs (K=4; 4 TR, 4 IR instances)" in out  # the paper's Multi30K MRV set, raw layout
    spec = {"benchmark": "multi30k", "data": multi30k_repo, "k_test": 2, "device": "cpu"}
    report_a = evaluate_flow({**spec, "checkpoint": a}, root=root)
    assert report_a["report_id"] in out  # the CLI's report
    report_b = evaluate_flow({**spec, "checkpoint": b, "langs": ["fr", "cs"]}, root=root)
    report_a, report_b = report_a["dir"], report_b["dir"]
    ma, mb = reports.load_metrics(report_a), reports.load_metrics(report_b)
    assert ma["langs"]["fr"] != mb["langs"]["fr"]  # two different models

    ids = [os.path.basename(report_a), os.path.basename(report_b)]
    assert main(["evaluate", "--combine", f"{ids[0]}:en,de", f"{ids[1]}:fr,cs", "--root", root]) == 0
    assert "over en, de, fr, cs" in capsys.readouterr().out
    [art] = [x for x in Catalog(root).list("report") if x.name == "combined"]
    assert sorted(art.parents) == sorted(ids)
    combined = reports.load_metrics(art.path)
    assert combined["langs"] == {"en": ma["langs"]["en"], "de": ma["langs"]["de"], "fr": mb["langs"]["fr"],
                                 "cs": mb["langs"]["cs"]}
    ranks_a, ranks_b = np.load(os.path.join(report_a, "ranks.npz")), np.load(os.path.join(report_b, "ranks.npz"))
    tr = np.stack([ranks_a["en/tr"], ranks_a["de/tr"], ranks_b["fr/tr"], ranks_b["cs/tr"]])
    assert combined["mrv"]["tr_std"] == pytest.approx(M.mean_rank_variance(tr, variant="std"))
    assert combined["mrv"]["langs"] == ["en", "de", "fr", "cs"]
    assert [s["langs"] for s in combined["combined_from"]] == [["en", "de"], ["fr", "cs"]]
    with pytest.raises(CCRKError, match="de given by two reports") as err:
        reports.combine_metrics([(report_a, ["en", "de"]), (report_a, ["de"])])
    assert "\n" not in str(err.value)


def test_presets_hold_table_6_and_the_authors_configs():
    paper = FinetuneSpec(benchmark="xflickrco").hyperparameters()
    assert (paper["lr"], paper["batch_size"], paper["max_tokens"], paper["epochs"]) == (1e-5, 64, 80, 10)
    assert (paper["image_size"], paper["window_size"], paper["select"]) == (384, 12, "val")
    code = FinetuneSpec(benchmark="xflickrco", preset="code").hyperparameters()
    assert (code["lr"], code["start_eval"]) == (3e-5, 7)
    assert FinetuneSpec(benchmark="wit", preset="code").hyperparameters()["epochs"] == 5
    few = FinetuneSpec(benchmark="xflickrco", mode="few-shot", lang="de", shots=100).hyperparameters()
    assert (few["epochs"], few["lr"], few["batch_size"], few["select"], few["max_tokens"]) == (60, 1e-5, 64, "last", 80)
    assert FinetuneSpec(benchmark="coco", preset="code").hyperparameters()["select"] == "test"
    assert FinetuneSpec(benchmark="multi30k", lr=2e-5, max_tokens=50).hyperparameters()["lr"] == 2e-5
    assert set(FINETUNE_PRESETS["paper"]) == set(FINETUNE_PRESETS["code"])
    with pytest.raises(Exception, match="unknown fine-tuning setting"):
        ProtocolSpec.parse({"benchmark": "demo", "settings": {"epoch": 3}})


def test_paper_figures_and_table1_cells():
    assert reports.paper_figures("CCR10-E", "zero-shot", "xflickrco") == {"IR R@1": 73.3, "TR R@1": 72.64,
                                                                          "MRV": 7.89}
    assert reports.paper_figures("CCR10-E", "few-shot", "multi30k") is None  # Table 1 has no such cell
    assert reports.paper_figures(None, "zero-shot", "coco") is None


@pytest.fixture(scope="module")
def demo_bench(tmp_path_factory):
    base = tmp_path_factory.mktemp("protocol")
    generate_demo_corpus(str(base / "corpus"), n_train=20, n_heldout=6, image_px=64)
    write_demo_benchmark(str(base / "corpus"), str(base / "bench"), langs=("en", "es", "ru"))
    return str(base / "bench")


def test_the_protocol_fine_tunes_english_then_few_shot_and_resumes(demo_bench, root, tmp_path):
    from flows.protocol import run_protocol
    from storage.catalog import Artifact

    pre = _checkpoint(os.path.join(root, "runs", "pre"), 0)
    Catalog(root).record(Artifact("pre0001", "run", "tiny", pre))
    entry = ProtocolSpec.parse({"benchmark": "demo", "data": demo_bench, "langs": ["en", "es", "ru"], "k_test": 4,
                                "itc_only": True, "device": "cpu", "settings": {"epochs": 2, "batch_size": 16},
                                "few_shot": {"langs": ["es", "ru"], "shots": 5,
                                             "settings": {"epochs": 2, "batch_size": 5, "lr": 1e-3}},
                                "single": {"langs": ["ru"], "settings": {"epochs": 1, "batch_size": 16}}})
    said = []
    rows = run_protocol(entry, "tiny", pre, root, report=lambda kind, s: said.append((kind, s["_line"])))
    assert [r["group"] for r in rows] == ["zero-shot", "few-shot", "single-language"]
    zero, few, single = (r["report"]["metrics"] for r in rows)
    assert list(zero["langs"]) == ["en", "es", "ru"] and list(few["langs"]) == ["en", "es", "ru"]
    assert few["langs"]["en"] == zero["langs"]["en"]  # English from the English model
    assert few["langs"]["es"] != zero["langs"]["es"]  # es from its own few-shot model
    assert [s["langs"] for s in few["combined_from"]] == [["en"], ["es"], ["ru"]]
    # Single-language: ru from a model fine-tuned on Russian alone, English from the English model (Table 1).
    assert list(single["langs"]) == ["en", "ru"] and single["langs"]["en"] == zero["langs"]["en"]
    assert single["mrv"]["langs"] == ["en", "ru"]
    runs = {a.version: a for a in Catalog(root).list("run")}
    english = next(a for a in runs.values() if a.name == "finetune-demo-zero-shot")
    shots = [a for a in runs.values() if a.name == "finetune-demo-few-shot"]
    [russian] = [a for a in runs.values() if a.name == "finetune-demo-single"]
    assert russian.parents == ["pre0001"] and russian.params["train_lang"] == "ru"
    assert english.parents == ["pre0001"] and len(shots) == 2
    assert all(a.parents == [english.version] for a in shots)  # continued from the English fine-tune
    assert english.stats["selected_epoch"] in (1, 2) and all(a.params["select"] == "last" for a in shots)
    assert sum(kind == "finetune" for kind, _ in said) == 4
    # Killed or finished: a second run trains nothing and scores nothing.
    said.clear()
    again = run_protocol(entry, "tiny", pre, root, report=lambda kind, s: said.append(s["_line"]))
    assert [r["report"]["report_id"] for r in again] == [r["report"]["report_id"] for r in rows]
    assert all("already trained" in line for line in said if "fine-tune" in line)
    table = reports.render_table1([{**r, "metrics": r["report"]["metrics"], "paper": None} for r in rows])
    assert "| tiny | zero-shot |" in table and "| tiny | few-shot |" in table and "| tiny | single-language |" in table
