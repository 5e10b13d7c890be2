"""Evaluation protocols: fine-tuning for retrieval, and evaluating a checkpoint on a benchmark.

- zero-shot: fine-tune on the benchmark's English training set, evaluate every language;
- few-shot: continue from the English fine-tuned model on an N-shot target-language file;
- single-language: fine-tune on one language's training set, evaluate that language.

The fine-tuning loss is the reference's: ITC whose positives are every pair sharing the image id,
plus ITM on the positives and one hard negative text per image and image per text, drawn with
probability softmax(ITC similarity / temperature) among pairs of other images.

Fine-tuning runs through the pre-training loop (``ccrk.trainer.run_loop``: DDP, bf16 autocast on
GPUs, exact step resume) with :class:`PairBatches` as its batches and :class:`FinetuneObjective` as
its loss. A fine-tune writes a run directory (``runs/<id>/``) in the trainer's layout --
``config.json``, ``tokenizer/``, ``checkpoints/step-XXXXXXX/`` (model, optimizer, trainer state,
per-rank RNG), ``metrics.jsonl``, ``loss_curve.png`` -- recorded in the catalog as kind ``run``
with the starting run as parent (:class:`FinetuneStage` through storage.stage.run_stage). A checkpoint
is written at the end of every epoch; a killed fine-tune resumes from its latest checkpoint exactly as
if it had not stopped, and a finished one is not trained again.

When the checkpoint's config has ``data: {pre_caption: true}``, training and test captions go through
the authors' normalisation at the benchmark's word limit (``benchmarks.MAX_WORDS``), as in their
fine-tuning scripts; captions it leaves empty are counted (``rejected_captions``) and left out.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from ccrk import distributed, losses, trainer
from ccrk.data import image_transform, uses_pre_caption
from ccrk.evaluation import benchmarks as bm
from ccrk.evaluation import loaders, reports
from ccrk.evaluation.retrieval import evaluate_benchmark
from ccrk.model import latest_checkpoint, load_pretrained, readable_weights
from ccrk.model import save_model
from ccrk.specs import FINETUNE_KEYS, EvaluateSpec, FinetuneHyperparameters, FinetuneSpec
from storage import atomic, layout
from storage.catalog import Catalog
from storage.errors import CCRKError
from storage.stage import Outcome, StagePlan, run_stage
from storage.versioning import content_version, file_sha256

MODES = ("zero-shot", "few-shot", "single")
# The fine-tuning settings no preset varies (seed, temp_clamp), as ccrk.specs.FinetuneHyperparameters
# declares them; the per-benchmark ones are ccrk.specs.FINETUNE_PRESETS'.
FINETUNE_DEFAULTS = FinetuneHyperparameters().to_config()


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

# The loop's settings for fine-tuning beside the schedule (a key of either may be given in train_pairs'
# ``hp``): gradients clipped at 1.0; AdamW betas (0.9, 0.98) and eps 1e-8 as the authors' optim.py;
# bf16 autocast on GPUs as in pre-training; checkpoint_every None = an epoch (a row is logged there
# too, so the epoch's mean loss is read off the rows); the selection scoring runs at epoch ends.
FINETUNE_LOOP = {"clip": 1.0, "bf16": True, "betas": [0.9, 0.98], "log_every": 10, "checkpoint_every": None,
                 "keep_checkpoints": 2}
BEST = "best"  # checkpoints/best/: the selected model (model.safetensors, config.json, selection.json)


class FinetuneObjective(nn.Module):
    """:func:`finetune_loss` as the trainer's objective; the hard negatives are drawn from the step's seed."""

    uses_all_parameters = False  # the MLM head is idle (DDP must know)

    def __init__(self, model, temp_clamp: bool = False):
        super().__init__()
        self.model, self.temp_clamp = model, temp_clamp

    def forward(self, batch: dict, seed: int) -> dict:
        gen = torch.Generator(device=batch["input_ids"].device).manual_seed(seed)
        return finetune_loss(self.model, batch["pixel_values"], batch["input_ids"], batch["attention_mask"],
                             batch["image_ids"], gen)

    def after_step(self) -> None:
        if self.temp_clamp:
            self.model.clamp_temp()


def augment_rng(seed: int, epoch: int, position: int) -> random.Random:
    return random.Random(f"{seed}/{epoch}/augment/{position}")


class PairBatches(torch.utils.data.Dataset):
    """This rank's fine-tuning batches as a map from the global step: a pure function of (seed, step).

    Epoch ``e`` is the pairs as ``random.Random(f"{seed}/{e}")`` shuffles them; its global batch
    ``b`` is positions ``[b*B*W, (b+1)*B*W)`` (the last one partial), of which rank r reads its
    contiguous share: B positions, and in the last batch an even share, padded from the epoch's
    start so every rank has as many rows (their features are gathered). The image at position p is
    augmented by :func:`augment_rng` (seed, e, p).
    """

    def __init__(self, pairs: Sequence[bm.TrainPair], config: dict, tokenizer, batch_size: int, seed: int,
                 rank: int = 0, world: int = 1):
        self.pairs, self.tok, self.batch_size, self.seed = list(pairs), tokenizer, int(batch_size), int(seed)
        self.rank, self.world = rank, world
        self.transform = image_transform(config, train=True)
        self.max_tokens = _max_tokens(config)
        self.id_index = {i: n for n, i in enumerate(dict.fromkeys(p.image_id for p in self.pairs))}
        self.per_epoch = math.ceil(len(self.pairs) / (self.batch_size * world))
        self._order: tuple[int, list[int]] | None = None

    def order(self, epoch: int) -> list[int]:
        if self._order is None or self._order[0] != epoch:
            order = list(range(len(self.pairs)))
            random.Random(f"{self.seed}/{epoch}").shuffle(order)
            self._order = (epoch, order)
        return self._order[1]

    def positions(self, number: int) -> tuple[int, list[int]]:
        """(epoch, this rank's positions in the epoch's order) of global batch ``number``; positions
        past the epoch's end stand for the epoch's first ones."""
        epoch, b = divmod(int(number), self.per_epoch)
        start = b * self.batch_size * self.world
        share = math.ceil(min(self.batch_size * self.world, len(self.pairs) - start) / self.world)
        first = start + self.rank * share
        return epoch, list(range(first, first + share))

    def __getitem__(self, number: int) -> dict:
        epoch, positions = self.positions(number)
        order = self.order(epoch)
        batch = [self.pairs[order[p % len(order)]] for p in positions]
        pixels = torch.stack([self.transform(pair.image.open(), augment_rng(self.seed, epoch, p))
                              for pair, p in zip(batch, positions)])
        enc = self.tok([p.caption for p in batch], padding="longest", truncation=True, max_length=self.max_tokens,
                       return_tensors="pt")
        return {"pixel_values": pixels, "input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                "image_ids": torch.tensor([self.id_index[p.image_id] for p in batch], dtype=torch.long)}

    def loader(self, start: int, num_workers: int = 0):
        return trainer.step_loader(self, start, num_workers)


def _max_tokens(config: dict) -> int:
    return int(config.get("data", {}).get("max_tokens", 40))


def finetune_config(config: dict, hp: dict) -> dict:
    """The checkpoint's config with the fine-tune's text length and resolution (what its run saves,
    so its evaluation reads the same)."""
    out = json.loads(json.dumps(config))
    if hp.get("max_tokens"):
        out.setdefault("data", {})["max_tokens"] = int(hp["max_tokens"])
    for key in ("image_size", "window_size"):
        if hp.get(key):
            out["model"]["vision"][key] = int(hp[key])
    return out


def finetune_groups(model, hp: dict) -> list[dict]:
    """AdamW groups as the authors' optim.py for a retrieval model (no parameter gets a larger lr):
    weight decay on matrices, none on biases, norms and the temperature (1-d tensors)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": params, "lr": hp["lr"], "base_lr": hp["lr"], "weight_decay": wd}
            for params, wd in ((decay, hp["weight_decay"]), (no_decay, 0.0)) if params]


def finetune_job(model, tokenizer, config: dict, pairs: Sequence[bm.TrainPair], hp: dict,
                 info: distributed.DistInfo, num_workers: int = 0) -> trainer.TrainJob:
    """The trainer's job for fine-tuning ``model`` on ``pairs`` with ``hp`` (FINETUNE_DEFAULTS' keys,
    and optionally FINETUNE_LOOP's): one AdamW group over every parameter, the lr schedule of
    pre-training (linear warm-up, linear decay to 0) over ``epochs``."""
    config = finetune_config(config, hp)
    # batch_size is global, as the authors' --bs: each rank takes its share (at least one pair).
    batches = PairBatches(pairs, config, tokenizer, max(1, int(hp["batch_size"]) // info.world), hp["seed"],
                          info.rank, info.world)
    total = batches.per_epoch * int(hp["epochs"])
    settings = {**FINETUNE_LOOP, **{k: hp[k] for k in FINETUNE_LOOP if k in hp}, "warmup": hp["warmup"]}
    settings["checkpoint_every"] = settings["checkpoint_every"] or batches.per_epoch
    settings["eval_every"] = batches.per_epoch
    opt = trainer.adamw(finetune_groups(model, hp), lr=hp["lr"], betas=tuple(settings["betas"]), eps=1e-8)
    run_config = {**config, "finetune": {**hp, "steps_per_epoch": batches.per_epoch, "total_steps": total,
                                         "pairs": len(batches.pairs)}}
    return trainer.TrainJob(model, FinetuneObjective(model, hp["temp_clamp"]), batches, opt, settings, total,
                            run_config, int(hp["seed"]), tokenizer, num_workers=num_workers)


class Selector:
    """Checkpoint selection: after each scored epoch (``start_eval``, ``eval_interval``), the
    in-training model's mean recall on ``bench`` (the validation split, or the test set for the
    authors' ``select: test``); the best (the first of equals) is saved to ``checkpoints/best/``.

    The scores live in ``checkpoints/best/selection.json`` by step; a resumed run drops the ones at or
    after the step it scores again, so a kill between a scoring and its checkpoint changes nothing.
    Called on rank 0 only, as the loop's ``evaluate(step)``."""

    def __init__(self, run_dir: str, job: trainer.TrainJob, hp: dict, bench: bm.Benchmark, langs: Sequence[str],
                 score_args: dict):
        self.dir, self.job, self.hp, self.bench, self.langs = (os.path.join(run_dir, "checkpoints", BEST), job, hp,
                                                               bench, list(langs))
        self.per_epoch = job.batches.per_epoch
        self.score_args = score_args  # evaluate_benchmark's k_test, itc_only, batch_size

    def due(self, step: int) -> bool:
        if step % self.per_epoch:
            return False
        epoch = step // self.per_epoch - 1
        return epoch >= self.hp["start_eval"] and (epoch + 1) % self.hp["eval_interval"] == 0

    def __call__(self, step: int) -> dict:
        if not self.due(step):
            return {}
        job = self.job
        results = evaluate_benchmark(job.model, job.tokenizer, image_transform(job.config, train=False), self.bench,
                                     self.langs, max_tokens=_max_tokens(job.config), **self.score_args)
        job.model.train()
        score = float(sum(r.mean_recall for r in results.values()) / len(results))
        history = [h for h in read_selection(self.dir).get("history", []) if h["step"] < step]
        history.append({"step": step, "epoch": step // self.per_epoch, "score": score})
        best = max(history, key=lambda h: h["score"])  # max keeps the first of equals
        selection = {"on": self.hp["select"], "langs": self.langs, "history": history, "best": best}
        if best["step"] == step:  # the new best: its weights and the scores swapped in together
            tmp = self.dir + f".tmp-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
            save_model(job.model, job.config, tmp)
            atomic.write_json(os.path.join(tmp, "selection.json"), selection)
            shutil.rmtree(self.dir, ignore_errors=True)
            os.replace(tmp, self.dir)
        else:
            atomic.write_json(os.path.join(self.dir, "selection.json"), selection)
        return {f"select_{self.hp['select']}_mean_recall": score}


def read_selection(best_dir: str) -> dict:
    path = os.path.join(best_dir, "selection.json")
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def selected_checkpoint(run_dir: str) -> tuple[str | None, dict]:
    """(the model a finished fine-tune stands for, its selection): ``checkpoints/best`` when one was
    scored, else the latest checkpoint."""
    best = os.path.join(run_dir, "checkpoints", BEST)
    selection = read_selection(best)
    if selection and os.path.exists(os.path.join(best, "model.safetensors")):
        return best, selection
    return latest_checkpoint(run_dir), {"on": "last"}


def last_epoch_means(rows: list[dict], per_epoch: int, keys=("loss", "itc", "itm")) -> dict:
    """The mean of ``keys`` over the steps of the last (possibly unfinished) epoch, from the logged
    rows (each the mean of the steps since the row before it)."""
    rows = [r for r in rows if "loss" in r]
    if not rows:
        return {}
    end = rows[-1]["step"]
    epoch_start = (end - 1) // per_epoch * per_epoch
    sums, steps, prev = dict.fromkeys(keys, 0.0), 0, 0
    for r in rows:
        n = r["step"] - max(prev, epoch_start)
        if n > 0:
            steps += n
            for k in keys:
                sums[k] += r[k] * n
        prev = r["step"]
    return {k: v / steps for k, v in sums.items()}


def train_pairs(model, tokenizer, config: dict, pairs: Sequence[bm.TrainPair], run_dir: str, hp: dict,
                info: distributed.DistInfo | None = None, max_steps: int | None = None,
                progress: trainer.StepProgress | None = None, num_workers: int = 0,
                select: tuple[bm.Benchmark, Sequence[str], dict] | None = None) -> dict:
    """Fine-tune ``model`` (on ``info.device``) on ``pairs`` through the trainer's loop, resuming from
    the run's latest checkpoint; returns a summary. ``max_steps`` stops early (tests: a cut run).
    ``select``: (benchmark, languages, evaluate_benchmark's scoring keywords) of the checkpoint
    selection (:class:`Selector`); None keeps the last epoch."""
    if not pairs:
        raise CCRKError("no training pairs to fine-tune on")
    info = info or distributed.DistInfo(device=next(model.parameters()).device)
    torch.manual_seed(int(hp["seed"]))  # dropout and drop-path, identical on every rank
    job = finetune_job(model, tokenizer, config, pairs, hp, info, num_workers)
    if select is not None and info.is_main:
        job.evaluate = Selector(run_dir, job, hp, *select)
    result = trainer.run_loop(job, run_dir, info, resume=True, max_steps=max_steps, progress=progress)
    model.eval()
    per_epoch = job.batches.per_epoch
    selected, selection = selected_checkpoint(run_dir)
    summary = {"run_dir": run_dir, "checkpoint": latest_checkpoint(run_dir), "selected": selected,
               "selection": selection, "epochs": result.step // per_epoch,
               "epoch": result.step / per_epoch, "step": result.step, "total_steps": job.total_steps,
               "resumed_from": result.resumed_from, "pairs": len(job.batches.pairs), "world": info.world,
               **last_epoch_means(result.rows, per_epoch), "temp": float(model.temp.detach())}
    if info.is_main and result.rows:
        summary["loss_curve"] = trainer.plot_losses(result.rows, os.path.join(run_dir, "loss_curve.png"),
                                                    f"fine-tune ({len(job.batches.pairs)} pairs)")
    distributed.barrier()
    return summary


def _checkpoint_config(ckpt_path: str) -> dict:
    """The training config saved next to the checkpoint's weights (read before loading the model)."""
    with open(os.path.join(os.path.dirname(_weights_file(ckpt_path)), "config.json"), encoding="utf-8") as f:
        return json.load(f)


def _max_words(config: dict, benchmark: str) -> int | None:
    """The benchmark's pre_caption word limit when the checkpoint was trained on normalised captions, else None."""
    return bm.default_max_words(benchmark) if uses_pre_caption(config) else None


# --------------------------------------------------------------------------- protocol plumbing


@dataclass
class FinetunePlan:
    mode: str
    benchmark: str
    train_lang: str
    shots: int | None
    train_files: list[str]
    eval_langs: list[str] | None


def plan_finetune(mode: str, benchmark: str, data_dir: str, lang: str | None = None, shots: int | None = None,
                  langs: Sequence[str] | None = None) -> FinetunePlan:
    if mode not in MODES:
        raise CCRKError(f"unknown fine-tuning mode {mode!r}; choose one of {', '.join(MODES)}")
    if mode == "zero-shot":
        return FinetunePlan(mode, benchmark, "en", None, loaders.training_sources(benchmark, data_dir, "en"),
                            list(langs) if langs else None)
    if not lang:
        raise CCRKError(f"--lang is required for {mode} fine-tuning")
    if mode == "few-shot":
        if shots is None:
            raise CCRKError("--shots is required for few-shot fine-tuning")
        return FinetunePlan(mode, benchmark, lang, shots, loaders.training_sources(benchmark, data_dir, lang, shots),
                            list(langs) if langs else [lang])
    return FinetunePlan(mode, benchmark, lang, None, loaders.training_sources(benchmark, data_dir, lang),
                        list(langs) if langs else [lang])


def _weights_file(ckpt_path: str) -> str:
    """The safetensors file a run or checkpoint directory stands for (a run: its latest step)."""
    direct = os.path.join(ckpt_path, "model.safetensors")
    if os.path.exists(direct):
        return direct
    latest = latest_checkpoint(ckpt_path)
    if latest is None:
        raise CCRKError(f"{ckpt_path} has no checkpoint (expected checkpoints/step-*/model.safetensors)")
    return os.path.join(latest, "model.safetensors")


def _resolve_checkpoint(checkpoint: str, root: str | None) -> str:
    """A run id / catalog version / directory -> a path ``load_pretrained`` accepts."""
    if os.path.exists(checkpoint):
        return checkpoint
    r = layout.data_root(root)
    # A run id or version is a plain name; anything else (a path that is not there) is none, and is
    # never joined under runs/ (so ``../x`` names nothing outside the root either).
    if layout.is_plain_name(checkpoint):
        candidate = layout.run_dir(r, checkpoint)
        if os.path.exists(candidate):
            return candidate
        art = Catalog(r).find(checkpoint)
        if art is not None and art.kind == "run":
            return art.path
    raise CCRKError(f"checkpoint {checkpoint!r} is neither a directory, a run under {r}/runs nor a run version")


def finetune_hparams(benchmark: str, mode: str = "zero-shot", preset: str = "paper",
                     settings: dict | None = None) -> dict:
    """The preset's settings for ``benchmark`` and ``mode`` with ``settings`` (FINETUNE_KEYS, seed; None
    = the preset's) over them: :meth:`ccrk.specs.FinetuneSpec.hyperparameters`."""
    given = {k: v for k, v in (settings or {}).items() if v is not None}
    return FinetuneSpec.parse({"benchmark": benchmark, "mode": mode, "preset": preset, **given},
                              where="fine-tuning settings").hyperparameters()


def _sources_sha256(paths: Sequence[str]) -> str:
    """The sha256 of one training file, or of the list of several files' sha256s."""
    if len(paths) == 1:
        return file_sha256(paths[0])
    return hashlib.sha256("\n".join(file_sha256(p) for p in paths).encode()).hexdigest()


def _finetune_params(root: str, plan: FinetunePlan, skip_missing: bool, ckpt_path: str, hp: dict,
                     max_words: int | None, scoring: dict) -> tuple[dict, str | None]:
    """(the run's parameters, its parent run's version): what the fine-tune's run id hashes."""
    parent = reports.find_run_version(root, ckpt_path)
    params = {"protocol": plan.mode, "benchmark": plan.benchmark, "train_lang": plan.train_lang, "shots": plan.shots,
              "train_file_sha256": _sources_sha256(plan.train_files), "skip_missing": skip_missing,
              "start": parent or layout.rooted(root, ckpt_path),
              **{k: hp[k] for k in FINETUNE_KEYS + ("seed", "temp_clamp")},
              # Augmentations and hard negatives drawn per (seed, step), as the trainer's loop does.
              "draws": "per-step"}
    if hp["select"] != "last":
        params["select_scoring"] = scoring
    if max_words is not None:  # only when on, so runs without normalisation keep their ids
        params["max_words"] = max_words
    return params, parent


def selection_benchmark(benchmark: str, data_dir: str, plan: FinetunePlan, select: str, images, coco_images,
                        skip_missing: bool, max_words: int | None) -> tuple[bm.Benchmark, list[str]] | None:
    """(benchmark, languages) a fine-tune's checkpoint is selected on: the training language's
    validation split (``val``), or the test sets of the languages it is evaluated on (``test``, as the
    authors' scripts; COCO's zero-shot: English alone, as Retrieval.py); None for ``last``."""
    if select == "last":
        return None
    if select == "val":
        langs = [plan.train_lang]
    elif benchmark == "coco" and plan.mode == "zero-shot":
        langs = ["en"]
    else:
        langs = list(plan.eval_langs) if plan.eval_langs else None
    bench = loaders.load_benchmark(benchmark, data_dir, langs, images, coco_images, skip_missing, max_words,
                                   split="val" if select == "val" else "test")
    return bench, list(bench.langs)


class FinetuneStage:
    """A fine-tune through storage.stage's contract: plan = the run's id, directory, params and parent;
    completed = its finished run (the latest checkpoint at the schedule's last step); execute = train
    through the trainer's loop (resuming a cut run). ``options``: :func:`run_finetune`'s keywords."""

    def __init__(self, root: str | None, checkpoint: str, benchmark: str, data_dir: str, **options):
        self.root, self.checkpoint, self.benchmark, self.data_dir = layout.data_root(root), checkpoint, benchmark, \
            data_dir
        self.o = {**FINETUNE_OPTIONS, **options}

    def plan(self) -> StagePlan:
        o = self.o
        self.protocol = plan_finetune(o["mode"], self.benchmark, self.data_dir, o["lang"], o["shots"], o["langs"])
        self.ckpt_path = _resolve_checkpoint(self.checkpoint, self.root)
        self.clean = bm.CaptionCleaner(_max_words(_checkpoint_config(self.ckpt_path), self.benchmark))
        self.pairs, self.skipped = loaders.training_pairs(self.benchmark, self.data_dir, self.protocol.train_lang,
                                                          self.protocol.shots, o["images"], o["coco_images"],
                                                          o["skip_missing"], self.clean)
        settings = {**(o["settings"] or {}), **{k: o[k] for k in ("epochs", "batch_size", "lr", "seed")
                                                 if o[k] is not None}}
        self.hp = finetune_hparams(self.benchmark, o["mode"], o["preset"], settings)
        self.scoring = {"k_test": o["k_test"] or bm.default_k_test(self.benchmark), "itc_only": bool(o["itc_only"]),
                        "batch_size": EvaluateSpec().batch_size}
        self.select = selection_benchmark(self.benchmark, self.data_dir, self.protocol, self.hp["select"],
                                          o["images"], o["coco_images"], o["skip_missing"], self.clean.max_words)
        params, parent = _finetune_params(self.root, self.protocol, o["skip_missing"], self.ckpt_path, self.hp,
                                          self.clean.max_words, {k: self.scoring[k] for k in ("k_test", "itc_only")})
        parents = [parent] if parent else []
        run_id = content_version("run", parents, params)
        self.info = distributed.init(o["device"])  # every rank: the process group, for the barriers
        return StagePlan("run", f"finetune-{self.benchmark}-{o['mode']}", run_id, layout.run_dir(self.root, run_id),
                         params, parents)

    def _outcome(self, plan: StagePlan, summary: dict, seconds: float) -> Outcome:
        summary.update(run_id=plan.version, skipped_images=self.skipped, rejected_captions=self.clean.rejected,
                       seconds=round(seconds, 1), params=plan.params, eval_langs=self.protocol.eval_langs)
        stats = {k: summary.get(k) for k in ("loss", "itc", "itm", "epochs", "pairs")}
        stats["selected_epoch"] = summary["selection"].get("best", {}).get("epoch")
        return Outcome(summary, stats)

    def completed(self, plan: StagePlan) -> Outcome | None:
        summary = finished_finetune(plan.path, self.info.is_main)
        return None if summary is None else self._outcome(plan, summary, 0.0)

    def execute(self, plan: StagePlan) -> Outcome:
        o, hp = self.o, self.hp
        vision = {k: hp[k] for k in ("image_size", "window_size") if hp.get(k)}
        model, tokenizer, config = load_pretrained(self.ckpt_path, device=self.info.device, vision=vision or None)
        t0 = time.time()
        select = None if self.select is None else (*self.select, self.scoring)
        summary = train_pairs(model, tokenizer, config, self.pairs, plan.path, hp, self.info, o["max_steps"],
                              o["progress"], o["num_workers"], select)
        return self._outcome(plan, summary, time.time() - t0)

    def publish(self, plan: StagePlan, summary: dict) -> None:
        """Nothing beyond the run directory (its loss curve) and the catalog entry."""


def finished_finetune(run_dir: str, main: bool = True) -> dict | None:
    """:func:`train_pairs`' summary of a fine-tune run whose latest checkpoint is at the schedule's last
    step, read from its files (no model is loaded); None when it is absent or cut. ``main``: rank 0
    (the only one whose summary has the loss means, as in training)."""
    ckpt = latest_checkpoint(run_dir) if os.path.isdir(run_dir) else None
    if ckpt is None:
        return None
    with open(os.path.join(ckpt, "trainer_state.json"), encoding="utf-8") as f:
        state = json.load(f)
    ft = _checkpoint_config(ckpt).get("finetune", {})
    per_epoch, total = ft.get("steps_per_epoch"), ft.get("total_steps")
    if not per_epoch or state["step"] < total:
        return None
    rows = []
    if main and os.path.exists(os.path.join(run_dir, "metrics.jsonl")):
        with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
    weights = os.path.join(ckpt, "model.safetensors")
    with readable_weights(weights), safe_open(weights, framework="pt") as f:
        temp = float(f.get_tensor("temp"))
    selected, selection = selected_checkpoint(run_dir)
    summary = {"run_dir": run_dir, "checkpoint": ckpt, "selected": selected, "selection": selection,
               "epochs": state["step"] // per_epoch,
               "epoch": state["step"] / per_epoch, "step": state["step"], "total_steps": total, "resumed_from": ckpt,
               "pairs": ft["pairs"], "world": state["world"], **last_epoch_means(rows, per_epoch), "temp": temp}
    if rows and os.path.exists(os.path.join(run_dir, "loss_curve.png")):
        summary["loss_curve"] = os.path.join(run_dir, "loss_curve.png")
    return summary


# run_finetune's keywords besides root, checkpoint, benchmark and data_dir, with their defaults
# (settings: FinetuneSpec's FINETUNE_KEYS given, None = the preset's; k_test, itc_only: the selection's scoring).
FINETUNE_OPTIONS = dict(mode="zero-shot", lang=None, shots=None, langs=None, epochs=None, batch_size=None, lr=None,
                        seed=None, preset="paper", settings=None, k_test=None, itc_only=False, images=None,
                        coco_images=None, skip_missing=False, device="cpu", progress=None, num_workers=0,
                        max_steps=None)


def run_finetune(root: str | None, checkpoint: str, benchmark: str, data_dir: str, **options) -> dict:
    """Fine-tune a pre-trained (or English fine-tuned) checkpoint, resuming its run if one was cut, through
    :class:`FinetuneStage` and storage.stage.run_stage (under torchrun every rank calls this; rank 0 records
    the run in the catalog). ``options``: FINETUNE_OPTIONS' keys."""
    unknown = sorted(set(options) - set(FINETUNE_OPTIONS))
    if unknown:
        raise TypeError(f"run_finetune: unknown option(s) {', '.join(unknown)}")
    stage = FinetuneStage(root, checkpoint, benchmark, data_dir, **options)
    summary = run_stage(stage, stage.root)
    distributed.barrier()  # no rank touches the run or the catalog again before rank 0 has recorded it
    return summary


@dataclass
class EvaluationSetup:
    """What an evaluation is of: the checkpoint's path, the loaded benchmark and the report's params."""
    ckpt_path: str
    bench: bm.Benchmark
    params: dict
    mrv_langs: Sequence[str] | None


def evaluation_setup(root: str | None, checkpoint: str, benchmark: str, data_dir: str, langs=None, mrv_langs=None,
                     k_test: int | None = None, itc_only: bool = False, images: str | None = None,
                     coco_images: str | None = None, skip_missing: bool = False) -> EvaluationSetup:
    """The checkpoint, benchmark and report params of an evaluation (what its report id hashes)."""
    ckpt_path = _resolve_checkpoint(checkpoint, root)
    max_words = _max_words(_checkpoint_config(ckpt_path), benchmark)
    bench = loaders.load_benchmark(benchmark, data_dir, langs, images, coco_images, skip_missing, max_words)
    k_test = k_test or bm.default_k_test(benchmark)
    eval_langs = list(bench.langs)
    params = {"benchmark": benchmark, "langs": eval_langs,
              "mrv_langs": [lang for lang in (mrv_langs or reports.default_mrv_langs(benchmark, eval_langs))
                            if lang in eval_langs], "k_test": k_test,
              "itc_only": itc_only, "checkpoint_sha256": file_sha256(_weights_file(ckpt_path)),
              "data": layout.rooted(layout.data_root(root), data_dir), "skip_missing": skip_missing}
    if max_words is not None:  # only when on, so reports without normalisation keep their ids
        params["max_words"] = max_words
    return EvaluationSetup(os.path.abspath(ckpt_path), bench, params, mrv_langs)


def score_checkpoint(setup: EvaluationSetup, batch_size: int = 64, device: str = "cpu",
                     progress: Callable[[str], None] | None = None) -> tuple[dict, dict]:
    """(the metrics, the per-language results) of the checkpoint on the benchmark."""
    p, bench = setup.params, setup.bench
    model, tokenizer, config = load_pretrained(setup.ckpt_path, device=device)
    t0 = time.time()
    results = evaluate_benchmark(model, tokenizer, image_transform(config, train=False), bench, k_test=p["k_test"],
                                 itc_only=p["itc_only"], max_tokens=_max_tokens(config), batch_size=batch_size,
                                 progress=progress)
    m = reports.build_metrics(results, p["benchmark"], setup.mrv_langs, p["k_test"], p["itc_only"], setup.ckpt_path,
                              extra={"skipped_images": bench.skipped_images, "rejected_captions": bench.rejected_texts,
                                     "seconds": round(time.time() - t0, 1)})
    return m, results
