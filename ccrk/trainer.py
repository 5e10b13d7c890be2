"""The training loop, and pre-training through it: AdamW with warm-up + linear decay, DDP, bf16, exact resume.

:func:`run_loop` trains a :class:`TrainJob` -- a model, an objective (``objective(batch, seed)`` ->
``{"loss": ..., parts}``), a :class:`BatchSource` (this rank's batch of a global step, a pure
function of the step) and its schedule -- into a run directory. Pre-training (:func:`train`, the
K-lingual shards and the CCRk / CL2CM objectives) and retrieval fine-tuning
(``ccrk.evaluation.protocols``, image-text pairs and the ITC + ITM loss) are two such jobs.

A run directory holds ``config.json``, ``tokenizer/``, ``checkpoints/step-XXXXXXX/`` (model
safetensors + run config + optimizer safetensors + ``trainer_state.json`` + per-rank RNG
safetensors; no pickle), ``metrics.jsonl`` and ``loss_curve.png``. Exact resume restores model,
optimiser, learning-rate step, RNG and the data position (the step).

Progress goes to a ``progress(step, total, row)`` callable the caller supplies (the CLI draws a
bar), else to the ``ccrk.trainer`` logger.
"""
from __future__ import annotations

import copy
import itertools
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Protocol

import torch
from safetensors.torch import load_file, load_model, save_file
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from ccrk import distributed
from ccrk.data import BatchStream, ImageTransform, heldout_slice
from ccrk.model import build_model, latest_checkpoint, readable_weights, save_model
from ccrk.objectives import build_objective
from ccrk.specs import TrainSpec, read_run_config
from storage import atomic
from storage.catalog import Catalog
from storage.versioning import content_version

log = logging.getLogger("ccrk.trainer")

# The train section's defaults: ccrk.specs.TrainSpec's, as a dict.
TRAIN_DEFAULTS = TrainSpec().to_config()


# ---------------------------------------------------------------------- configuration and identity


def load_config(path: str, overrides: dict | None = None, where: str | None = None) -> dict:
    """A run config YAML (with ``overrides`` deep-merged over it), checked against
    :class:`ccrk.specs.PretrainSpec` (:func:`ccrk.specs.read_run_config`) and normalised
    (:func:`normalise_config`)."""
    return normalise_config(read_run_config(path, overrides, where)[0])


def normalise_config(config: dict) -> dict:
    """The train section's unset keys from :class:`ccrk.specs.TrainSpec` (a checkpoint's saved config,
    which adds its own keys such as ``total_steps``, goes through here too)."""
    config = copy.deepcopy(config)
    config["train"] = {**TRAIN_DEFAULTS, **config["train"]}
    config.setdefault("objective", "ccrk")
    config.setdefault("seed", 0)
    config.setdefault("name", "run")
    return config


def dataset_version(dataset_dir: str, root: str | None = None) -> tuple[str, bool]:
    """(version, in_catalog): the dataset's catalog version (its directory name under
    datasets/<name>/), else a hash of its shard names and sizes."""
    dataset_dir = os.path.abspath(dataset_dir)
    candidate = os.path.basename(dataset_dir.rstrip("/"))
    try:
        cat = Catalog(root)
        art = cat.get(candidate)
        if art is None:
            art = next((a for a in cat.list("dataset") if os.path.abspath(a.path) == dataset_dir), None)
        if art is not None:
            return art.version, True
    except Exception:  # no readable catalog: fall back to the shard contents
        pass
    shard_dir = os.path.join(dataset_dir, "shards")
    shards = sorted((f, os.path.getsize(os.path.join(shard_dir, f))) for f in os.listdir(shard_dir)) \
        if os.path.isdir(shard_dir) else []
    return content_version("dataset", params={"shards": shards}), False


def run_id(config: dict, dataset_ver: str) -> str:
    return content_version("run", [dataset_ver], {"config": config, "seed": config["seed"]})


# ---------------------------------------------------------------------- optimisation


def param_groups(model, cfg: dict) -> list[dict]:
    """AdamW groups: (pretrained | new: lr x lr_new_mult) x (decay | no decay: biases, norms, temp)."""
    pretrained = model.pretrained_parameter_names()
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        new = name not in pretrained
        decay = p.ndim >= 2 and "embeddings" not in name
        groups.setdefault((new, decay), []).append(p)
    out = []
    for (new, decay), params in sorted(groups.items()):
        mult = cfg["lr_new_mult"] if new else 1.0
        out.append({"params": params, "weight_decay": cfg["weight_decay"] if decay else 0.0,
                    "lr": cfg["lr"] * mult, "base_lr": cfg["lr"] * mult})
    return out


def adamw(params, **kwargs) -> torch.optim.AdamW:
    """AdamW with torch's fused kernel where it has one for these parameters (CPU and CUDA floats):
    one kernel for every tensor instead of one per tensor -- on this CPU the CPU-scaled model's
    step took 4.6 ms against 27.6 ms (18 ms for foreach). Elsewhere, torch's default."""
    params = list(params)
    try:
        return torch.optim.AdamW(params, fused=True, **kwargs)
    except (RuntimeError, ValueError, TypeError):
        return torch.optim.AdamW(params, **kwargs)


def make_optimizer(model, tcfg: dict) -> torch.optim.AdamW:
    """The pre-training optimizer: :func:`param_groups` and the config's lr and betas."""
    return adamw(param_groups(model, tcfg), lr=tcfg["lr"], betas=tuple(tcfg["betas"]), eps=1e-8)


def lr_factor(step: int, total: int, warmup: float) -> float:
    """Linear warm-up over ``warmup`` (fraction) of the steps, then linear decay to 0."""
    n_warm = max(1, math.ceil(warmup * total))
    if step < n_warm:
        return (step + 1) / n_warm
    return max(0.0, (total - step) / max(1, total - n_warm))


# ---------------------------------------------------------------------- checkpoints


def _optimizer_tensors(opt) -> tuple[dict, dict]:
    state = opt.state_dict()
    tensors = {f"{idx}.{k}": v.detach().cpu().contiguous() for idx, st in state["state"].items()
               for k, v in st.items() if torch.is_tensor(v)}
    meta = {"param_groups": state["param_groups"],
            "scalars": {f"{idx}.{k}": v for idx, st in state["state"].items() for k, v in st.items()
                        if not torch.is_tensor(v)}}
    return tensors, meta


def _restore_optimizer(opt, tensors: dict, meta: dict) -> None:
    state: dict[int, dict] = {}
    for key, v in list(tensors.items()) + list(meta["scalars"].items()):
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(run_dir: str, step: int, model, opt, config: dict, position, info: distributed.DistInfo,
                    keep: int) -> str:
    """Write checkpoints/step-XXXXXXX atomically (a temp dir renamed at the end)."""
    root = os.path.join(run_dir, "checkpoints")
    final = os.path.join(root, f"step-{step:07d}")
    tmp = os.path.join(root, f".tmp-step-{step:07d}")
    if info.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    distributed.barrier()
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    save_file(rng, os.path.join(tmp, f"rng-rank{info.rank}.safetensors"))
    if info.is_main:
        save_model(model, config, tmp)
        tensors, meta = _optimizer_tensors(opt)
        save_file(tensors, os.path.join(tmp, "optimizer.safetensors"))
        atomic.write_json(os.path.join(tmp, "trainer_state.json"),
                          {"step": step, "position": position, "world": info.world, "optimizer": meta})
    distributed.barrier()
    if info.is_main:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        steps = sorted(d for d in os.listdir(root) if d.startswith("step-"))
        for old in steps[:-keep]:
            shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    distributed.barrier()
    return final


def load_checkpoint(ckpt: str, model, opt, info: distributed.DistInfo) -> dict:
    weights, optimizer = os.path.join(ckpt, "model.safetensors"), os.path.join(ckpt, "optimizer.safetensors")
    with readable_weights(weights):
        load_model(model, weights, device=str(info.device))
    with open(os.path.join(ckpt, "trainer_state.json"), encoding="utf-8") as f:
        state = json.load(f)
    with readable_weights(optimizer):
        moments = load_file(optimizer, device=str(info.device))
    _restore_optimizer(opt, moments, state["optimizer"])
    rng_path = os.path.join(ckpt, f"rng-rank{info.rank}.safetensors")
    if os.path.exists(rng_path) and state.get("world") == info.world:
        with readable_weights(rng_path):
            rng = load_file(rng_path)
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return state


# ---------------------------------------------------------------------- metrics


class MetricsLog:
    """``metrics.jsonl``: one JSON object per logged step (rank 0 writes)."""

    def __init__(self, path: str, resume_step: int | None):
        self.path = path
        if resume_step is not None and os.path.exists(path):
            keep = []
            with open(path, encoding="utf-8") as f:
                for line in f:
                    try:
                        row = json.loads(line)
                    except ValueError:
                        continue  # a line cut by a kill
                    if row.get("step", 0) <= resume_step:
                        keep.append(line if line.endswith("\n") else line + "\n")
            atomic.write_text(path, "".join(keep))
        elif resume_step is None and os.path.exists(path):
            os.unlink(path)

    def write(self, row: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row, sort_keys=True) + "\n")

    def rows(self) -> list[dict]:
        if not os.path.exists(self.path):
            return []
        with open(self.path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]


def plot_losses(rows: list[dict], out_png: str, title: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    train = [r for r in rows if "loss" in r]
    for key in ("loss", "itc", "itm", "mlm"):
        pts = [(r["step"], r[key]) for r in train if key in r]
        if pts:
            ax.plot(*zip(*pts), label=key)
    ax.set_xlabel("step"), ax.set_ylabel("loss"), ax.legend(), ax.set_title(title)
    evals = [r for r in rows if "r1_i2t" in r]
    for key in ("r1_i2t", "r1_t2i"):
        if evals:
            ax2.plot([r["step"] for r in evals], [r[key] for r in evals], marker="o", label=key)
    if evals:
        ax2.axhline(evals[-1]["chance"], color="gray", linestyle="--", label="chance")
        ax2.legend()
    ax2.set_xlabel("step"), ax2.set_ylabel("held-out R@1"), ax2.set_ylim(0, 1)
    fig.tight_layout()
    with atomic.atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
    return out_png


@torch.no_grad()
def retrieval_r1(model, heldout, config: dict, tokenizer, device) -> dict:
    """R@1 image->text (any of the image's captions, every language) and text->image on the held-out slice."""
    was_training = model.training
    model.eval()
    transform = ImageTransform(config, train=False)
    langs = list(config["langs"])
    images = torch.stack([transform(img) for img, _ in heldout]).to(device)
    texts, owner = [], []
    for i, (_, captions) in enumerate(heldout):
        first = next(c for c in captions if any(c.get(lang) for lang in langs))
        for lang in langs:
            if first.get(lang):
                texts.append(first[lang])
                owner.append(i)
    enc = tokenizer(texts, padding="longest", truncation=True,
                    max_length=int(config.get("data", {}).get("max_tokens", 40)), return_tensors="pt").to(device)
    _, image_feat = model.encode_image(images)
    _, text_feat = model.encode_text(enc["input_ids"], enc["attention_mask"])
    sim = image_feat @ text_feat.t()
    owner_t = torch.tensor(owner, device=device)
    r1_i2t = (owner_t[sim.argmax(dim=1)] == torch.arange(len(heldout), device=device)).float().mean().item()
    r1_t2i = (sim.argmax(dim=0) == owner_t).float().mean().item()
    model.train(was_training)
    return {"r1_i2t": r1_i2t, "r1_t2i": r1_t2i, "chance": 1.0 / len(heldout), "heldout": len(heldout)}


# ---------------------------------------------------------------------- the loop

StepProgress = Callable[[int, int, "dict | None"], None]
"""``progress(step, total, row)``: at the start (the resumed step) and after every step; ``row`` is
the metrics row when that step logged one (loss, samples/s, ...), else None. Called on rank 0 only.
(Not ``storage.progress.Progress``, which counts items: a training run reports its losses too.)"""


class BatchSource(Protocol):
    """This rank's batches by global step: batch ``s`` is a pure function of (seed, ``s``), so the
    data position of a run is its step."""

    per_epoch: int  # global steps per epoch

    def loader(self, start: int, num_workers: int = 0) -> Iterable[dict]:
        """Batches ``start, start + 1, ...`` (endless): dicts of tensors, ``pixel_values`` [B, ...] among them."""


@dataclass
class TrainJob:
    """What :func:`run_loop` trains: a model, its loss, its batches and its schedule.

    ``objective(batch, seed)`` returns ``{"loss": ..., parts}``; it has ``uses_all_parameters`` (DDP)
    and may have ``after_step()`` (run after every optimiser step). ``settings`` holds the schedule
    keys of ``TRAIN_DEFAULTS`` (warmup, clip, bf16, log_every, checkpoint_every, keep_checkpoints,
    eval_every); every optimiser group has a ``base_lr``.
    """

    model: nn.Module
    objective: nn.Module
    batches: BatchSource
    optimizer: torch.optim.Optimizer
    settings: dict
    total_steps: int
    config: dict  # written to config.json and with every checkpoint
    seed: int
    tokenizer: Any = None
    # evaluate(step): metrics every eval_every steps and at the last (rank 0; {} = nothing to log)
    evaluate: Callable[[int], dict] | None = None
    num_workers: int = 0


@dataclass
class LoopResult:
    step: int
    resumed_from: str | None
    rows: list[dict] = field(default_factory=list)  # metrics.jsonl (rank 0; empty elsewhere)
    last_eval: dict = field(default_factory=dict)


def step_loader(dataset: torch.utils.data.Dataset, start: int, num_workers: int = 0):
    """A map-style dataset's items ``start, start+1, ...`` (endless), built in ``num_workers`` processes, in order."""
    return torch.utils.data.DataLoader(dataset, batch_size=None, sampler=itertools.count(start),
                                       num_workers=num_workers, persistent_workers=num_workers > 0,
                                       prefetch_factor=4 if num_workers else None)


def log_progress(step: int, total: int, row: dict | None) -> None:
    """The progress of a run without a caller's: each logged row as a line of the ``ccrk.trainer`` logger."""
    if row is not None:
        log.info("step %d/%d loss %.4f (%.1f samples/s)", step, total, row["loss"], row["samples_per_s"])


def _step_seed(seed: int, step: int, rank: int) -> int:
    return ((seed * 1_000_003 + step) * 1009 + rank) % (2 ** 62)


class _Window:
    """The steps since the last logged row: their values' mean and the samples per second."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.values: list[dict] = []
        self.samples, self.t0 = 0, time.perf_counter()

    def add(self, values: dict, samples: int) -> None:
        self.values.append(values)
        self.samples += samples

    def row(self, step: int, job: TrainJob, info: distributed.DistInfo) -> dict:
        """The window's metrics row, averaged over ranks (a collective: every rank calls it)."""
        elapsed = time.perf_counter() - self.t0
        row = {k: sum(w[k] for w in self.values) / len(self.values) for k in self.values[0]}
        row = distributed.mean_across(row, info.device)
        row.update(step=step, epoch=step / job.batches.per_epoch, lr=job.optimizer.param_groups[0]["lr"],
                   temp=float(job.model.temp.detach()),
                   samples_per_s=self.samples * info.world / max(elapsed, 1e-9))
        self.reset()
        return row


def _open_run(job: TrainJob, run_dir: str, info: distributed.DistInfo, resume: bool):
    """(step, resumed_from, metrics log): the latest checkpoint loaded when ``resume``; config and tokenizer written."""
    step, resumed_from = 0, None
    ckpt = latest_checkpoint(run_dir) if resume else None
    if ckpt:
        state = load_checkpoint(ckpt, job.model, job.optimizer, info)
        step, resumed_from = state["step"], ckpt
    if info.is_main:
        os.makedirs(run_dir, exist_ok=True)
        atomic.write_json(os.path.join(run_dir, "config.json"), job.config)
        if hasattr(job.tokenizer, "save_pretrained"):
            job.tokenizer.save_pretrained(os.path.join(run_dir, "tokenizer"))
    metrics = MetricsLog(os.path.join(run_dir, "metrics.jsonl"), step if resume else None) if info.is_main else None
    distributed.barrier()
    return step, resumed_from, metrics


def _parallel(objective: nn.Module, info: distributed.DistInfo) -> nn.Module:
    if info.world == 1:
        return objective
    return DDP(objective, device_ids=[info.local_rank] if info.device.type == "cuda" else None,
               find_unused_parameters=not objective.uses_all_parameters)


def _train_step(job: TrainJob, net: nn.Module, batch: dict, step: int, info: distributed.DistInfo,
                use_bf16: bool) -> tuple[dict, int]:
    """One optimiser step at ``step``; (the step's loss values and gradient norm, this rank's batch size)."""
    batch = {k: v.to(info.device, non_blocking=True) for k, v in batch.items()}
    opt = job.optimizer
    for g in opt.param_groups:
        g["lr"] = g["base_lr"] * lr_factor(step, job.total_steps, job.settings["warmup"])
    with torch.autocast(device_type=info.device.type, dtype=torch.bfloat16, enabled=use_bf16):
        out = net(batch, _step_seed(job.seed, step, info.rank))
    opt.zero_grad(set_to_none=True)
    out["loss"].backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(job.model.parameters(), job.settings["clip"])
    opt.step()
    after_step = getattr(job.objective, "after_step", None)
    if after_step is not None:
        after_step()
    values = {k: float(v.detach()) for k, v in out.items()} | {"grad_norm": float(grad_norm)}
    return values, int(batch["pixel_values"].shape[0])


def run_loop(job: TrainJob, run_dir: str, info: distributed.DistInfo, resume: bool = False,
             max_steps: int | None = None, progress: StepProgress | None = None) -> LoopResult:
    """Train ``job`` into ``run_dir`` (from its latest checkpoint when ``resume``) up to its last step.

    ``max_steps`` stops early (the schedule still spans ``job.total_steps``): a cut run that a
    resumed one continues. A row is logged every ``log_every`` steps and at every checkpoint, so
    what a run resumed from a checkpoint logs is what an uninterrupted run logs after it.
    """
    s, total = job.settings, job.total_steps
    step, resumed_from, metrics = _open_run(job, run_dir, info, resume)
    net = _parallel(job.objective, info)
    use_bf16 = bool(s["bf16"]) and info.device.type == "cuda"
    stop = min(total, max_steps) if max_steps else total
    report = progress or log_progress
    window, last_eval = _Window(), {}
    job.model.train()
    if info.is_main:
        report(step, total, None)
    # torch's DataLoader draws a seed from the global generator as its iterator starts: kept out of
    # the run's random stream, or a resumed run would be one draw ahead of an uninterrupted one
    # from its checkpoint on (dropout and drop path on the CPU would then differ).
    rng = torch.get_rng_state()
    batches = iter(job.batches.loader(step, job.num_workers))
    torch.set_rng_state(rng)
    while step < stop:
        values, samples = _train_step(job, net, next(batches), step, info, use_bf16)
        step += 1
        window.add(values, samples)
        checkpoint = step % s["checkpoint_every"] == 0 or step == stop
        row = window.row(step, job, info) if step % s["log_every"] == 0 or checkpoint else None
        if info.is_main:
            if row is not None:
                metrics.write(row)
            report(step, total, row)
            if job.evaluate is not None and (step % s["eval_every"] == 0 or step == stop):
                scores = job.evaluate(step)
                if scores:
                    last_eval = scores
                    metrics.write({"step": step, **scores})
        if checkpoint:
            save_checkpoint(run_dir, step, job.model, job.optimizer, job.config, step, info, s["keep_checkpoints"])
    return LoopResult(step, resumed_from, metrics.rows() if info.is_main else [], last_eval)


# ---------------------------------------------------------------------- pre-training


def pretrain_job(config: dict, dataset_dir: str, info: distributed.DistInfo) -> TrainJob:
    """The pre-training job of a normalised config: the model, its objective, the shards' batch stream."""
    tcfg = config["train"]
    if tcfg.get("threads"):
        torch.set_num_threads(int(tcfg["threads"]))
    torch.manual_seed(config["seed"])  # identical initialisation on every rank
    model, tokenizer = build_model(config)
    model.to(info.device)
    objective = build_objective(model, config, tokenizer).to(info.device)
    opt = make_optimizer(model, tcfg)
    n_heldout = int(tcfg["heldout"] or 0)
    heldout = heldout_slice(dataset_dir, config, n_heldout) if n_heldout else []
    stream = BatchStream(dataset_dir, config, tokenizer, info.rank, info.world, heldout=n_heldout)
    total = int(tcfg["steps"]) if tcfg["steps"] else max(1, int(tcfg["epochs"] or 1) * stream.per_epoch)
    config["train"]["total_steps"] = total
    evaluate = (lambda step: retrieval_r1(model, heldout, config, tokenizer, info.device)) if heldout else None
    return TrainJob(model, objective, stream, opt, tcfg, total, config, config["seed"], tokenizer, evaluate,
                    int(config.get("data", {}).get("num_workers", 0)))


def _finish_pretrain(summary: dict, result: LoopResult, config: dict) -> None:
    """Rank 0's end of a pre-training run: losses in the summary, the loss curve, summary.json (the
    catalog entry is the caller's: ``flows.pretrain.PretrainStage`` through ``storage.stage.run_stage``)."""
    run_dir = summary["run_dir"]
    train_rows = [r for r in result.rows if "loss" in r]
    summary.update(first_loss=train_rows[0]["loss"] if train_rows else None,
                   final_loss=train_rows[-1]["loss"] if train_rows else None,
                   samples_per_s=train_rows[-1]["samples_per_s"] if train_rows else None, **result.last_eval)
    summary["loss_curve"] = plot_losses(result.rows, os.path.join(run_dir, "loss_curve.png"), config["name"])
    atomic.write_json(os.path.join(run_dir, "summary.json"), summary)


def pretrain(config: dict, dataset_dir: str, run_dir: str, resume: bool = False, root: str | None = None,
             max_steps: int | None = None, progress: StepProgress | None = None) -> tuple[dict, dict]:
    """(summary, the run's config): :func:`train`'s summary, and the normalised config with its
    ``train.total_steps`` (known once the job is built), as the run's catalog entry keeps it."""
    config = normalise_config(config)
    ds_ver, _ = dataset_version(dataset_dir, root)
    version = run_id(config, ds_ver)
    info = distributed.init(config.get("device", "auto"))
    threads = torch.get_num_threads()
    try:
        job = pretrain_job(config, dataset_dir, info)
        result = run_loop(job, run_dir, info, resume, max_steps, progress)
    finally:
        # train.threads is this run's: what runs next in the process (the chain's evaluation, whose
        # float sums and so its ranks depend on the thread count) gets the process's own, as it
        # does where a finished run is skipped (a resumed chain).
        torch.set_num_threads(threads)
    summary = {"run_dir": run_dir, "run_id": version, "steps": result.step, "total_steps": job.total_steps,
               "resumed_from": result.resumed_from, "skipped_samples": job.batches.skipped,
               "rejected_captions": job.batches.rejected_captions, "world": info.world}
    if info.is_main:
        _finish_pretrain(summary, result, config)
    distributed.barrier()
    return summary, config


def train(config: dict, dataset_dir: str, run_dir: str, resume: bool = False, root: str | None = None,
          max_steps: int | None = None, progress: StepProgress | None = None) -> dict:
    """Pre-train from the K-lingual shards in ``dataset_dir`` into ``run_dir``; returns a summary.

    ``max_steps`` stops early (the schedule still spans the configured steps): tests use it to cut a
    run that ``resume`` then continues. ``progress``: see :data:`StepProgress` (default: the logger).
    The catalog is not written here: ``flows.pretrain.pretrain_flow`` records the run.
    """
    return pretrain(config, dataset_dir, run_dir, resume, root, max_steps, progress)[0]
