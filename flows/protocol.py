"""The paper's evaluation protocols on a pre-trained run, one benchmark at a time (``ccrk reproduce``'s
``protocol:`` list, :class:`ccrk.specs.ProtocolSpec`):

- zero-shot: fine-tune on the benchmark's English training set, evaluate every language;
- few-shot: from the English fine-tune, one model per target language on its N-shot file, each
  evaluated on its language; their ranks combined into one MRV (with English from the zero-shot model);
- single-language: one model per language fine-tuned on that language alone, combined likewise (English
  from the English fine-tune: in Table 1 its EN cells are the zero-shot ones and MRV_4 spans en too).

Every fine-tune is a run in the catalog with its parent (the pre-trained run, or the English
fine-tune for few-shot), every score a report; each is a stage, so a killed protocol resumes at
the fine-tune or evaluation it was in, and a finished one is read back.
"""
from __future__ import annotations

from typing import Callable

from ccrk.specs import ProtocolSpec
from flows.evaluate import combine_flow, evaluate_flow, finetune_flow

# report(kind, summary): told each fine-tune ("finetune") and score ("score") as it finishes.
Reporter = Callable[[str, dict], None]


def _finetune(spec, root, progress, report: Reporter, label: str) -> dict:
    run = finetune_flow(spec, root=root, progress=progress)["run"]
    epoch = run["selection"].get("best", {}).get("epoch")
    chosen = f"epoch {epoch} on {run['selection']['on']}" if epoch else "last epoch"
    report("finetune", {**run, "_line": f"{label}: run {run['run_id']} ({chosen})"
                                        f"{' (already trained)' if run.get('skipped') else ''}"})
    return run


def _score(spec, root, report: Reporter, label: str) -> dict:
    out = evaluate_flow(spec, root=root)
    avg = out["metrics"]["average"]["mean_recall"]
    report("score", {**out, "_line": f"{label}: report {out['report_id']}, mean recall {avg:.2f}"})
    return out


def run_protocol(entry: ProtocolSpec, run_name: str, checkpoint: str, root: str, progress=None,
                 report: Reporter | None = None) -> list[dict]:
    """The protocol rows of ``entry`` for the pre-trained ``checkpoint``: dicts with run, group,
    benchmark, setting and report (its ``dir`` and ``metrics``)."""
    report = report or (lambda kind, summary: None)
    name = f"{run_name} {entry.benchmark}"
    rows: list[dict] = []
    english = _finetune(entry.finetune_spec("zero-shot", checkpoint=checkpoint), root, progress, report,
                        f"{name} zero-shot fine-tune (en)")
    zero = _score(entry.evaluate_spec(english["selected"], entry.langs), root, report, f"{name} zero-shot")
    if entry.zero_shot:
        rows.append({"run": run_name, "group": "zero-shot", "benchmark": entry.benchmark,
                     "setting": "fine-tuned on English", "report": zero})
    # English in the one-model-per-language rows: the English fine-tune's.
    english_part = [(zero["dir"], ["en"])] if "en" in zero["metrics"]["langs"] else []
    if entry.few_shot:
        parts = [p for p in english_part if "en" not in entry.few_shot.langs]
        for lang in entry.few_shot.langs:
            run = _finetune(entry.finetune_spec("few-shot", lang, english["selected"]), root, progress, report,
                            f"{name} few-shot {entry.few_shot.shots} ({lang})")
            parts.append((_score(entry.evaluate_spec(run["selected"], [lang]), root, report,
                                 f"{name} few-shot ({lang})")["dir"], [lang]))
        rows.append({"run": run_name, "group": "few-shot", "benchmark": entry.benchmark,
                     "setting": f"{entry.few_shot.shots}-shot per language, from the English fine-tune",
                     "report": combine_flow(parts, root=root, mrv_langs=entry.mrv_langs)})
    if entry.single:
        parts = [p for p in english_part if "en" not in entry.single.langs]
        for lang in entry.single.langs:
            run = _finetune(entry.finetune_spec("single", lang, checkpoint), root, progress, report,
                            f"{name} single-language fine-tune ({lang})")
            parts.append((_score(entry.evaluate_spec(run["selected"], [lang]), root, report,
                                 f"{name} single ({lang})")["dir"], [lang]))
        rows.append({"run": run_name, "group": "single-language", "benchmark": entry.benchmark,
                     "setting": "one model per language, fine-tuned on it",
                     "report": combine_flow(parts, root=root, mrv_langs=entry.mrv_langs)})
    return rows
