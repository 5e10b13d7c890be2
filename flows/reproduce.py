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

import logging
import os
import time
from contextlib import ExitStack
from typing import Callable

from prefect import flow
from prefect.exceptions import MissingContextError
from prefect.logging import get_run_logger

from ccrk.evaluation.demo_benchmark import write_demo_benchmark
from ccrk.evaluation.reports import compare_report, paper_figures, render_table1, table1_cells
from ccrk.specs import ReproduceSpec
from ccrk.trainer import StepProgress, load_config
from flows.acquire import acquire_flow
from flows.artifacts import publish_link, publish_markdown, publish_table
from flows.build import build_flow
from flows.evaluate import evaluate_flow
from flows.pretrain import pretrain_flow
from flows.protocol import run_protocol
from flows.translate import translate_flow
from storage import atomic, layout
from storage.demo.corpus import generate_demo_corpus, write_demo_metadata
from storage.demo.multi30k import write_multi30k_layout
from storage.demo.server import serve
from storage.errors import CCRKError
from storage.specs import BuildSpec, CorpusSpec, ExcludeBenchmark
from storage.verify import verify_dataset

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


def _acquire_all(spec: ReproduceSpec, root: str, metadata: dict[str, list[str]], report: Reporter,
                 images: dict[str, str] | None = None, allow: list[str] | None = None) -> dict:
    """Acquire every source of the chain; ``allow``: the demo server's exact HOST:PORT (a loopback
    address, refused to every other download)."""
    out, images = {}, images or {}
    for source in spec.acquire.sources:
        out[source] = summary = acquire_flow(spec.acquire_spec(source, metadata.get(source), images.get(source),
                                                               allow), root=root)
        report("acquire", summary)
    ok = sum(int(s.get("images_ok", 0)) for s in out.values())
    return {"sources": out, "_note": f"{ok} images in {len(out)} sources"}


def _translate(spec: ReproduceSpec, root: str, report: Reporter) -> dict:
    translate = spec.translate_spec()
    summary = translate_flow(translate, root=root)
    report("translate", summary)
    return {"summary": summary, "_note": ", ".join(translate.langs)}


def build_spec_with_exclusions(spec: ReproduceSpec, bench_dir: str | None = None) -> BuildSpec:
    """The chain's build spec, its ``exclude`` spelled out for :func:`flows.build.build_flow` (which
    makes each benchmark entry's exclusion list): ``protocol`` becomes one entry per benchmark of
    the protocol section, with that entry's files; an entry without ``data`` takes the demo
    benchmark's folder (``bench_dir``), as protocol entries do."""
    build = spec.build_spec()
    if not build.exclude:
        return build
    entries: list = []
    for entry in build.exclude:
        if entry == "protocol":
            if not spec.protocol:
                raise CCRKError("build.exclude: protocol names the benchmarks of the protocol section, "
                                "and this config has none")
            entries += [ExcludeBenchmark(benchmark=p.benchmark, data=p.data, images=p.images,
                                         coco_images=p.coco_images) for p in spec.protocol]
        else:
            entries.append(entry)
    out = []
    for entry in entries:
        if isinstance(entry, ExcludeBenchmark):
            if not (entry.data or bench_dir):
                raise CCRKError(f"build.exclude: benchmark {entry.benchmark} needs data: its folder")
            entry = entry.merged({"data": entry.data or bench_dir}).to_config(defaults=False)
        if entry not in out:
            out.append(entry)
    return build.merged({"exclude": out})


def excludes_benchmark(spec: ReproduceSpec, benchmark: str) -> bool:
    """Whether the chain's build keeps ``benchmark``'s evaluation images out."""
    build = spec.build_spec()
    return any((isinstance(e, ExcludeBenchmark) and e.benchmark == benchmark)
               or (e == "protocol" and any(p.benchmark == benchmark for p in spec.protocol or ()))
               for e in build.exclude or ())


def _build(spec: ReproduceSpec, root: str, report: Reporter, bench_dir: str | None = None) -> dict:
    result = build_flow(build_spec_with_exclusions(spec, bench_dir), root=root)
    report("build", result)
    verified = verify_dataset(result["path"])
    if not verified.ok:
        problems = "; ".join(f"{p.kind} {p.shard}" for p in verified.problems[:5])
        raise CCRKError(f"dataset {result['path']} failed verification: {problems}")
    report("verify", {"_line": f"verified: {verified.n_shards} shards, {verified.n_samples} samples, no problems"})
    overlap = ", ".join(f"{n} {bench} images kept out" for bench, n in result.get("benchmark_overlap", {}).items())
    return {"result": result, "_note": f"{result['n_samples']} samples, {result['n_shards']} shards"
                                       + (f"; {overlap}" if overlap else "")}


def _pretrain(spec: ReproduceSpec, root: str, dataset_dir: str, report: Reporter,
              progress: StepProgress | None) -> dict:
    # Every run's config (and its overrides) read and checked before the first one trains.
    configs = {name: load_config(*files) for name, files in spec.run_config_files().items()}
    runs = {}
    for name, config in configs.items():
        runs[name] = run = pretrain_flow(config, dataset_dir, root=root, progress=progress)
        report("pretrain", {**run, "_line": f"{name}: run {run['run_id']}"
                                            f"{' (already trained)' if run.get('skipped') else ''}, "
                                            f"loss curve {run.get('loss_curve')}"})
    return {"runs": runs, "_note": ", ".join(runs)}


def _evaluate(spec: ReproduceSpec, root: str, runs: dict, bench_dir: str | None) -> dict:
    reports = {}
    for name, run in runs.items():
        # A run whose objective trains no fusion encoder (CL2CM) is scored by similarity alone.
        evaluate = spec.evaluate.merged({"checkpoint": run["run_dir"], "data": spec.evaluate.data or bench_dir,
                                         "itc_only": spec.itc_only(name)})
        reports[name] = evaluate_flow(evaluate, root=root)
    out_dir = layout.report_dir(root, f"{spec.name}-comparison")
    comparison = compare_report([r["dir"] for r in reports.values()], list(reports), out_dir,
                                title=f"{spec.name}: " + " vs ".join(reports))
    publish_markdown(f"compare-{spec.name}-comparison", comparison["markdown"], description="evaluation report")
    publish_table(f"compare-{spec.name}-comparison-table", comparison["rows"], description="recall per language")
    return {"reports": reports, "comparison": comparison, "dir": out_dir, "_note": out_dir}


def _protocols(spec: ReproduceSpec, root: str, runs: dict, bench_dir: str | None, report: Reporter,
               progress: StepProgress | None) -> dict:
    """Every configured protocol on every pre-trained run, then the Table-1-shaped report."""
    rows = []
    for name, run in runs.items():
        for entry in spec.protocol:
            entry = entry.merged({"data": entry.data or bench_dir,
                                  "itc_only": entry.itc_only or spec.itc_only(name)})
            for row in run_protocol(entry, name, run["run_dir"], root, progress, report):
                paper = paper_figures(entry.paper_model, row["group"], entry.benchmark)
                rows.append({**{k: v for k, v in row.items() if k != "report"}, "metrics": row["report"]["metrics"],
                             "report_dir": row["report"]["dir"], "paper": paper, "paper_model": entry.paper_model})
    out_dir = layout.report_dir(root, f"{spec.name}-table1")
    markdown = render_table1(rows, title=f"{spec.name}: the paper's protocols (Table 1 layout)")
    atomic.write_text(os.path.join(out_dir, "table1.md"), markdown)
    atomic.write_json(os.path.join(out_dir, "table1.json"),
                      [{**{k: v for k, v in r.items() if k != "metrics"}, "cells": table1_cells(r["metrics"])}
                       for r in rows])
    publish_markdown(f"table1-{spec.name}", markdown, description="the paper's protocols, Table 1 layout")
    return {"rows": rows, "dir": out_dir, "markdown": markdown, "path": os.path.join(out_dir, "table1.md"),
            "_note": out_dir}


@flow(name="reproduce")
def reproduce_flow(config: str = "configs/demo.yaml", root: str | None = None,
                   report: Reporter | None = None, progress: StepProgress | None = None) -> dict:
    """The chain of ``config`` (a :class:`ccrk.specs.ReproduceSpec` YAML: a misspelt key in any section
    is one line naming it); ``report(stage, summary)`` is told each stage's summary (the command line
    prints them; a deployment run logs one line each); ``progress``: the training loop's."""
    report = report or _log_only
    spec = ReproduceSpec.load(config)
    root = layout.data_root(root or os.environ.get(layout.ROOT_ENV) or spec.root)
    clock = StageClock(report)
    with ExitStack() as stack:
        metadata: dict[str, list[str]] = {}
        images: dict[str, str] = {}
        bench_dir, allow = None, []
        if spec.corpus is not None:  # the embedded demo: generate, serve on loopback, write metadata
            metadata, images, bench_dir, allow = _demo_corpus(spec.corpus, root, clock, stack,
                                                              excludes_benchmark(spec, "demo"), spec.acquire.sources)
        acquired = clock.stage("acquire", _acquire_all, spec, root, metadata, report, images, allow)
        stack.close()  # the images are local now
    clock.stage("translate", _translate, spec, root, report)
    built = clock.stage("build + verify", _build, spec, root, report, bench_dir)
    out = {"root": root, "dataset": built["result"]["path"], "stages": clock.rows,
           "sources": {k: v.get("path") for k, v in acquired["sources"].items()}}
    if not spec.pretrain.runs:  # a data-only chain (configs/demo-small.yaml)
        report("stages", {"rows": clock.rows})
        return out
    trained = clock.stage("pretrain", _pretrain, spec, root, built["result"]["path"], report, progress)
    if spec.protocol:
        table = clock.stage("fine-tune + evaluate (protocols)", _protocols, spec, root, trained["runs"], bench_dir,
                            report, progress)
        report("stages", {"rows": clock.rows})
        publish_table(f"reproduce-{spec.name}-stages", clock.rows, description="wall seconds per stage")
        report("report", {"markdown": table["markdown"], "path": table["path"], "_line": f"report: {table['path']}"})
        return {**out, "runs": trained["runs"], "report": table["dir"], "table1": table["rows"]}
    evaluated = clock.stage("evaluate", _evaluate, spec, root, trained["runs"], bench_dir)
    report("stages", {"rows": clock.rows})
    report_md = os.path.join(evaluated["dir"], "compare.md")
    markdown = ""
    if os.path.exists(report_md):
        with open(report_md, encoding="utf-8") as f:
            markdown = f.read()
        publish_markdown(f"reproduce-{spec.name}", markdown, description="comparison of the pre-trained variants")
    publish_table(f"reproduce-{spec.name}-stages", clock.rows, description="wall seconds per stage")
    publish_link(f"reproduce-{spec.name}-report", evaluated["dir"], description="comparison report")
    report("report", {"markdown": markdown, "path": report_md, "_line": f"report: {report_md}"})
    return {**out, "runs": trained["runs"], "report": evaluated["dir"]}


def _demo_corpus(c: CorpusSpec, root: str, clock: StageClock, stack: ExitStack,
                 plant: bool = False, sources=()) -> tuple[dict, dict, str, list[str]]:
    """Generate the demo corpus, serve it on loopback for the acquisition (until ``stack`` closes) and
    write its benchmark; returns (metadata files per source, image folders per source, the benchmark's
    directory, the server's HOST:PORT for the acquisition's allow-list). ``plant`` (a chain whose build excludes the demo benchmark): the metadata also lists
    the corpus's planted copies of benchmark images (storage.demo.corpus), which that build must find
    and keep out. With ``multi30k`` among ``sources``, the corpus is also written in Multi30K's
    published layout (storage.demo.multi30k), its English captions and image folder."""
    corpus = layout.join(root, "demo-corpus")
    clock.stage("demo corpus", lambda: {"_note": str(generate_demo_corpus(
        corpus, seed=c.seed, n_train=c.n_train, n_heldout=c.n_heldout).get("n_images", ""))})
    server = stack.enter_context(serve(corpus, port=c.port))
    metadata = write_demo_metadata(corpus, server.url, plant=plant)
    metadata["sbu"] = metadata["sbu"][:1]  # one of SBU's two official layouts
    bench_dir = layout.join(root, "benchmarks", "demo")
    write_demo_benchmark(corpus, bench_dir)
    images = {}
    if "multi30k" in sources:
        m30k = write_multi30k_layout(corpus, layout.join(root, "demo-multi30k"))
        metadata["multi30k"], images["multi30k"] = [m30k["metadata"]], m30k["images"]
    return metadata, images, bench_dir, [server.address]
