"""``ccrk reproduce``: the whole chain as Prefect flows, from metadata to a comparison report.

demo (configs/demo.yaml): generate the synthetic corpus, serve it on loopback, acquire all four
formats -> translate (demo M2M-100) -> build (K >= 5 languages) -> verify -> pre-train the tiny
CCRk once per configured variant (1-to-K, 1-to-1, ...) -> evaluate each on the demo benchmark ->
one report comparing them side by side.
paper scale (configs/ccr10-e.yaml): the same chain on the official metadata URLs (or local
copies), a real M2M-100 directory and the full model, on a GPU host.

Every stage is skipped when its artifact version already exists and is complete, so a second run is
fast and a killed run resumes where it stopped.
"""
from __future__ import annotations

import copy
import logging
import os
import time
from contextlib import ExitStack
from typing import Callable

import yaml
from prefect import flow
from prefect.exceptions import MissingContextError
from prefect.logging import get_run_logger

from ccrk.evaluation.demo_benchmark import write_demo_benchmark
from ccrk.evaluation.reports import compare_report
from ccrk.trainer import load_config
from flows.acquire import acquire_flow
from flows.artifacts import publish_link, publish_markdown, publish_table
from flows.build import build_flow
from flows.evaluate import evaluate_flow
from flows.pretrain import pretrain_flow
from flows.translate import translate_flow
from storage import layout
from storage.demo.corpus import generate_demo_corpus, write_demo_metadata
from storage.demo.server import serve
from storage.errors import CCRKError
from storage.verify import verify_dataset
from translation.imports import import_translations

log = logging.getLogger("ccrk.reproduce")
# report(stage, summary): told each stage's summary as it finishes ("acquire" once per source, then
# "translate", "build", "verify", "pretrain" per run, "stages", "report"); the command line prints them.
Reporter = Callable[[str, dict], None]


def _log_only(stage: str, summary: dict) -> None:
    """Without a reporter (a deployment run): one line per stage in the run's log."""
    try:
        logger = get_run_logger()
    except MissingContextError:
        logger = log
    logger.info("%s: %s", stage, summary.get("_line") or ", ".join(f"{k}={v}" for k, v in summary.items()
                                                               if isinstance(v, (str, int, float)))[:500])


def load_reproduce_config(path: str) -> dict:
    if not os.path.exists(path):
        raise CCRKError(f"config file {path} does not exist")
    with open(path, encoding="utf-8") as f:
        cfg = yaml.safe_load(f) or {}
    cfg.setdefault("name", os.path.splitext(os.path.basename(path))[0])
    if "pretrain" not in cfg and "model" in cfg:
        # A model config with chain sections (configs/ccr10-e.yaml): it is its own single run.
        cfg["pretrain"] = {"runs": [{"name": cfg["name"], "config": os.path.abspath(path)}]}
    for key in ("acquire", "translate", "build", "pretrain", "evaluate"):
        if key not in cfg:
            raise CCRKError(f"config {path} has no '{key}' section")
    cfg["_config_dir"] = os.path.dirname(os.path.abspath(path))
    return cfg


def _repo_path(cfg: dict, path: str) -> str:
    """Config-relative paths (configs/tiny.yaml) resolve against the repository root."""
    if os.path.isabs(path) or os.path.exists(path):
        return path
    candidate = os.path.join(os.path.dirname(cfg["_config_dir"]), path)
    return candidate if os.path.exists(candidate) else path


def _deep_update(base: dict, overrides: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in (overrides or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_update(out[key], value)
        else:
            out[key] = value
    return out


class StageClock:
    """Wall time per stage, for the final table; says each stage's start to ``report``."""

    def __init__(self, report: Reporter):
        self.rows: list[dict] = []
        self.report = report

    def stage(self, name: str, fn, *args, **kwargs):
        self.report("stage", {"stage": name, "_line": f"==> {name}"})
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        note = out.pop("_note", "") if isinstance(out, dict) else ""
        self.rows.append({"stage": name, "seconds": round(time.perf_counter() - t0, 1), "note": note})
        return out


def _acquire_all(cfg: dict, root: str, metadata: dict[str, list[str]], report: Reporter) -> dict:
    a = cfg["acquire"]
    out = {}
    for source in a.get("sources", ["cc3m", "sbu", "vg", "coco"]):
        files = metadata.get(source) or a.get("metadata", {}).get(source)
        summary = acquire_flow(source=source, metadata=files, root=root, limit=a.get("limit"),
                               image_size=a.get("image_size", 256), processes=a.get("processes", 1),
                               thread_count=a.get("thread_count", 16),
                               number_sample_per_shard=a.get("number_sample_per_shard", 10_000))
        out[source] = summary
        report("acquire", summary)
    ok = sum(int(s.get("images_ok", 0)) for s in out.values())
    return {"sources": out, "_note": f"{ok} images in {len(out)} sources"}


def _translate(cfg: dict, root: str, report: Reporter) -> dict:
    t = cfg["translate"]
    for item in t.get("imports", []):  # e.g. CCLM's de/fr/cs/ja/zh captions, so K reaches 10
        import_translations(root, item["path"], item["name"], langs=item.get("langs"))
    summary = translate_flow(root=root, langs=list(t["langs"]), model=t.get("model"),
                             engine=t.get("engine", "ctranslate2"), device=t.get("device", "cpu"),
                             compute_type=t.get("compute_type", "auto"), beam_size=t.get("beam", 1),
                             sources=t.get("sources"))
    report("translate", summary)
    return {"summary": summary, "_note": ", ".join(t["langs"])}


def _build(cfg: dict, root: str, report: Reporter) -> dict:
    b = cfg["build"]
    result = build_flow(root=root, name=cfg["name"], sources=list(cfg["acquire"].get("sources")),
                        langs=list(b["langs"]), min_langs=b.get("min_langs"),
                        drop_flagged=b.get("drop_flagged", False), shard_size=b.get("shard_size", 1000),
                        seed=b.get("seed", 0))
    report("build", result)
    verified = verify_dataset(result["path"])
    if not verified.ok:
        problems = "; ".join(f"{p.kind} {p.shard}" for p in verified.problems[:5])
        raise CCRKError(f"dataset {result['path']} failed verification: {problems}")
    report("verify", {"_line": f"verified: {verified.n_shards} shards, {verified.n_samples} samples, no problems"})
    return {"result": result, "_note": f"{result['n_samples']} samples, {result['n_shards']} shards"}


def _pretrain(cfg: dict, root: str, dataset_dir: str, report: Reporter) -> dict:
    runs = {}
    for spec in cfg["pretrain"]["runs"]:
        config = _deep_update(load_config(_repo_path(cfg, spec["config"])), spec.get("overrides", {}))
        runs[spec["name"]] = run = pretrain_flow(config, dataset_dir, root=root)
        report("pretrain", {**run, "_line": f"{spec['name']}: run {run['run_id']}"
                                             f"{' (already trained)' if run.get('skipped') else ''}, "
                                             f"loss curve {run.get('loss_curve')}"})
    return {"runs": runs, "_note": ", ".join(runs)}


def _evaluate(cfg: dict, root: str, runs: dict, bench_dir: str) -> dict:
    e = cfg["evaluate"]
    specs = {spec["name"]: spec for spec in cfg["pretrain"]["runs"]}
    reports = {}
    for name, run in runs.items():
        # A run whose objective trains no fusion encoder (CL2CM) is scored by similarity alone.
        itc_only = specs.get(name, {}).get("itc_only", e.get("itc_only", False))
        reports[name] = evaluate_flow(root=root, checkpoint=run["run_dir"], benchmark=e.get("benchmark", "demo"),
                                      data_dir=e.get("data", bench_dir), langs=e.get("langs"),
                                      mrv_langs=e.get("mrv_langs"), k_test=e.get("k_test"),
                                      itc_only=itc_only, images=e.get("images"),
                                      coco_images=e.get("coco_images"))
    out_dir = layout.join(root, "reports", f"{cfg['name']}-comparison")
    comparison = compare_report([r["dir"] for r in reports.values()], list(reports), out_dir,
                                title=f"{cfg['name']}: " + " vs ".join(reports))
    publish_markdown(f"compare-{cfg['name']}-comparison", comparison["markdown"], description="evaluation report")
    publish_table(f"compare-{cfg['name']}-comparison-table", comparison["rows"], description="recall per language")
    return {"reports": reports, "comparison": comparison, "dir": out_dir, "_note": out_dir}


@flow(name="reproduce")
def reproduce_flow(config: str = "configs/demo.yaml", root: str | None = None,
                   report: Reporter | None = None) -> dict:
    """The chain of ``config``; ``report(stage, summary)`` is told each stage's summary (the command line
    prints them; a deployment run logs one line each)."""
    report = report or _log_only
    cfg = load_reproduce_config(config)
    root = layout.data_root(root or os.environ.get(layout.ROOT_ENV) or cfg.get("root"))
    clock = StageClock(report)
    with ExitStack() as stack:
        metadata: dict[str, list[str]] = {}
        bench_dir = cfg["evaluate"].get("data")
        if "corpus" in cfg:  # the embedded demo: generate, serve on loopback, write metadata
            metadata, bench_dir = _demo_corpus(cfg, root, clock, stack)
        acquired = clock.stage("acquire", _acquire_all, cfg, root, metadata, report)
        stack.close()  # the images are local now
    clock.stage("translate", _translate, cfg, root, report)
    built = clock.stage("build + verify", _build, cfg, root, report)
    out = {"root": root, "dataset": built["result"]["path"], "stages": clock.rows,
           "sources": {k: v.get("path") for k, v in acquired["sources"].items()}}
    if not cfg["pretrain"].get("runs"):  # a data-only chain (configs/demo-small.yaml)
        report("stages", {"rows": clock.rows})
        return out
    trained = clock.stage("pretrain", _pretrain, cfg, root, built["result"]["path"], report)
    evaluated = clock.stage("evaluate", _evaluate, cfg, root, trained["runs"], bench_dir)
    report("stages", {"rows": clock.rows})
    report_md = os.path.join(evaluated["dir"], "compare.md")
    markdown = ""
    if os.path.exists(report_md):
        with open(report_md, encoding="utf-8") as f:
            markdown = f.read()
        publish_markdown(f"reproduce-{cfg['name']}", markdown, description="comparison of the pre-trained variants")
    publish_table(f"reproduce-{cfg['name']}-stages", clock.rows, description="wall seconds per stage")
    publish_link(f"reproduce-{cfg['name']}-report", evaluated["dir"], description="comparison report")
    report("report", {"markdown": markdown, "path": report_md, "_line": f"report: {report_md}"})
    return {**out, "runs": trained["runs"], "report": evaluated["dir"]}


def _demo_corpus(cfg: dict, root: str, clock: StageClock, stack: ExitStack) -> tuple[dict, str]:
    """Generate the demo corpus, serve it on loopback for the acquisition (until ``stack`` closes) and
    write its benchmark; returns (metadata files per source, the benchmark's directory)."""
    c = cfg["corpus"]
    corpus = layout.join(root, "demo-corpus")
    clock.stage("demo corpus", lambda: {"_note": str(generate_demo_corpus(
        corpus, seed=c.get("seed", 0), n_train=c.get("n_train", 400),
        n_heldout=c.get("n_heldout", 100)).get("n_images", ""))})
    server = stack.enter_context(serve(corpus, port=c.get("port", 0)))
    metadata = write_demo_metadata(corpus, server.url)
    metadata["sbu"] = metadata["sbu"][:1]  # one of SBU's two official layouts
    bench_dir = layout.join(root, "benchmarks", "demo")
    write_demo_benchmark(corpus, bench_dir)
    return metadata, bench_dir
