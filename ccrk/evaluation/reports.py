"""Evaluation reports: ``reports/<id>/`` with metrics.json, report.md, ranks.npz and PNG plots.

``report.md`` is laid out like the paper's Table 1 (TR/IR R@1/5/10 per language, mean recall,
MRV over the paper's languages); :func:`compare_report` puts several runs side by side like its
Table 2. The evaluate stage (flows.evaluate.EvaluateStage) publishes them as Prefect markdown + table
artifacts and records them in the catalog (kind ``report``) with the evaluated run as parent.

MRV is given two ways, both in ``metrics.json["mrv"]``:

- ``tr_std`` / ``ir_std`` / ``mean_std``, the headline, "MRV (mean rank std, as Table 1)": the mean over
  instances of the population std (ddof 0) of the instance's rank across the languages, which is what
  the authors' ``analysis_ranks`` computes and Table 1 reports;
- ``tr`` / ``ir`` / ``mean``, "MRV Eq. 7 (variance)": the same with the variance, the paper's Eq. 7.

The languages default to the paper's set for the benchmark (``benchmarks.PAPER_MRV_LANGS``), else every
evaluated language. A language whose text embeddings collapsed (:data:`COLLAPSED_BELOW`) is flagged
in ``metrics.json["collapsed_langs"]`` and in one line of ``report.md``.
"""
from __future__ import annotations

import functools
import io
import json
import os
from typing import Sequence

import numpy as np

from ccrk.evaluation import metrics as M
from ccrk.evaluation.benchmarks import PAPER_MRV_LANGS
from ccrk.evaluation.retrieval import aligned_ranks
from storage import atomic, layout
from storage.catalog import Catalog
from storage.errors import CCRKError
from storage.versioning import content_version

KS = (1, 5, 10)
# Bump when a metric's definition changes, so that a report made under the old one is not reused.
METRICS_VERSION = 2  # 2: pessimistic rank ties, MRV as published (std) beside Eq. 7
MRV_LABEL = "MRV (mean rank std, as Table 1)"
MRV_EQ7_LABEL = "MRV Eq. 7 (variance)"
# Flag a language whose distinct text embeddings per distinct caption fall below this fraction.
COLLAPSED_BELOW = 0.5


def _pct(x: float) -> str:
    return f"{x:.2f}"


# --------------------------------------------------------------------------- metrics


def default_mrv_langs(benchmark: str, evaluated: Sequence[str]) -> list[str]:
    """The paper's MRV languages for ``benchmark`` when all of them were evaluated, else every evaluated one."""
    paper = PAPER_MRV_LANGS.get(benchmark)
    if paper and all(lang in evaluated for lang in paper):
        return list(paper)
    return list(evaluated)


def build_mrv(results: dict, benchmark: str, mrv_langs: Sequence[str] | None = None) -> dict:
    """``metrics.json["mrv"]``: both MRV definitions over the languages' shared instances (see the module doc)."""
    langs = [lang for lang in (mrv_langs or default_mrv_langs(benchmark, list(results))) if lang in results]
    paper = PAPER_MRV_LANGS.get(benchmark)
    mrv: dict = {"langs": langs, "k": len(langs), "paper_langs": list(paper) if paper else None,
                 "definitions": {"tr_std, ir_std, mean_std": MRV_LABEL, "tr, ir, mean": MRV_EQ7_LABEL}}
    if len(langs) < 2:
        return mrv
    for direction in ("tr", "ir"):
        ranks, keys = aligned_ranks(results, langs, direction)
        mrv[f"n_{direction}"] = len(keys)
        if keys:
            mrv[direction] = M.mean_rank_variance(ranks)
            mrv[f"{direction}_std"] = M.mean_rank_variance(ranks, variant="std")
    for suffix in ("", "_std"):
        if f"tr{suffix}" in mrv and f"ir{suffix}" in mrv:
            mrv[f"mean{suffix}"] = (mrv[f"tr{suffix}"] + mrv[f"ir{suffix}"]) / 2
    return mrv


def build_metrics(results: dict, benchmark: str, mrv_langs: Sequence[str] | None = None, k_test: int = 128,
                  itc_only: bool = False, checkpoint: str = "", extra: dict | None = None) -> dict:
    """The JSON-able summary of an evaluation (``results``: lang -> retrieval.LangResult)."""
    langs = list(results)
    per_lang = {}
    for lang, r in results.items():
        per_lang[lang] = {"tr": {str(k): v for k, v in r.tr_recall.items()},
                          "ir": {str(k): v for k, v in r.ir_recall.items()},
                          "mean_recall": r.mean_recall, "n_images": int(len(r.tr_ranks)),
                          "n_texts": int(len(r.ir_ranks)), "folds": len(r.folds),
                          "distinct_text_frac": min(f.distinct_text_frac for f in r.folds)}
    collapsed = [lang for lang in langs if per_lang[lang]["distinct_text_frac"] < COLLAPSED_BELOW]
    average = {"tr": {str(k): float(np.mean([per_lang[lang]["tr"][str(k)] for lang in langs])) for k in KS},
               "ir": {str(k): float(np.mean([per_lang[lang]["ir"][str(k)] for lang in langs])) for k in KS},
               "mean_recall": float(np.mean([per_lang[lang]["mean_recall"] for lang in langs]))}
    return {"benchmark": benchmark, "checkpoint": checkpoint, "k_test": k_test, "itc_only": itc_only,
            "metrics_version": METRICS_VERSION, "rank_ties": M.DEFAULT_TIES, "langs": per_lang, "average": average,
            "mrv": build_mrv(results, benchmark, mrv_langs), "collapsed_langs": collapsed,
            "collapsed_below": COLLAPSED_BELOW, **(extra or {})}


# --------------------------------------------------------------------------- markdown


def table1_rows(m: dict) -> list[dict]:
    rows = []
    for lang, v in list(m["langs"].items()) + [("avg", m["average"])]:
        row = {"lang": lang}
        for d, label in (("tr", "TR"), ("ir", "IR")):
            for k in KS:
                row[f"{label} R@{k}"] = round(v[d][str(k)], 2)
        row["mean recall"] = round(v["mean_recall"], 2)
        rows.append(row)
    return rows


def _mrv_values(mrv: dict, suffix: str) -> str:
    parts = [f"{d.upper()} {mrv[d + suffix]:.2f}" for d in ("tr", "ir") if d + suffix in mrv]
    mean = f"; mean {mrv['mean' + suffix]:.2f}" if "mean" + suffix in mrv else ""
    return ", ".join(parts) + mean


def mrv_lines(mrv: dict) -> list[str]:
    """The headline MRV line (as Table 1, with its languages and instance counts), then the Eq. 7 line."""
    if "tr" not in mrv and "ir" not in mrv:
        chosen = ", ".join(mrv["langs"]) or "none"
        return [f"MRV: needs at least two languages with shared instances (chosen: {chosen})."]
    counts = ", ".join(f"{mrv['n_' + d]} {d.upper()}" for d in ("tr", "ir") if "n_" + d in mrv)
    paper = mrv.get("paper_langs")
    note = f"; the paper's set is {', '.join(paper)}" if paper and paper != mrv["langs"] else ""
    return [f"{MRV_LABEL} over {', '.join(mrv['langs'])} (K={mrv['k']}; {counts} instances{note}): "
            f"{_mrv_values(mrv, '_std')}.",
            f"{MRV_EQ7_LABEL}: {_mrv_values(mrv, '')}."]


def _collapse_line(m: dict) -> list[str]:
    collapsed = m.get("collapsed_langs") or []
    if not collapsed:
        return []
    fracs = ", ".join(f"{lang} {m['langs'][lang]['distinct_text_frac']:.0%}" for lang in collapsed)
    return [f"**Collapsed text embeddings** (under {m['collapsed_below']:.0%} distinct text vectors per distinct "
            f"caption): {fracs}. Their recalls and MRV say little about retrieval.", ""]


def render_report(m: dict, title: str = "") -> str:
    title = title or f"{m['benchmark']} retrieval"
    mode = "ITC only" if m["itc_only"] else f"ITC + ITM re-ranking of the top {m['k_test']}"
    rows = table1_rows(m)
    cols = list(rows[0])
    lines = [f"# {title}", "", f"Checkpoint: `{m.get('checkpoint', '')}`  ", f"Scoring: {mode}.", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in rows:
        cells = [f"**{row['lang']}**" if row["lang"] == "avg" else row["lang"]]
        cells += [_pct(row[c]) for c in cols[1:]]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", *_collapse_line(m), *[line + "  " for line in mrv_lines(m["mrv"])], "",
              "TR = image-to-text, IR = text-to-image; Recall@K in percent; mean recall = average of the six; "
              "a tie with the ground truth counts against it.",
              f"{MRV_LABEL} = mean over instances of the population standard deviation of the instance's 0-based "
              f"rank across the K languages (the authors' code, which Table 1 reports); {MRV_EQ7_LABEL} = the same "
              "with the variance. Lower is more consistent.",
              "", "![recall per language](recall.png)", "", "![rank spread](rank_variance.png)", ""]
    return "\n".join(lines)


def comparison_rows(items: Sequence[dict], names: Sequence[str]) -> list[dict]:
    langs: list[str] = []
    for m in items:
        langs += [lang for lang in m["langs"] if lang not in langs]
    rows = []
    for name, m in zip(names, items):
        row = {"run": name}
        for lang in langs:
            row[lang] = round(m["langs"][lang]["mean_recall"], 2) if lang in m["langs"] else None
        row["avg"] = round(m["average"]["mean_recall"], 2)
        for suffix, label in (("_std", "std, Table 1"), ("", "Eq. 7")):
            for d in ("tr", "ir"):
                value = m["mrv"].get(d + suffix)
                row[f"MRV {d.upper()} ({label})"] = None if value is None else round(value, 2)
        row["MRV langs"] = ",".join(m["mrv"]["langs"])
        rows.append(row)
    return rows


def _cell(value) -> str:
    if value is None:
        return "–"
    return _pct(value) if isinstance(value, float) else str(value)


def render_comparison(items: Sequence[dict], names: Sequence[str], title: str = "Comparison") -> str:
    rows = comparison_rows(items, names)
    cols = list(rows[0])
    lines = [f"# {title}", "", "Mean recall per language (average of TR/IR R@1/5/10), its average over "
             f"languages, {MRV_LABEL} and {MRV_EQ7_LABEL} over the MRV languages (lower is better).", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row[c]) for c in cols) + " |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- plots


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_png(fig, path: str) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
    atomic.write_bytes(path, buf.getvalue())


def plot_recall_bars(series: dict[str, dict[str, float]], path: str, title: str = "Mean recall per language") -> None:
    """Grouped bars: one group per language, one bar per series (run)."""
    plt = _plt()
    langs: list[str] = []
    for v in series.values():
        langs += [lang for lang in v if lang not in langs]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(langs) * max(1, len(series)) ** 0.5 + 2), 3.2))
    width = 0.8 / max(1, len(series))
    x = np.arange(len(langs))
    for j, (name, v) in enumerate(series.items()):
        ax.bar(x + j * width - 0.4 + width / 2, [v.get(lang, 0.0) for lang in langs], width, label=name)
    ax.set_xticks(x, langs)
    ax.set_ylim(0, 100)
    ax.set_ylabel("recall (%)")
    ax.set_title(title)
    if len(series) > 1:
        ax.legend(fontsize=8)
    _save_png(fig, path)
    plt.close(fig)


def plot_rank_variance(spreads: dict[str, np.ndarray], path: str, title: str, xlabel: str) -> None:
    """Histogram of a per-instance spread (std or variance) of the rank across languages (TR and IR)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    drawn = False
    present = [v for v in spreads.values() if len(v)]
    # Shared bins, so a direction whose spreads are all near 0 still shows as a visible bar.
    bins = np.histogram_bin_edges(np.concatenate(present), bins=30) if present else 30
    for label, v in spreads.items():
        if len(v):
            ax.hist(v, bins=bins, alpha=0.6, label=f"{label} (mean {np.mean(v):.2f})")
            drawn = True
    if not drawn:
        ax.text(0.5, 0.5, "no instances shared by two or more languages", ha="center", va="center")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("instances")
    ax.set_title(title)
    if drawn:
        ax.legend(fontsize=8)
    _save_png(fig, path)
    plt.close(fig)


# --------------------------------------------------------------------------- report directories


def write_report(out_dir: str, m: dict, results: dict | None = None, title: str = "") -> dict:
    """Write metrics.json, report.md, ranks.npz (when ``results`` are given) and the two plots."""
    os.makedirs(out_dir, exist_ok=True)
    spreads: dict[str, np.ndarray] = {}
    if results is not None:
        arrays = {}
        for lang, r in results.items():
            arrays[f"{lang}/tr"] = r.tr_ranks
            arrays[f"{lang}/ir"] = r.ir_ranks
            arrays[f"{lang}/image_keys"] = np.array(r.image_keys)
            arrays[f"{lang}/text_keys"] = np.array(r.text_keys)
        buf = io.BytesIO()
        np.savez_compressed(buf, **arrays)
        atomic.write_bytes(os.path.join(out_dir, "ranks.npz"), buf.getvalue())
        mrv_langs = m["mrv"]["langs"]
        if len(mrv_langs) >= 2:
            for d in ("tr", "ir"):
                ranks, _ = aligned_ranks(results, mrv_langs, d)
                # The headline's per-instance std, so the histogram's means are the reported MRV.
                spreads[d.upper()] = M.rank_variance_per_instance(ranks, "std") if ranks.shape[1] else np.array([])
    plot_recall_bars({"mean recall": {lang: v["mean_recall"] for lang, v in m["langs"].items()}},
                     os.path.join(out_dir, "recall.png"), title=f"{m['benchmark']}: mean recall per language")
    plot_rank_variance(spreads, os.path.join(out_dir, "rank_variance.png"),
                       title=f"rank std across {', '.join(m['mrv']['langs'])} ({MRV_LABEL})",
                       xlabel="standard deviation of the rank across languages")
    markdown = render_report(m, title)
    atomic.write_text(os.path.join(out_dir, "report.md"), markdown)
    atomic.write_json(os.path.join(out_dir, "metrics.json"), m)  # last: marks a complete report
    return {"dir": out_dir, "markdown": markdown}


def load_metrics(report: str | dict) -> dict:
    if isinstance(report, dict):
        return report
    path = report if report.endswith(".json") else os.path.join(report, "metrics.json")
    if not os.path.exists(path):
        raise CCRKError(f"{path} not found: not a report directory")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def compare_report(reports: Sequence[str | dict], names: Sequence[str] | None, out_dir: str,
                   title: str = "Comparison") -> dict:
    """Several reports (directories or metrics dicts) side by side: compare.md, compare.json, recall.png."""
    items = [load_metrics(r) for r in reports]
    if not items:
        raise CCRKError("compare_report needs at least one report")
    names = list(names) if names else [os.path.basename(str(r).rstrip("/")) if isinstance(r, str) else f"run{i + 1}"
                                       for i, r in enumerate(reports)]
    if len(names) != len(items):
        raise CCRKError(f"{len(names)} names given for {len(items)} reports")
    markdown = render_comparison(items, names, title)
    rows = comparison_rows(items, names)
    plot_recall_bars({n: {lang: v["mean_recall"] for lang, v in m["langs"].items()} for n, m in zip(names, items)},
                     os.path.join(out_dir, "recall.png"), title="mean recall per language")
    atomic.write_text(os.path.join(out_dir, "compare.md"), markdown + "\n![recall per language](recall.png)\n")
    atomic.write_json(os.path.join(out_dir, "compare.json"), {"names": names, "rows": rows})
    return {"dir": out_dir, "markdown": markdown, "rows": rows}


def report_id(run_version: str | None, params: dict) -> str:
    return content_version("report", [run_version] if run_version else [], {**params, "metrics": METRICS_VERSION})


def find_run_version(root: str | None, checkpoint: str) -> str | None:
    """The catalog version of the run that owns ``checkpoint`` (a run dir or a checkpoint inside one)."""
    target = os.path.abspath(checkpoint)
    for art in Catalog(root).list("run"):
        path = os.path.abspath(art.path)
        if target == path or target.startswith(path + os.sep):
            return art.version
    return None


def report_target(root: str | None, checkpoint: str, params: dict) -> tuple[str, str | None, str]:
    """(report id, the evaluated run's version or None, ``reports/<id>/``) for ``checkpoint`` and ``params``."""
    root = layout.data_root(root)
    run_version = find_run_version(root, checkpoint)
    rid = report_id(run_version, params)
    return rid, run_version, layout.report_dir(root, rid)


def report_stats(m: dict) -> dict:
    """What the catalog keeps of a report beside its params: mean recall and the MRVs."""
    return {"mean_recall": m["average"]["mean_recall"],
            **{f"mrv_{key}": m["mrv"][key] for key in ("tr_std", "ir_std", "tr", "ir") if key in m["mrv"]}}


def existing_report(root: str | None, checkpoint: str, params: dict) -> dict | None:
    """The summary of a report already written for this checkpoint and these parameters, or None."""
    rid, run_version, out_dir = report_target(root, checkpoint, params)
    metrics_path = os.path.join(out_dir, "metrics.json")
    if not os.path.exists(metrics_path):
        return None
    with open(metrics_path, encoding="utf-8") as f:
        m = json.load(f)
    return {"report_id": rid, "run_version": run_version, "dir": out_dir, "metrics": m, "skipped": True}


def write_report_dir(root: str | None, m: dict, results: dict | None, params: dict, title: str = "") -> dict:
    """Write ``reports/<id>/`` (the id: the run owning ``m["checkpoint"]`` and ``params``); the returned
    summary's ``stats`` are what the catalog keeps (storage.stage.run_stage records it, the run as
    parent), its ``markdown`` and ``table`` what the evaluate flow publishes."""
    rid, run_version, out_dir = report_target(root, m.get("checkpoint", ""), params)
    out = write_report(out_dir, {**m, "report_id": rid, "run_version": run_version}, results, title)
    return {**out, "report_id": rid, "run_version": run_version, "table": table1_rows(m), "stats": report_stats(m)}


# --------------------------------------------------------------------------- MRV across models


class StoredRanks:
    """One language's ranks and instance keys as a report saved them (``ranks.npz``): what
    :func:`ccrk.evaluation.retrieval.aligned_ranks` reads of a result."""

    def __init__(self, arrays, lang: str):
        self.lang = lang
        self.tr_ranks, self.ir_ranks = arrays[f"{lang}/tr"], arrays[f"{lang}/ir"]
        self.image_keys = [str(k) for k in arrays[f"{lang}/image_keys"]]
        self.text_keys = [str(k) for k in arrays[f"{lang}/text_keys"]]


def load_ranks(report_dir: str, langs: Sequence[str]) -> dict[str, StoredRanks]:
    path = os.path.join(report_dir, "ranks.npz")
    if not os.path.exists(path):
        raise CCRKError(f"{path} not found: the report has no ranks to combine")
    with np.load(path) as arrays:
        missing = [lang for lang in langs if f"{lang}/tr" not in arrays]
        if missing:
            raise CCRKError(f"{path}: no ranks for {', '.join(missing)}")
        return {lang: StoredRanks(arrays, lang) for lang in langs}


def parse_part(part: str) -> tuple[str, list[str] | None]:
    """``REPORT`` or ``REPORT:lang,lang`` (the languages taken from that report; default all of them)."""
    head, sep, tail = part.rpartition(":")
    if sep and tail and "/" not in tail and os.sep not in tail:
        return head, [lang.strip() for lang in tail.split(",") if lang.strip()]
    return part, None


def combine_metrics(parts: Sequence[tuple[str, list[str] | None]], mrv_langs: Sequence[str] | None = None
                    ) -> tuple[dict, dict[str, StoredRanks]]:
    """One report's metrics from several, each language from one of them (one fine-tuned model per
    language, as Table 1's few-shot and single-language rows): their recalls as reported, and the MRV
    of their ranks together; (metrics, the ranks per language)."""
    per_lang, results, sources, benchmarks, first = {}, {}, [], set(), None
    for report_dir, langs in parts:
        m = load_metrics(report_dir)
        first = first or m
        benchmarks.add(m["benchmark"])
        langs = langs or list(m["langs"])
        unknown = [lang for lang in langs if lang not in m["langs"]]
        if unknown:
            raise CCRKError(f"{report_dir}: the report has no {', '.join(unknown)} (it has {', '.join(m['langs'])})")
        twice = [lang for lang in langs if lang in per_lang]
        if twice:
            raise CCRKError(f"{', '.join(twice)} given by two reports; name each language's report once (REPORT:lang)")
        per_lang.update({lang: m["langs"][lang] for lang in langs})
        results.update(load_ranks(report_dir, langs))
        sources.append({"report": os.path.abspath(report_dir), "report_id": m.get("report_id"),
                        "checkpoint": m.get("checkpoint"), "langs": langs})
    if len(benchmarks) != 1:
        raise CCRKError(f"reports of different benchmarks cannot be combined: {', '.join(sorted(benchmarks))}")
    benchmark = benchmarks.pop()
    langs = list(per_lang)
    average = {d: {str(k): float(np.mean([per_lang[lang][d][str(k)] for lang in langs])) for k in KS}
               for d in ("tr", "ir")}
    average["mean_recall"] = float(np.mean([per_lang[lang]["mean_recall"] for lang in langs]))
    m = {"benchmark": benchmark, "checkpoint": "; ".join(s["checkpoint"] or "" for s in sources),
         "k_test": first["k_test"], "itc_only": first["itc_only"], "metrics_version": METRICS_VERSION,
         "rank_ties": first.get("rank_ties"), "langs": per_lang, "average": average,
         "mrv": build_mrv(results, benchmark, mrv_langs), "collapsed_langs": [], "collapsed_below": COLLAPSED_BELOW,
         "combined_from": sources}
    return m, results


# --------------------------------------------------------------------------- Table 1

PAPER_TABLE1 = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets", "paper_table1.json")
GROUPS = {"zero-shot": "zero_shot", "few-shot": "few_shot", "single-language": "single_language_finetune"}
# Table 1's cells per benchmark: R@1 averaged over the non-English languages (xFlickr&CO, WIT: the
# IGLUE convention; the paper's caption does not say), mean recall per language (Multi30K, COCO), MRV.
TABLE1_COLUMNS = {"xflickrco": ("IR R@1", "TR R@1", "MRV"), "demo": ("IR R@1", "TR R@1", "MRV"),
                  "wit": ("IR R@1", "TR R@1"), "multi30k": ("en", "de", "fr", "cs", "MRV"), "coco": ("en", "zh", "ja")}
_PAPER_KEYS = {"IR R@1": ("ir_r1", "ir"), "TR R@1": ("tr_r1", "tr"), "MRV": ("mrv4",)}


@functools.lru_cache(maxsize=1)
def _paper_table() -> dict:
    with open(PAPER_TABLE1, encoding="utf-8") as f:
        return json.load(f)


def paper_figures(model: str | None, group: str, benchmark: str) -> dict | None:
    """The paper's Table 1 cells for ``model`` (e.g. CCR10-E) in ``group`` on ``benchmark``, by our column names."""
    if not model:
        return None
    row = next((r for r in _paper_table()["rows"] if r["model"].lower() == model.lower() and r["benchmark"] == benchmark
                and r["group"] == GROUPS.get(group)), None)
    if row is None:
        return None
    out = {}
    for col in TABLE1_COLUMNS[benchmark]:
        key = next((k for k in _PAPER_KEYS.get(col, (col,)) if k in row["values"]), None)
        out[col] = row["values"].get(key) if key else None
    return out if any(v is not None for v in out.values()) else None


def table1_cells(m: dict) -> dict:
    """Our Table 1 cells of a report (see TABLE1_COLUMNS)."""
    bench, langs = m["benchmark"], m["langs"]
    cells: dict = {}
    if bench in ("xflickrco", "demo", "wit"):
        targets = [lang for lang in langs if lang != "en"] or list(langs)
        cells["IR R@1"] = float(np.mean([langs[lang]["ir"]["1"] for lang in targets]))
        cells["TR R@1"] = float(np.mean([langs[lang]["tr"]["1"] for lang in targets]))
    else:
        cells.update({lang: langs[lang]["mean_recall"] for lang in TABLE1_COLUMNS[bench] if lang in langs})
    if "MRV" in TABLE1_COLUMNS[bench]:
        cells["MRV"] = m["mrv"].get("mean_std")
    return {col: cells.get(col) for col in TABLE1_COLUMNS[bench]}


def render_table1(rows: Sequence[dict], title: str = "Table 1") -> str:
    """Protocol rows (run, group, benchmark, setting, report metrics, paper figures) as Table 1: one
    block per benchmark, a row per (run, group), the paper's figures beneath ours where they match."""
    lines = [f"# {title}", ""]
    for bench in dict.fromkeys(r["benchmark"] for r in rows):
        cols, block = TABLE1_COLUMNS[bench], [r for r in rows if r["benchmark"] == bench]
        # R@1 benchmarks: each language's mean recall after the paper's columns.
        extra = [] if bench in ("multi30k", "coco") else list(dict.fromkeys(
            lang for r in block for lang in r["metrics"]["langs"]))
        lines += [f"## {bench}", "", "| run | protocol | " + " | ".join([*cols, *(f"mR {x}" for x in extra)])
                  + " | MRV langs |", "|" + "---|" * (len(cols) + len(extra) + 3)]
        for r in block:
            m = r["metrics"]
            cells = [*table1_cells(m).values(), *(m["langs"].get(x, {}).get("mean_recall") for x in extra)]
            lines.append(f"| {r['run']} | {r['group']} | " + " | ".join(_cell(v) for v in cells)
                         + f" | {','.join(m['mrv']['langs'])} |")
            if r.get("paper"):
                lines.append(f"| *paper: {r['paper_model']}* | {r['group']} | "
                             + " | ".join(_cell(r["paper"].get(c)) for c in cols) + " |" * (len(extra) + 1) + " |")
        lines.append("")
    lines += ["IR/TR R@1: Recall@1 averaged over the evaluated languages other than English (IGLUE's convention "
              "for xFlickr&CO and WIT; the paper's caption does not say); en/de/... and mR <lang>: mean recall (R@1/5/10 "
              f"of both directions) of that language; MRV: {MRV_LABEL}, the mean of its TR and IR values (the paper prints "
              "one number and does not say how the directions combine). Few-shot and single-language rows take "
              "each language from its own fine-tuned model and their MRV across those models. The paper's "
              "figures (ccrk/assets/paper_table1.json) are shown only where the benchmark and protocol match; "
              "they were obtained with the paper's full pre-training data and model.", ""]
    return "\n".join(lines)
