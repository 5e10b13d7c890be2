"""Evaluation protocols: fine-tuning for retrieval, and evaluating a checkpoint on a benchmark.

- zero-shot: fine-tune on the benchmark's English training set, evaluate every language;
- few-shot: continue from the English fine-tuned model on an N-shot target-language file;
- single-language: fine-tune on one language's training set, evaluate that language.

The fine-tuning loss is the reference's: ITC whose positives are every pair sharing the image id,
plus ITM on the positives and one hard negative text per image and image per text, drawn with
probability softmax(ITC similarity / temperature) among pairs of other images.

A fine-tune writes a run directory (``runs/<id>/``: ``checkpoints/step-XXXXXXX/`` in the model's
checkpoint layout, ``tokenizer/``, ``finetune.jsonl``) recorded in the catalog as kind ``run``
with the starting run as parent. A checkpoint is written after every epoch; a killed fine-tune
resumes from its last epoch (with a fresh optimiser state at the right learning-rate step).

When the checkpoint's config has ``data: {pre_caption: true}``, training and test captions go through
the authors' normalisation at the benchmark's word limit (``benchmarks.MAX_WORDS``), as in their
fine-tuning scripts; captions it leaves empty are counted (``rejected_captions``) and left out.
"""
from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from ccrk import losses
from ccrk.evaluation import benchmarks as bm
from storage import atomic, layout
from storage.errors import CCRKError
from storage.versioning import content_version, file_sha256

MODES = ("zero-shot", "few-shot", "single")
# The reference's fine-tuning settings (xFlickrCO / Multi30K / COCO: AdamW lr 3e-5, 10 epochs).
FINETUNE_DEFAULTS = {"epochs": 10, "batch_size": 32, "lr": 3e-5, "weight_decay": 0.01, "warmup": 0.1,
                     "seed": 42, "few_shot_lr": 1e-5,
                     # The authors' retrieval model never clamps its temperature (pre-training does).
                     "temp_clamp": False}


# --------------------------------------------------------------------------- loss


def itm_loss(model, image_embeds, image_atts, image_feat, text_embeds, text_atts, text_feat, temp, image_ids,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Matching loss on the positive pairs and ITC-weighted hard negatives of other image ids (the
    authors' get_matching_loss with idx): for each text a negative image, for each image a negative text."""
    bs = image_embeds.shape[0]
    with torch.no_grad():
        same = image_ids[:, None] == image_ids[None, :]
        sim = image_feat @ text_feat.T
        rows = (~same).any(dim=1).nonzero().flatten()  # a batch of one image id has no negatives
    pos = model.itm_logits(image_embeds, image_atts, text_embeds, text_atts)
    logits, labels = [pos], [torch.ones(bs, dtype=torch.long)]
    if len(rows):
        with torch.no_grad():
            neg_img = losses.sample(losses.negative_weights(sim.T[rows], same[rows], temp), generator)
            neg_txt = losses.sample(losses.negative_weights(sim[rows], same[rows], temp), generator)
        logits.append(model.itm_logits(image_embeds[neg_img], image_atts[neg_img], text_embeds[rows], text_atts[rows]))
        logits.append(model.itm_logits(image_embeds[rows], image_atts[rows], text_embeds[neg_txt], text_atts[neg_txt]))
        labels.append(torch.zeros(2 * len(rows), dtype=torch.long))
    return F.cross_entropy(torch.cat(logits).float(), torch.cat(labels).to(pos.device))


def finetune_loss(model, pixel_values, input_ids, attention_mask, image_ids, generator=None) -> dict:
    image_embeds, image_feat = model.encode_image(pixel_values)
    text_embeds, text_feat = model.encode_text(input_ids, attention_mask)
    image_atts = torch.ones(image_embeds.shape[:2], dtype=torch.long, device=image_embeds.device)
    temp = model.temp
    l_itc = losses.id_contrastive_loss(image_feat, text_feat, temp, image_ids)
    l_itm = itm_loss(model, image_embeds, image_atts, image_feat, text_embeds, attention_mask, text_feat, temp,
                     image_ids, generator)
    return {"loss": l_itc + l_itm, "itc": l_itc.detach(), "itm": l_itm.detach()}


# --------------------------------------------------------------------------- training


def _lr_factor(step: int, total: int, warmup: float) -> float:
    n_warm = max(1, math.ceil(warmup * total))
    if step < n_warm:
        return (step + 1) / n_warm
    return max(0.0, (total - step) / max(1, total - n_warm))


def _max_tokens(config: dict) -> int:
    return int(config.get("data", {}).get("max_tokens", 40))


def _checkpoint_config(ckpt_path: str) -> dict:
    """The training config saved next to the checkpoint's weights (read before loading the model)."""
    with open(os.path.join(os.path.dirname(_weights_file(ckpt_path)), "config.json"), encoding="utf-8") as f:
        return json.load(f)


def _max_words(config: dict, benchmark: str) -> int | None:
    """The benchmark's pre_caption word limit when the checkpoint was trained on normalised captions, else None."""
    from ccrk.data import uses_pre_caption

    return bm.default_max_words(benchmark) if uses_pre_caption(config) else None


def _last_epoch_checkpoint(run_dir: str) -> tuple[str | None, int]:
    state_path = os.path.join(run_dir, "finetune_state.json")
    if not os.path.exists(state_path):
        return None, 0
    with open(state_path, encoding="utf-8") as f:
        state = json.load(f)
    return state["checkpoint"], int(state["epochs_done"])


def train_pairs(model, tokenizer, config: dict, pairs: Sequence[bm.TrainPair], run_dir: str, epochs: int,
                batch_size: int, lr: float, weight_decay: float = 0.01, warmup: float = 0.1, seed: int = 42,
                log: Callable[[dict], None] | None = None, temp_clamp: bool = False) -> dict:
    """Fine-tune ``model`` on ``pairs`` (resuming from the run's last finished epoch); returns a summary."""
    from ccrk.data import image_transform
    from ccrk.model import save_model

    if not pairs:
        raise CCRKError("no training pairs to fine-tune on")
    device = next(model.parameters()).device
    transform = image_transform(config, train=True)
    id_index = {i: n for n, i in enumerate(dict.fromkeys(p.image_id for p in pairs))}
    steps_per_epoch = math.ceil(len(pairs) / batch_size)
    total = steps_per_epoch * epochs
    ckpt, done = _last_epoch_checkpoint(run_dir)
    if ckpt and done:
        from safetensors.torch import load_model

        load_model(model, os.path.join(ckpt, "model.safetensors"), device=str(device))
    from ccrk.trainer import adamw

    opt = adamw([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)
    metrics_path = os.path.join(run_dir, "finetune.jsonl")
    step = done * steps_per_epoch
    model.train()
    last = {}
    for epoch in range(done, epochs):
        order = list(range(len(pairs)))
        random.Random(f"{seed}/{epoch}").shuffle(order)
        rng = random.Random(f"{seed}/{epoch}/augment")
        gen = torch.Generator().manual_seed(seed * 1000 + epoch)
        sums = {"loss": 0.0, "itc": 0.0, "itm": 0.0}
        for b0 in range(0, len(order), batch_size):
            batch = [pairs[i] for i in order[b0:b0 + batch_size]]
            pixels = torch.stack([transform(p.image.open(), rng) for p in batch]).to(device)
            enc = tokenizer([p.caption for p in batch], padding="longest", truncation=True,
                            max_length=_max_tokens(config), return_tensors="pt")
            ids = torch.tensor([id_index[p.image_id] for p in batch], device=device)
            for g in opt.param_groups:
                g["lr"] = lr * _lr_factor(step, total, warmup)
            out = finetune_loss(model, pixels, enc["input_ids"].to(device), enc["attention_mask"].to(device), ids, gen)
            opt.zero_grad(set_to_none=True)
            out["loss"].backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            if temp_clamp:
                model.clamp_temp()
            step += 1
            for k in sums:
                sums[k] += float(out[k].detach())
        n = steps_per_epoch
        last = {"epoch": epoch + 1, "step": step, **{k: v / n for k, v in sums.items()}, "temp": float(model.temp.detach())}
        ckpt_dir = os.path.join(run_dir, "checkpoints", f"step-{step:07d}")
        save_model(model, {**config, "finetune_state": last}, ckpt_dir)
        with open(metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(last) + "\n")
        atomic.write_json(os.path.join(run_dir, "finetune_state.json"),
                          {"checkpoint": ckpt_dir, "epochs_done": epoch + 1, "step": step})
        if log:
            log(last)
    model.eval()
    ckpt, done = _last_epoch_checkpoint(run_dir)
    return {"run_dir": run_dir, "checkpoint": ckpt, "epochs": done, "pairs": len(pairs), **last}


# --------------------------------------------------------------------------- protocol plumbing


def training_file(benchmark: str, data_dir: str, lang: str, shots: int | None = None) -> str:
    """The published training file of ``lang`` (``shots``: the few-shot file) for a benchmark."""
    if benchmark in ("xflickrco", "demo"):
        return bm.xflickrco_train_file(data_dir, lang, shots)
    if shots is not None:
        raise CCRKError(f"few-shot files exist for xFlickr&CO only, not {benchmark}")
    name = {"multi30k": f"train.{lang}.json", "coco": f"{lang}.train.json", "wit": f"train_{lang}.jsonl"}[benchmark]
    for d in (data_dir, os.path.join(data_dir, "annotations")):
        if os.path.exists(os.path.join(d, name)):
            return os.path.join(d, name)
    raise CCRKError(f"training file {name} not found in {data_dir}")


def load_training_pairs(benchmark: str, path: str, data_dir: str, images: str | None = None,
                        coco_images: str | None = None, skip_missing: bool = False,
                        clean: bm.CaptionCleaner | None = None) -> tuple[list[bm.TrainPair], int]:
    images = images or os.path.join(data_dir, "images")
    if benchmark in ("xflickrco", "demo"):
        return bm.load_xflickrco_train(path, images, coco_images or images, skip_missing, clean)
    if benchmark == "wit":
        return bm.load_wit_train(path, skip_missing, clean)
    return bm.load_cclm_train(path, images, skip_missing, clean)


@dataclass
class FinetunePlan:
    mode: str
    benchmark: str
    train_lang: str
    shots: int | None
    train_file: str
    eval_langs: list[str] | None


def plan_finetune(mode: str, benchmark: str, data_dir: str, lang: str | None = None, shots: int | None = None,
                  langs: Sequence[str] | None = None) -> FinetunePlan:
    if mode not in MODES:
        raise CCRKError(f"unknown fine-tuning mode {mode!r}; choose one of {', '.join(MODES)}")
    if mode == "zero-shot":
        return FinetunePlan(mode, benchmark, "en", None, training_file(benchmark, data_dir, "en"),
                            list(langs) if langs else None)
    if not lang:
        raise CCRKError(f"--lang is required for {mode} fine-tuning")
    if mode == "few-shot":
        if shots is None:
            raise CCRKError("--shots is required for few-shot fine-tuning")
        return FinetunePlan(mode, benchmark, lang, shots, training_file(benchmark, data_dir, lang, shots),
                            list(langs) if langs else [lang])
    return FinetunePlan(mode, benchmark, lang, None, training_file(benchmark, data_dir, lang),
                        list(langs) if langs else [lang])


def _weights_file(ckpt_path: str) -> str:
    """The safetensors file a run or checkpoint directory stands for (a run: its latest step)."""
    direct = os.path.join(ckpt_path, "model.safetensors")
    if os.path.exists(direct):
        return direct
    steps_dir = os.path.join(ckpt_path, "checkpoints")
    steps = sorted(d for d in os.listdir(steps_dir) if os.path.exists(os.path.join(steps_dir, d, "model.safetensors"))) \
        if os.path.isdir(steps_dir) else []
    if not steps:
        raise CCRKError(f"{ckpt_path} has no checkpoint (expected checkpoints/step-*/model.safetensors)")
    return os.path.join(steps_dir, steps[-1], "model.safetensors")


def _resolve_checkpoint(checkpoint: str, root: str | None) -> str:
    """A run id / catalog version / directory -> a path ``load_pretrained`` accepts."""
    if os.path.exists(checkpoint):
        return checkpoint
    r = layout.data_root(root)
    candidate = layout.run_dir(r, checkpoint)
    if os.path.exists(candidate):
        return candidate
    from storage.catalog import Catalog

    art = Catalog(r).find(checkpoint)
    if art is not None and art.kind == "run":
        return art.path
    raise CCRKError(f"checkpoint {checkpoint!r} is neither a directory, a run under {r}/runs nor a run version")


def run_finetune(root: str | None, checkpoint: str, benchmark: str, data_dir: str, mode: str = "zero-shot",
                 lang: str | None = None, shots: int | None = None, epochs: int | None = None,
                 batch_size: int | None = None, lr: float | None = None, seed: int | None = None,
                 images: str | None = None, coco_images: str | None = None, skip_missing: bool = False,
                 device: str = "cpu", log: Callable[[dict], None] | None = None) -> dict:
    """Fine-tune a pre-trained (or English fine-tuned) checkpoint; records the run in the catalog."""
    from ccrk.model import load_pretrained
    from storage.catalog import Artifact, Catalog

    plan = plan_finetune(mode, benchmark, data_dir, lang, shots)
    ckpt_path = _resolve_checkpoint(checkpoint, root)
    max_words = _max_words(_checkpoint_config(ckpt_path), benchmark)
    clean = bm.CaptionCleaner(max_words)
    pairs, skipped = load_training_pairs(benchmark, plan.train_file, data_dir, images, coco_images, skip_missing,
                                         clean)
    hp = dict(FINETUNE_DEFAULTS)
    if mode == "few-shot":
        hp["lr"] = hp["few_shot_lr"]
    hp.update({k: v for k, v in {"epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed}.items()
               if v is not None})
    r = layout.data_root(root)
    from ccrk.evaluation.reports import find_run_version

    parent = find_run_version(r, ckpt_path)
    params = {"protocol": mode, "benchmark": benchmark, "train_lang": plan.train_lang, "shots": shots,
              "train_file_sha256": file_sha256(plan.train_file), "skip_missing": skip_missing,
              "start": parent or layout.rooted(r, ckpt_path),
              **{k: hp[k] for k in ("epochs", "batch_size", "lr", "weight_decay", "warmup", "seed", "temp_clamp")}}
    if max_words is not None:  # only when on, so runs without normalisation keep their ids
        params["max_words"] = max_words
    run_id = content_version("run", [parent] if parent else [], params)
    run_dir = layout.run_dir(r, run_id)
    model, tokenizer, config = load_pretrained(ckpt_path, device=device)
    os.makedirs(run_dir, exist_ok=True)
    tok_dir = os.path.join(run_dir, "tokenizer")
    if not os.path.isdir(tok_dir) and hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(tok_dir)
    t0 = time.time()
    summary = train_pairs(model, tokenizer, config, pairs, run_dir, hp["epochs"], hp["batch_size"], hp["lr"],
                          hp["weight_decay"], hp["warmup"], hp["seed"], log, hp["temp_clamp"])
    summary.update(run_id=run_id, skipped_images=skipped, rejected_captions=clean.rejected,
                   seconds=round(time.time() - t0, 1), params=params,
                   eval_langs=plan.eval_langs)
    Catalog(r).record(Artifact(run_id, "run", f"finetune-{benchmark}-{mode}", run_dir, params=params,
                               stats={k: summary.get(k) for k in ("loss", "itc", "itm", "epochs", "pairs")},
                               parents=[parent] if parent else []))
    return summary


def run_evaluation(root: str | None, checkpoint: str, benchmark: str, data_dir: str, langs=None, mrv_langs=None,
                   k_test: int | None = None, itc_only: bool = False, images: str | None = None,
                   coco_images: str | None = None, skip_missing: bool = False, batch_size: int = 64,
                   device: str = "cpu", progress: Callable[[str], None] | None = None) -> dict:
    """Evaluate a checkpoint on a benchmark and publish ``reports/<id>/``; returns the report summary."""
    from ccrk.data import image_transform
    from ccrk.evaluation import reports
    from ccrk.evaluation.retrieval import evaluate_benchmark
    from ccrk.model import load_pretrained

    ckpt_path = _resolve_checkpoint(checkpoint, root)
    max_words = _max_words(_checkpoint_config(ckpt_path), benchmark)
    bench = bm.load_benchmark(benchmark, data_dir, langs, images, coco_images, skip_missing, max_words)
    k_test = k_test or bm.default_k_test(benchmark)
    eval_langs = list(bench.langs)
    params = {"benchmark": benchmark, "langs": eval_langs,
              "mrv_langs": [lang for lang in (mrv_langs or reports.default_mrv_langs(benchmark, eval_langs))
                            if lang in eval_langs], "k_test": k_test,
              "itc_only": itc_only, "checkpoint_sha256": file_sha256(_weights_file(ckpt_path)),
              "data": layout.rooted(layout.data_root(root), data_dir), "skip_missing": skip_missing}
    if max_words is not None:  # only when on, so reports without normalisation keep their ids
        params["max_words"] = max_words
    done = reports.existing_report(root, os.path.abspath(ckpt_path), params)
    if done is not None:  # same checkpoint, benchmark and settings: the report is already there
        return done
    model, tokenizer, config = load_pretrained(ckpt_path, device=device)
    t0 = time.time()
    results = evaluate_benchmark(model, tokenizer, image_transform(config, train=False), bench, k_test=k_test,
                                 itc_only=itc_only, max_tokens=_max_tokens(config), batch_size=batch_size,
                                 progress=progress)
    m = reports.build_metrics(results, benchmark, mrv_langs, k_test, itc_only, os.path.abspath(ckpt_path),
                              extra={"skipped_images": bench.skipped_images, "rejected_captions": bench.rejected_texts,
                                     "seconds": round(time.time() - t0, 1)})
    out = reports.publish_report(root, m, results, params, title=f"{benchmark} retrieval")
    return {**out, "metrics": m}
