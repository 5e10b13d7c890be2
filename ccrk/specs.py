"""The model stages' settings: the pre-training run config (:class:`RunSpec`, with its sections
:class:`ModelSpec`, :class:`DataSpec`, :class:`LossSpec`, :class:`CL2CMSpec`, :class:`TrainSpec`;
:class:`PretrainSpec` = a run config that may also carry the chain's sections, as the paper
configs do), ``ccrk finetune`` (:class:`FinetuneSpec`), ``ccrk evaluate`` (:class:`EvaluateSpec`)
and ``ccrk reproduce`` (:class:`ReproduceSpec`). Each default is written here once; see
:mod:`storage.spec` for the conventions (versioned vs setting fields, one-line errors).

This module imports no torch: the CLI validates a config before it loads a model.
"""
from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import PrivateAttr, field_validator, model_validator

from ccrk.evaluation.benchmarks import BENCHMARKS
from storage.layout import NAME_RULE, is_plain_name
from storage.spec import Bool, Device, Lang, Name, Spec, SpecError, deep_merge, read_yaml, setting, versioned
from storage.specs import AcquireChainSpec, AcquireSpec, BuildSpec, CorpusSpec, Executor
from translation.spec import TranslateSpec

# Choices defined by torch-importing modules, repeated here so that validating a config needs no
# torch; tests/test_specs.py checks each against its module.
OBJECTIVES = ("ccrk", "cl2cm")                                  # ccrk.objectives.OBJECTIVES
KCL_NORMS = ("code", "paper", "soft")                          # ccrk.losses.KCL_NORMS
POSITIVE_MODES = ("code", "paper", "softmax", "uniform")       # ccrk.losses.POSITIVE_MODES
GATHER_GRADS = ("exact", "local")                              # ccrk.losses.GATHER_GRADS
MASK_STYLES = ("span", "bernoulli")                            # ccrk.losses.MASK_STYLES
FINETUNE_MODES = ("zero-shot", "few-shot", "single")            # ccrk.evaluation.protocols.MODES
RANDAUGMENT_OPS = ("Identity", "AutoContrast", "Equalize", "Brightness", "Sharpness", "ShearX", "ShearY",
                   "TranslateX", "TranslateY", "Rotate")        # ccrk.data.RANDAUGMENT_OPS
LOSS_ALIASES = {"itm_positive": {"hard": "code"}}               # the names before issue 22


def resolve_device(device: str = "auto") -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``; any other name unchanged."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# ---------------------------------------------------------------------------- model


class VisionSpec(Spec):
    """``model.vision``: the Swin image encoder (:mod:`ccrk.modeling.vision`). With a pretrained
    ``init`` the architecture keys come from its config (``ccrk.model.resolve_architecture``)."""

    init: str = versioned("random", "random, or a local Hugging Face Swin checkpoint directory")
    image_size: int = versioned(description="input side (pixels); must equal a pretrained init's", ge=1)
    patch_size: int = versioned(4, "patch side (pixels)", ge=1)
    embed_dim: int | None = versioned(None, "width of the first stage (required with init: random)", ge=1,
                                      shown="the init's")
    depths: list[int] | None = versioned(None, "blocks per stage (required with init: random)", shown="the init's")
    num_heads: list[int] | None = versioned(None, "attention heads per stage (required with init: random)",
                                            shown="the init's")
    window_size: int = versioned(7, "attention window (patches)", ge=1)
    drop_path: float = versioned(0.1, "stochastic depth rate", ge=0, le=1)

    @model_validator(mode="after")
    def _random_needs_architecture(self):
        if self.init == "random":
            missing = [k for k in ("embed_dim", "depths", "num_heads") if getattr(self, k) is None]
            if missing:
                raise ValueError(f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} required with "
                                 f"init: random")
        return self


def _check_layers(value):
    ok = value in ("odd", "first") or (isinstance(value, list) and value
                                       and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                               for i in value))
    if not ok:
        raise ValueError(f"must be odd, first or a list of layer indices, not {value!r}")
    return value


class TextSpec(Spec):
    """``model.text``: the XLM-R text + fusion encoder (:mod:`ccrk.modeling.text`)."""

    init: str = versioned("random", "random, or a local Hugging Face XLM-R checkpoint directory")
    tokenizer: str = versioned("demo", "demo (the committed demo tokenizer) or a local tokenizer directory")
    layers: Any = versioned("odd", "which of init's layers feed ours: odd (1, 3, ...), first, or a list")
    hidden_size: int | None = versioned(None, "width (required with init: random)", ge=1, shown="the init's")
    num_heads: int | None = versioned(None, "attention heads (required with init: random)", ge=1,
                                      shown="the init's")
    intermediate_size: int | None = versioned(None, "feed-forward width (required with init: random)", ge=1,
                                              shown="the init's")
    max_position: int = versioned(514, "position embeddings (init: random)", ge=1)
    layer_norm_eps: float = versioned(1e-5, "LayerNorm epsilon (XLM-R's)", gt=0)
    dropout: float | None = versioned(None, "hidden and attention dropout", ge=0, le=1, omit_none=True,
                                      shown="the init's, else 0.1")
    init_std: float | None = versioned(None, "initializer range (init: random)", gt=0, omit_none=True,
                                       shown="0.02")
    text_layers: int = versioned(description="text-only layers (the contrastive text feature)", ge=1)
    fusion_layers: int = versioned(description="layers with cross-attention to the image", ge=0)

    @field_validator("layers")
    @classmethod
    def _layers(cls, value):
        return _check_layers(value)

    @model_validator(mode="after")
    def _random_needs_architecture(self):
        if self.init == "random":
            missing = [k for k in ("hidden_size", "num_heads", "intermediate_size") if getattr(self, k) is None]
            if missing:
                raise ValueError(f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} required with "
                                 f"init: random")
        return self


class ModelSpec(Spec):
    """``model``: encoders, projection width and the contrastive temperature's start."""

    embed_dim: int = versioned(256, "width of the contrastive projections", ge=1)
    temp: float = versioned(0.07, "initial contrastive temperature", gt=0)
    vision: VisionSpec = versioned(description="the image encoder")
    text: TextSpec = versioned(description="the text and fusion encoder")


# ---------------------------------------------------------------------------- data


class RandAugmentSpec(Spec):
    """``data.augment.randaugment``: ``n`` ops drawn from ``ops``, each with probability 0.5 at
    magnitude ``m`` (of 10)."""

    n: int = versioned(2, "ops per image", ge=0)
    m: float = versioned(7, "magnitude (of 10)", ge=0)
    ops: list[Literal[RANDAUGMENT_OPS]] | None = versioned(None, "the ops to draw from", shown="all")


class AugmentSpec(Spec):
    """``data.augment``: the training image transform."""

    crop_scale: list[float] = versioned(default_factory=lambda: [0.2, 1.0], min_length=2, max_length=2,
                                        description="random resized crop: [min, max] share of the image area")
    hflip: Bool = versioned(True, "random horizontal flip")
    randaugment: RandAugmentSpec | None = versioned(default_factory=RandAugmentSpec,
                                                    description="RandAugment; false, null or {} turn it off")

    @field_validator("randaugment", mode="before")
    @classmethod
    def _off(cls, value):
        if value is True:
            return {}
        return value or None  # false, null, {}: off (as before specs)

    @field_validator("crop_scale")
    @classmethod
    def _scale(cls, value):
        if not 0 < value[0] <= value[1] <= 1:
            raise ValueError(f"needs 0 < min <= max <= 1, not {value}")
        return value


class DataSpec(Spec):
    """``data``: tokenisation, caption normalisation, augmentation, loader processes."""

    max_tokens: int = versioned(40, "tokens per caption, at most", ge=2)
    pre_caption: Bool = versioned(False, "the authors' caption normalisation (ccrk.captions); off unless a "
                                         "config turns it on, so older run configs keep their captions")
    max_words: int = versioned(40, "with pre_caption: words per caption, at most (the authors' pre-training "
                                   "limit)", ge=1)
    num_workers: int = setting(0, "batch-building processes", ge=0)
    augment: AugmentSpec = versioned(default_factory=AugmentSpec, description="training image transform")


# ---------------------------------------------------------------------------- objectives


class LossWeights(Spec):
    itc: float = versioned(1.0, "1-to-K contrastive", ge=0)
    itm: float = versioned(1.0, "matching (MITM)", ge=0)
    mlm: float = versioned(1.0, "masked language modelling (CMLM)", ge=0)


class LossSpec(Spec):
    """``loss``: the CCRk objective's options. Where the paper and the authors' code disagree, the
    default is the code's and the other form is selectable (ccrk.losses has the definitions)."""

    kcl: Bool = versioned(True, "false: 1-to-1 contrastive, one random language per image per step (w/o KCL)")
    fusion: Bool = versioned(True, "false: pure contrastive, no MITM / CMLM")
    weights: LossWeights = versioned(default_factory=LossWeights, description="term weights")
    kcl_norm: Literal[KCL_NORMS] = versioned("code", "code: 0/1 labels, (i2t + t2i) / 2 / K | paper: no / K | "
                                                     "soft: 1/K targets")
    gather_grad: Literal[GATHER_GRADS] = versioned("exact", "exact: the gradient of the loss as written; local: "
                                                            "that / world_size on the ITC term (the code's)")
    temp_clamp: Bool = versioned(True, "clamp temp to [0.001, 0.5] at every forward (the code's pre-training)")
    itm_positive: Literal[POSITIVE_MODES] = versioned("code", "code | paper (the code's neg_sample_type=2) | "
                                                              "softmax | uniform; hard = code")
    itm_negatives: Literal["hard", "uniform"] = versioned("hard", "MITM negatives")
    mlm_caption: Literal["hard", "uniform"] = versioned("hard", "hard: the MITM hard positive | uniform")
    mask_style: Literal[MASK_STYLES] = versioned("span", "span (the code's masking generator) | bernoulli "
                                                         "(BERT: use mask_prob 0.15)")
    mask_prob: float = versioned(0.4, "masking probability", gt=0, le=1)
    max_masks: int = versioned(12, "span only: masked tokens per caption, at most", ge=1)
    mask_span_prob: float = versioned(0.2, "span only: probability that a masked token starts a span", ge=0, le=1)
    mask_span_max: int = versioned(3, "span only: spans of 2..mask_span_max tokens", ge=1)

    @field_validator(*LOSS_ALIASES, mode="before")
    @classmethod
    def _aliases(cls, value, info):
        return LOSS_ALIASES[info.field_name].get(value, value) if isinstance(value, str) else value


class CL2CMWeights(Spec):
    itc: float = versioned(1.0, "image vs target caption InfoNCE", ge=0)
    cl_sentence: float = versioned(1.0, "cross-lingual sentence InfoNCE", ge=0)
    cl_word: float = versioned(1.0, "word-level OT alignment", ge=0)
    kd: float = versioned(1.0, "relational distillation", ge=0)
    itc_source: float = versioned(0.0, "image vs source caption InfoNCE (not in the paper's setting)", ge=0)


class SinkhornSpec(Spec):
    eps: float = versioned(0.05, "entropic regularisation", gt=0)
    iters: int = versioned(50, "Sinkhorn iterations", ge=1)


class CL2CMSpec(Spec):
    """``cl2cm``: the CL2CM objective's options (ccrk/cl2cm.py; defaults ours, not the paper's)."""

    source_lang: Lang = versioned("en", "the pivot language (a language of langs)")
    target_lang: str = versioned("any", "a language of langs, or any: one present non-source language per "
                                        "image per step")
    weights: CL2CMWeights = versioned(default_factory=CL2CMWeights, description="term weights")
    cl_temp: float = versioned(0.05, "cross-lingual sentence InfoNCE temperature", gt=0)
    word_temp: float = versioned(0.05, "word-level InfoNCE temperature (word_loss: contrastive)", gt=0)
    kd_temp: float = versioned(0.1, "relational distillation temperature, teacher and student alike", gt=0)
    word_loss: Literal["contrastive", "distance"] = versioned("contrastive", "contrastive | distance (minimise "
                                                                            "<P, C> of the true pairs)")
    sinkhorn: SinkhornSpec = versioned(default_factory=SinkhornSpec, description="optimal transport")

    def check_langs(self, langs, kcl: bool = True) -> None:
        """The checks against the rest of the run config; raises SpecError."""
        langs = list(langs)
        if self.source_lang not in langs:
            raise SpecError(f"cl2cm.source_lang {self.source_lang!r} is not in langs {langs}")
        if self.target_lang != "any" and (self.target_lang not in langs or self.target_lang == self.source_lang):
            raise SpecError(f"cl2cm.target_lang {self.target_lang!r} must be 'any' or a language of {langs} "
                            f"other than the source {self.source_lang!r}")
        if len(langs) < 2:
            raise SpecError(f"cl2cm needs a source and at least one target language in langs, got {langs}")
        if not kcl:
            raise SpecError("cl2cm needs every language slot of a caption: remove loss.kcl: false")


# ---------------------------------------------------------------------------- training


class TrainSpec(Spec):
    """``train``: optimisation, schedule, logging and checkpoints (ccrk/trainer.py)."""

    batch_size: int = versioned(32, "images per GPU per step", ge=1)
    steps: int | None = versioned(None, "optimiser steps (overrides epochs)", ge=1, shown="epochs x batches")
    epochs: int | None = versioned(None, "passes over the dataset", ge=1, shown="1")
    lr: float = versioned(1e-4, "peak learning rate", gt=0)
    lr_new_mult: float = versioned(2.0, "lr multiplier of newly initialised parameters", gt=0)
    weight_decay: float = versioned(0.01, "AdamW weight decay", ge=0)
    betas: list[float] = versioned(default_factory=lambda: [0.9, 0.98], min_length=2, max_length=2,
                                   description="AdamW betas")
    warmup: float = versioned(0.03, "linear warm-up, as a fraction of the steps", ge=0, le=1)
    clip: float = versioned(1.0, "gradient-norm clip", gt=0)
    bf16: Bool = versioned(True, "bfloat16 autocast on GPU")
    log_every: int = setting(10, "steps between metric rows", ge=1)
    checkpoint_every: int = setting(500, "steps between checkpoints", ge=1)
    keep_checkpoints: int = setting(2, "checkpoints kept", ge=1)
    eval_every: int = setting(100, "steps between held-out retrieval checks", ge=1)
    heldout: int = versioned(64, "first N dataset samples held out of training (the in-training retrieval set)",
                             ge=0)
    threads: int | None = setting(None, "CPU threads (torch.set_num_threads)", ge=0, shown="torch's default")


class RunSpec(Spec):
    """A pre-training run config (configs/tiny.yaml, ccr6.yaml, cl2cm-demo.yaml, ...)."""

    name: str = setting("run", "the run's name (plots, catalog)")
    objective: Literal[OBJECTIVES] = versioned("ccrk", "training objective")
    seed: int = versioned(0, "seed of initialisation, sample order and sampling")
    langs: list[Lang] = versioned(description="caption languages, in slot order", min_length=1)
    device: Device = setting("auto", "auto (GPU when visible), cpu, cuda or cuda:N")
    model: ModelSpec = versioned(description="the model")
    data: DataSpec = versioned(default_factory=DataSpec, description="input pipeline")
    loss: LossSpec = versioned(default_factory=LossSpec, description="the ccrk objective")
    cl2cm: CL2CMSpec | None = versioned(None, "the cl2cm objective", omit_none=True, shown="CL2CMSpec defaults")
    train: TrainSpec = versioned(description="optimisation and schedule")

    @model_validator(mode="after")
    def _objective_sections(self):
        if self.objective == "cl2cm":
            (self.cl2cm or CL2CMSpec()).check_langs(self.langs, self.loss.kcl)
        return self

    def run_spec(self) -> RunSpec:
        """The run keys alone (a :class:`PretrainSpec` without its chain sections)."""
        return RunSpec.parse({k: v for k, v in self.to_config(defaults=False).items() if k in RunSpec.model_fields})


# ---------------------------------------------------------------------------- evaluation


class BenchmarkSpec(Spec):
    """What evaluation and fine-tuning share: the checkpoint, the benchmark and its files."""

    checkpoint: str | None = versioned(None, "run directory, checkpoint directory, run id or run version",
                                       shown="in ccrk reproduce: each trained run")
    benchmark: Literal[BENCHMARKS] = versioned("demo", "retrieval benchmark")
    data: str | None = versioned(None, "benchmark folder (xFlickrCO: holds annotations/<lang>/; Multi30K: a "
                                       "checkout of multi30k/dataset or CCLM's json; COCO: dataset_coco.json "
                                       "(+ stair/, COCO-CN) or CCLM's json; WIT: test_<lang>.jsonl)",
                                 shown="in ccrk reproduce: the demo benchmark")
    images: str | None = versioned(None, "image folder (Flickr30K images for xFlickrCO and Multi30K; COCO: holding "
                                         "train2014/ and val2014/; WIT: its image-pixel files, joined by URL)",
                                   shown="<data>/images")
    coco_images: str | None = versioned(None, "COCO val2014 folder (xFlickrCO's COCO half)")
    # Languages become benchmark file names (annotations/<lang>/test.jsonl, test_<lang>.jsonl): codes only.
    langs: list[Lang] | None = versioned(None, "languages to evaluate", shown="all present")
    mrv_langs: list[Lang] | None = versioned(None, "languages over which MRV is computed",
                                            shown="the paper's set for the benchmark when all its languages are "
                                                  "evaluated, else langs")
    k_test: int | None = versioned(None, "candidates re-ranked by ITM", ge=1, shown="128; COCO 256")
    itc_only: Bool = versioned(False, "rank by ITC similarity only (no ITM re-ranking)")
    skip_missing: Bool = versioned(False, "skip (and count) images that are missing")
    device: Device = setting("auto", "auto (GPU when visible), cpu, cuda or cuda:N")


class EvaluateSpec(BenchmarkSpec):
    """``ccrk evaluate`` / ``evaluate_flow`` / the reproduce YAML's ``evaluate:`` section."""

    batch_size: int = setting(64, "images or texts per encoding batch", ge=1)


SELECTIONS = ("val", "test", "last")
PRESETS = ("paper", "code")
# Fine-tuning settings per benchmark, by preset (the one place they are written; README "Fine-tuning
# protocols" says where the two differ and why "paper" is the default):
# - paper: Tables 6 and 7 of the CCRk paper; the checkpoint kept is the best on the benchmark's
#   validation split (the last epoch where it has none: few-shot);
# - code: the authors' fine-tuning configs and scripts (configs/cclm-base-ft/*.yaml, xFlickrCO.py,
#   WIT.py, Retrieval.py): xFlickr&CO at lr 3e-5, WIT for 5 epochs, and the checkpoint chosen on
#   the *test* set for Multi30K, COCO and few-shot (Retrieval.py sums the test languages' mean
#   recall; xFlickrCO_fewshot.yaml's val_file is the target language's test.jsonl).
# Batch sizes are global (the authors': per-GPU size x GPUs). start_eval is the first epoch
# (0-based) scored for selection, eval_interval the epochs between scorings (epoch + 1 divisible by it).
# The demo benchmark keeps the checkpoint's resolution and text length (image_size/max_tokens None).
_COMMON = {"weight_decay": 0.01, "warmup": 0.1, "image_size": 384, "window_size": 12, "start_eval": 0,
           "eval_interval": 1}
_DEMO = {**_COMMON, "epochs": 10, "batch_size": 32, "lr": 3e-5, "max_tokens": None, "image_size": None,
         "window_size": None, "select": "val"}  # the same in both presets
FINETUNE_PRESETS: dict[str, dict[str, dict]] = {
    "paper": {
        "xflickrco": {**_COMMON, "epochs": 10, "batch_size": 64, "lr": 1e-5, "max_tokens": 80, "select": "val"},
        "wit": {**_COMMON, "epochs": 10, "batch_size": 80, "lr": 3e-5, "max_tokens": 80, "select": "val"},
        "multi30k": {**_COMMON, "epochs": 10, "batch_size": 64, "lr": 3e-5, "max_tokens": 40, "select": "val"},
        "coco": {**_COMMON, "epochs": 10, "batch_size": 64, "lr": 3e-5, "max_tokens": 40, "select": "val"},
        "demo": _DEMO,
        "few-shot": {"epochs": 60, "batch_size": 64, "lr": 1e-5, "select": "last"},
    },
    "code": {
        "xflickrco": {**_COMMON, "epochs": 10, "batch_size": 64, "lr": 3e-5, "max_tokens": 80, "select": "val",
                      "start_eval": 7},
        "wit": {**_COMMON, "epochs": 5, "batch_size": 80, "lr": 3e-5, "max_tokens": 80, "select": "val",
                "start_eval": 4},
        "multi30k": {**_COMMON, "epochs": 10, "batch_size": 64, "lr": 3e-5, "max_tokens": 40, "select": "test"},
        "coco": {**_COMMON, "epochs": 10, "batch_size": 64, "lr": 3e-5, "max_tokens": 40, "select": "test"},
        "demo": _DEMO,
        "few-shot": {"epochs": 60, "batch_size": 64, "lr": 1e-5, "select": "test", "start_eval": 9,
                     "eval_interval": 10},
    },
}
# What the flags may override (FinetuneSpec's fields of these names; None = the preset's).
FINETUNE_KEYS = ("epochs", "batch_size", "lr", "weight_decay", "warmup", "max_tokens", "image_size", "window_size",
                 "select", "start_eval", "eval_interval")


class FinetuneHyperparameters(Spec):
    """The settings no preset varies: ``protocols.FINETUNE_DEFAULTS``."""

    seed: int = versioned(42, "seed")
    temp_clamp: Bool = versioned(False, "clamp the temperature (the authors' retrieval model never does)")


def finetune_settings(benchmark: str, mode: str = "zero-shot", preset: str = "paper") -> dict:
    """The preset's settings for ``benchmark`` (few-shot: its few-shot row over the benchmark's)."""
    table = FINETUNE_PRESETS[preset]
    out = dict(table[benchmark])
    if mode == "few-shot":
        out.update(table["few-shot"])
    return out


_SHOWN = "the preset's for the benchmark (README, Fine-tuning protocols)"


class FinetuneSpec(BenchmarkSpec):
    """``ccrk finetune`` / ``finetune_flow``: fine-tune, then (``evaluate``) evaluate."""

    mode: Literal[FINETUNE_MODES] = versioned("zero-shot", "zero-shot: English training set, evaluate every "
                                                           "language; few-shot: continue on annotations/<lang>/"
                                                           "train_<N>.jsonl; single: one language's training set")
    lang: Lang | None = versioned(None, "target language (few-shot, single)")
    shots: int | None = versioned(None, "N of the few-shot file train_<N>.jsonl", ge=1)
    preset: Literal[PRESETS] = versioned("paper", "paper: Tables 6/7 and selection on validation; code: the "
                                                  "authors' fine-tuning configs (README)")
    epochs: int | None = versioned(None, "fine-tuning epochs", ge=1, shown=_SHOWN)
    batch_size: int | None = versioned(None, "pairs per step (global)", ge=1, shown=_SHOWN)
    lr: float | None = versioned(None, "learning rate", gt=0, shown=_SHOWN)
    weight_decay: float | None = versioned(None, "AdamW weight decay (not on biases and norms)", ge=0, shown="0.01")
    warmup: float | None = versioned(None, "linear warm-up, as a fraction of the steps", ge=0, le=1, shown="0.1")
    max_tokens: int | None = versioned(None, "text length in tokens", ge=1, shown="80 xFlickr&CO, WIT; 40 Multi30K, "
                                                                                "COCO; the checkpoint's on the demo")
    image_size: int | None = versioned(None, "fine-tuning and evaluation resolution (pixels)", ge=1,
                                       shown="384; the checkpoint's on the demo")
    window_size: int | None = versioned(None, "Swin window at that resolution", ge=1, shown="12")
    select: Literal[SELECTIONS] | None = versioned(None, "checkpoint kept: best on val, best on test (the authors' "
                                                         "Multi30K/COCO/few-shot scripts) or last", shown=_SHOWN)
    start_eval: int | None = versioned(None, "first epoch (0-based) scored for selection", ge=0, shown=_SHOWN)
    eval_interval: int | None = versioned(None, "epochs between selection scorings", ge=1, shown=_SHOWN)
    seed: int | None = versioned(None, "seed", shown=str(FinetuneHyperparameters.model_fields["seed"].default))
    evaluate: Bool = setting(True, "evaluate the protocol's languages after fine-tuning")
    num_workers: int = setting(0, "batch-building processes", ge=0)

    def hyperparameters(self) -> dict:
        """The fine-tuning hyperparameters (``run_finetune``'s ``hp``): the preset's for the benchmark
        and mode, then the ones given here."""
        hp = {**FinetuneHyperparameters().to_config(), **finetune_settings(self.benchmark, self.mode, self.preset)}
        hp.update({k: getattr(self, k) for k in FINETUNE_KEYS + ("seed",) if getattr(self, k) is not None})
        return hp


class FewShotSpec(Spec):
    """A protocol's few-shot rows: one model per language, continued from the English fine-tune."""

    langs: list[Lang] = versioned(description="target languages (one fine-tuned model each)", min_length=1)
    shots: int = versioned(100, "N of annotations/<lang>/train_<N>.jsonl", ge=1)
    settings: dict[str, Any] = versioned(default_factory=dict, description="fine-tuning settings over the preset's "
                                                                           "few-shot row (FinetuneSpec's names)")


class SingleSpec(Spec):
    """A protocol's single-language rows: one model per language, fine-tuned on that language alone."""

    langs: list[Lang] = versioned(description="languages (one fine-tuned model each)", min_length=1)
    settings: dict[str, Any] = versioned(default_factory=dict, description="fine-tuning settings over the preset's")


class ProtocolSpec(BenchmarkSpec):
    """One benchmark of ``ccrk reproduce``'s ``protocol:`` list: zero-shot (fine-tune on English,
    evaluate ``langs``), then optionally few-shot and single-language, each model scored and the
    one-model-per-language rows' MRV taken across their models."""

    preset: Literal[PRESETS] = versioned("paper", "fine-tuning settings: paper (Tables 6/7) or code (the authors' "
                                                  "configs)")
    zero_shot: Bool = versioned(True, "fine-tune on the English training set, evaluate every language")
    settings: dict[str, Any] = versioned(default_factory=dict, description="zero-shot fine-tuning settings over the "
                                                                           "preset's (FinetuneSpec's names)")
    few_shot: FewShotSpec | None = versioned(None, "few-shot rows", omit_none=True)
    single: SingleSpec | None = versioned(None, "single-language rows", omit_none=True)
    paper_model: str | None = versioned(None, "the paper's Table 1 row this reproduces (e.g. CCR10-E): its figures "
                                              "are printed beside ours", omit_none=True)

    @field_validator("settings")
    @classmethod
    def _known(cls, value):
        unknown = sorted(set(value) - set(FINETUNE_KEYS + ("seed",)))
        if unknown:
            raise ValueError(f"unknown fine-tuning setting(s) {', '.join(unknown)}; known: "
                             f"{', '.join(FINETUNE_KEYS + ('seed',))}")
        return value

    def finetune_spec(self, mode: str = "zero-shot", lang: str | None = None, checkpoint: str | None = None) -> FinetuneSpec:
        """The :class:`FinetuneSpec` of one of this protocol's fine-tunes."""
        extra = {"zero-shot": self.settings, "few-shot": (self.few_shot.settings if self.few_shot else {}),
                 "single": (self.single.settings if self.single else {})}[mode]
        base = {k: getattr(self, k) for k in BenchmarkSpec.model_fields if k not in ("langs", "mrv_langs")}
        values = {**base, "checkpoint": checkpoint, "mode": mode, "lang": lang, "preset": self.preset,
                  "shots": self.few_shot.shots if mode == "few-shot" else None, "evaluate": False,
                  **{k: v for k, v in extra.items()}}
        return FinetuneSpec.parse(values, where=f"protocol {self.benchmark} {mode}")

    def evaluate_spec(self, checkpoint: str, langs: list[str] | None) -> EvaluateSpec:
        base = {k: getattr(self, k) for k in BenchmarkSpec.model_fields}
        return EvaluateSpec.parse({**base, "checkpoint": checkpoint, "langs": langs}, where=f"protocol {self.benchmark}")


# ---------------------------------------------------------------------------- the chain


class RunRef(Spec):
    """One pre-training run of the chain: a run config plus overrides."""

    name: str = versioned(description="the run's name in the comparison")
    config: str = versioned(description="run config YAML (relative paths: the working directory, else the "
                                        "repository root)")
    overrides: dict[str, Any] = versioned(default_factory=dict, description="deep-merged over the config")
    itc_only: Bool | None = versioned(None, "evaluate by ITC similarity only (e.g. CL2CM: no fusion encoder)",
                                      shown="evaluate.itc_only")


class PretrainChainSpec(Spec):
    """The reproduce YAML's ``pretrain:`` section."""

    runs: list[RunRef] = versioned(default_factory=list, description="runs to pre-train and compare (none: a "
                                                                     "data-only chain)")

    @field_validator("runs")
    @classmethod
    def _unique(cls, runs):
        names = [r.name for r in runs]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"run names must be unique: {', '.join(twice)} appear twice")
        return runs


class ChainSections(Spec):
    """The chain's sections as a paper run config carries them (each optional)."""

    root: str | None = setting(None, "data root (CCRK_ROOT or --root override this)", omit_none=True,
                               shown="./data")
    executor: Executor | None = setting(None, "local | ray: how acquire and translate run", omit_none=True,
                                        shown="local")
    ray_address: str | None = setting(None, "with executor ray: a running cluster", omit_none=True,
                                      shown="a local cluster for the run")
    corpus: CorpusSpec | None = versioned(None, "the embedded demo's synthetic corpus (served on loopback)",
                                          omit_none=True)
    acquire: AcquireChainSpec | None = versioned(None, "acquire settings", omit_none=True)
    translate: TranslateSpec | None = versioned(None, "translate settings", omit_none=True)
    build: BuildSpec | None = versioned(None, "build settings (name: the chain's; sources: acquire's)",
                                        omit_none=True)
    evaluate: EvaluateSpec | None = versioned(None, "evaluation of every trained run", omit_none=True)
    protocol: list[ProtocolSpec] | None = versioned(None, "the paper's protocols per benchmark, run on every "
                                                          "trained run (replaces evaluate)", omit_none=True)


class PretrainSpec(RunSpec, ChainSections):
    """What ``ccrk pretrain --config`` accepts: a run config, which may also carry the chain's
    sections for ``ccrk reproduce`` (configs/ccr10-e.yaml is both)."""


def resolve_config_path(path: str, config_dir: str | None) -> str:
    """A run config path as the reproduce YAML names it: absolute or relative to the working
    directory, else relative to the repository root (the parent of the YAML's directory)."""
    if os.path.isabs(path) or os.path.exists(path) or not config_dir:
        return path
    candidate = os.path.join(os.path.dirname(config_dir), path)
    return candidate if os.path.exists(candidate) else path


class ReproduceSpec(ChainSections):
    """``ccrk reproduce --config``: the whole chain (configs/demo.yaml, demo-small.yaml; and a paper
    run config with chain sections, its own single run: :meth:`load`)."""

    # The chain's name becomes directories (datasets/<name>/, reports/<name>-comparison/): a plain name.
    name: Name | None = setting(None, "the chain's name (dataset, report)", shown="the file's name")
    executor: Executor = setting("local", "local | ray: how acquire and translate run (their sections' own "
                                          "executor wins)")
    acquire: AcquireChainSpec = versioned(description="acquire settings")
    translate: TranslateSpec = versioned(description="translate settings")
    build: BuildSpec = versioned(description="build settings (name: the chain's; sources: acquire's)")
    pretrain: PretrainChainSpec = versioned(description="the runs to pre-train")
    evaluate: EvaluateSpec = versioned(default_factory=EvaluateSpec, description="evaluation of every trained run "
                                                                                 "without fine-tuning (no protocol)")

    _config_path: str | None = PrivateAttr(None)

    @classmethod
    def load(cls, path: str) -> ReproduceSpec:
        """Read a reproduce YAML; a run config (``model:`` and no ``pretrain:``) is validated as a
        :class:`PretrainSpec` and becomes its own single run."""
        data = read_yaml(path)
        if "name" not in data:  # named after its file, which must then be a plain name too
            stem = os.path.splitext(os.path.basename(path))[0]
            if not is_plain_name(stem):
                raise SpecError(f"{path}: the chain takes its file's name, and {stem!r} is not a plain name "
                                f"({NAME_RULE}): set name: in the config")
            data["name"] = stem
        if "model" in data and "pretrain" not in data:
            run = PretrainSpec.parse(data, where=path)
            data = {k: v for k, v in data.items() if k in cls.model_fields}
            data["pretrain"] = {"runs": [{"name": run.name, "config": os.path.abspath(path)}]}
        spec = cls.parse(data, where=path)
        spec._config_path = os.path.abspath(path)
        return spec

    @property
    def config_dir(self) -> str | None:
        """The directory of the YAML this spec was loaded from (run configs resolve against it)."""
        return os.path.dirname(self._config_path) if self._config_path else None

    # -- each stage's spec, with the chain's settings applied

    def _chain_settings(self, section: Spec) -> dict:
        """The chain's executor (and ray address) for a section that does not set its own."""
        if "executor" in section.model_fields_set:
            return {}
        out = {"executor": self.executor}
        if self.ray_address and "ray_address" not in section.model_fields_set:
            out["ray_address"] = self.ray_address
        return out

    def acquire_spec(self, source: str, metadata: list[str] | None = None, images: str | None = None,
                     allow: list[str] | None = None) -> AcquireSpec:
        """One source's spec; ``allow``: exact HOST:PORT pairs added to the section's allow_addresses
        (the demo's loopback server)."""
        changes = self._chain_settings(self.acquire)
        if allow:
            changes["allow_addresses"] = [*(self.acquire.allow_addresses or ()), *allow]
        return self.acquire.for_source(source, metadata, images, **changes)

    def translate_spec(self) -> TranslateSpec:
        return TranslateSpec.parse({**self.translate.to_config(defaults=False), **self._chain_settings(self.translate)})

    def build_spec(self) -> BuildSpec:
        """The build section, its name the chain's and its sources acquire's unless it sets them."""
        values = self.build.to_config(defaults=False)
        values.setdefault("name", self.name or BuildSpec().name)
        values.setdefault("sources", list(self.acquire.sources))
        return BuildSpec.parse(values)

    def itc_only(self, run_name: str) -> bool:
        ref = next((r for r in self.pretrain.runs if r.name == run_name), None)
        return self.evaluate.itc_only if ref is None or ref.itc_only is None else ref.itc_only

    def run_config_files(self) -> dict[str, tuple[str, dict, str]]:
        """Each run's (config path, overrides, where its errors say they are)."""
        where_self = self._config_path or "reproduce config"
        out = {}
        for i, ref in enumerate(self.pretrain.runs):
            path = resolve_config_path(ref.config, self.config_dir)
            out[ref.name] = (path, ref.overrides,
                             f"{where_self}: pretrain.runs[{i}] ({path} + overrides)" if ref.overrides else path)
        return out

    def run_configs(self) -> dict[str, PretrainSpec]:
        """Each run's config (its file with the overrides merged), validated."""
        return {name: read_run_config(*files)[1] for name, files in self.run_config_files().items()}


def read_run_config(path: str, overrides: dict | None = None, where: str | None = None) -> tuple[dict, PretrainSpec]:
    """A run config YAML with ``overrides`` deep-merged over it: the dict as written, and its
    :class:`PretrainSpec` (a misspelt key anywhere is one line naming it, prefixed by ``where``)."""
    config = deep_merge(read_yaml(path), overrides or {})
    return config, PretrainSpec.parse(config, where=where or path)
