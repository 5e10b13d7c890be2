"""The authors' checkpoint layout (X-VLM / CCLM / CCRk) and its import into a ccrk model.

The authors' code (github.com/BUAADreamer/CCRK) saves two layouts: the retrieval model's
(``vision_encoder.*``, ``text_encoder.*``, ``vision_proj``, ``text_proj``, ``itm_head``, ``temp``)
and the pre-training model's, whose text encoder is a ``BertForMaskedLM``
(``text_encoder.bert.*`` plus the MLM head ``text_encoder.cls.*``). Their Swin keeps one fused
``qkv`` projection per block; ccrk's (transformers') keeps three. Everything else is a rename.

:func:`key_plan` maps reference key names and shapes to ccrk's, :func:`infer_model_config`
reads the architecture off the shapes, and :func:`import_state_dict` builds a ccrk model from a
reference state dict, refusing any key it cannot place.
"""
from __future__ import annotations

import math
import os
import re
import tempfile
from dataclasses import dataclass

import torch

from ccrk.model import CCRKModel, latest_checkpoint, save_model
from ccrk.tokenizer import build_demo_tokenizer, load_tokenizer
from storage import layout
from storage.catalog import Catalog
from storage.errors import CCRKError
from storage.stage import Outcome, StagePlan, run_stage
from storage.versioning import content_version, file_sha256

# Buffers the reference saves and ccrk rebuilds from the architecture (its load_pretrained drops them too).
_REBUILT = re.compile(r"(relative_position_index|attn_mask|position_ids)$")

_VISION = [  # (reference suffix under vision_encoder., ccrk suffix under vision.swin.)
    (r"patch_embed\.proj\.", "embeddings.patch_embeddings.projection."),
    (r"patch_embed\.norm\.", "embeddings.norm."),
    (r"layers\.(\d+)\.blocks\.(\d+)\.norm1\.", r"encoder.layers.\1.blocks.\2.layernorm_before."),
    (r"layers\.(\d+)\.blocks\.(\d+)\.norm2\.", r"encoder.layers.\1.blocks.\2.layernorm_after."),
    (r"layers\.(\d+)\.blocks\.(\d+)\.attn\.relative_position_bias_table$",
     r"encoder.layers.\1.blocks.\2.attention.relative_position_bias.relative_position_bias_table"),
    (r"layers\.(\d+)\.blocks\.(\d+)\.attn\.proj\.", r"encoder.layers.\1.blocks.\2.attention.o_proj."),
    (r"layers\.(\d+)\.blocks\.(\d+)\.mlp\.", r"encoder.layers.\1.blocks.\2.mlp."),
    (r"layers\.(\d+)\.downsample\.", r"encoder.layers.\1.downsample."),
    (r"norm\.", "layernorm."),
]
_QKV = re.compile(r"layers\.(\d+)\.blocks\.(\d+)\.attn\.qkv\.(weight|bias)$")
_MLM_HEAD = {  # reference suffix under text_encoder.cls.predictions. -> ccrk under text.lm_head.
    "transform.dense.weight": "dense.weight", "transform.dense.bias": "dense.bias",
    "transform.LayerNorm.weight": "layer_norm.weight", "transform.LayerNorm.bias": "layer_norm.bias",
    "decoder.weight": "decoder.weight", "decoder.bias": "decoder.bias", "bias": "bias",
}
_SAME_NAME = ("vision_proj.", "text_proj.", "itm_head.")  # and "temp": named alike in both models


@dataclass(frozen=True)
class Source:
    """Where a ccrk tensor comes from: a reference key, and for a fused Swin qkv, which third."""
    key: str
    part: int | None = None


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """A reference checkpoint: ``.safetensors``, or a ``.pth``/``.th`` holding ``{"model": state_dict}``
    or a bare state dict (read with ``weights_only=True``: no pickled code runs)."""
    if not os.path.isfile(path):
        raise CCRKError(f"checkpoint {path} does not exist")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            sd = load_file(path)
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file: one line, not a traceback
        raise CCRKError(f"{path} is not a readable checkpoint ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})")
    if isinstance(sd, dict) and isinstance(sd.get("model"), dict):
        sd = sd["model"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CCRKError(f"{path} holds no state dict (expected tensors, or {{'model': state_dict}})")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def _text_prefix(keys) -> str:
    """``text_encoder.bert.`` in the pre-training layout, ``text_encoder.`` in the retrieval one."""
    return "text_encoder.bert." if any(k.startswith("text_encoder.bert.") for k in keys) else "text_encoder."


def _fusion_start(shapes: dict, prefix: str) -> int:
    layers = {int(m.group(1)) for k in shapes if (m := re.match(re.escape(prefix) + r"encoder\.layer\.(\d+)\.crossattention\.", k))}
    if not layers:
        raise CCRKError("the checkpoint's text encoder has no cross-attention layers (not a CCRk / X-VLM model)")
    return min(layers)


def key_plan(shapes: dict[str, tuple]) -> tuple[dict[str, Source], list[str]]:
    """({ccrk key: Source}, dropped reference keys) for reference keys -> shapes; raises on keys it
    cannot place, listing them all."""
    prefix = _text_prefix(shapes)
    n_text = _fusion_start(shapes, prefix)
    plan: dict[str, Source] = {}
    dropped, unplaced = [], []
    for key in shapes:
        if _REBUILT.search(key):
            dropped.append(key)
            continue
        target = _place(key, prefix, n_text)
        if target is None:
            unplaced.append(key)
        elif isinstance(target, list):
            plan.update({t: Source(key, i) for i, t in enumerate(target)})
        else:
            plan[target] = Source(key)
    if unplaced:
        raise CCRKError(f"{len(unplaced)} checkpoint key(s) have no place in a ccrk model: " + ", ".join(unplaced))
    return plan, dropped


def _place(key: str, text_prefix: str, n_text: int):
    """The ccrk key (or the three q/k/v keys) of one reference key; None where it has no place."""
    if key == "temp" or key.startswith(_SAME_NAME):
        return key
    if key.startswith("vision_encoder."):
        rest = key.removeprefix("vision_encoder.")
        if m := _QKV.match(rest):
            layer, block, kind = m.groups()
            return [f"vision.swin.encoder.layers.{layer}.blocks.{block}.attention.{p}_proj.{kind}" for p in "qkv"]
        for pattern, repl in _VISION:
            if re.match(pattern, rest):
                return "vision.swin." + re.sub("^" + pattern, repl, rest)
        return None
    if key.startswith("text_encoder.cls.predictions."):
        suffix = _MLM_HEAD.get(key.removeprefix("text_encoder.cls.predictions."))
        return f"text.lm_head.{suffix}" if suffix else None
    if key.startswith(text_prefix + "embeddings."):
        return "text." + key.removeprefix(text_prefix)
    if m := re.match(re.escape(text_prefix) + r"encoder\.layer\.(\d+)\.(.+)$", key):
        i, rest = int(m.group(1)), m.group(2)
        return f"text.text_layers.{i}.{rest}" if i < n_text else f"text.fusion_layers.{i - n_text}.{rest}"
    return None


def infer_model_config(shapes: dict[str, tuple], text_heads: int | None = None,
                       image_size: int | None = None) -> dict:
    """A ccrk ``model:`` block read off the reference shapes. Text heads cannot be read off shapes:
    default ``hidden // 64`` (BERT's and XLM-R's head width)."""
    prefix = _text_prefix(shapes)
    n_text = _fusion_start(shapes, prefix)
    n_layers = 1 + max(int(m.group(1)) for k in shapes if (m := re.match(re.escape(prefix) + r"encoder\.layer\.(\d+)\.", k)))
    vocab, hidden = shapes[prefix + "embeddings.word_embeddings.weight"]
    stages = sorted({int(m.group(1)) for k in shapes if (m := re.match(r"vision_encoder\.layers\.(\d+)\.", k))})
    depths = [1 + max(int(m.group(1)) for k in shapes if (m := re.match(rf"vision_encoder\.layers\.{s}\.blocks\.(\d+)\.", k)))
              for s in stages]
    tables = [shapes[f"vision_encoder.layers.{s}.blocks.0.attn.relative_position_bias_table"] for s in stages]
    window = (math.isqrt(tables[0][0]) + 1) // 2
    embed, _, patch, _ = shapes["vision_encoder.patch_embed.proj.weight"]
    if image_size is None:
        # A shifted block's mask is [windows, w*w, w*w] at its stage's resolution (halved per stage).
        masks = sorted((int(m.group(1)), v) for k, v in shapes.items()
                       if (m := re.match(r"vision_encoder\.layers\.(\d+)\.blocks\.\d+\.attn_mask$", k)))
        image_size = math.isqrt(masks[0][1][0]) * window * patch * 2 ** masks[0][0] if masks else 224
    heads = text_heads or max(1, hidden // 64)
    if hidden % heads:
        raise CCRKError(f"text width {hidden} is not a multiple of {heads} attention heads")
    return {
        "embed_dim": shapes["vision_proj.weight"][0],
        "temp": 0.07,
        "vision": {"init": "random", "image_size": int(image_size), "patch_size": int(patch), "embed_dim": int(embed),
                   "depths": depths, "num_heads": [int(t[1]) for t in tables], "window_size": int(window)},
        "text": {"init": "random", "hidden_size": int(hidden), "num_heads": int(heads),
                 "intermediate_size": int(shapes[prefix + "encoder.layer.0.intermediate.dense.weight"][0]),
                 "max_position": int(shapes[prefix + "embeddings.position_embeddings.weight"][0]),
                 "text_layers": n_text, "fusion_layers": n_layers - n_text, "layer_norm_eps": 1e-5},
        "vocab_size": int(vocab),
    }


def _tensor(sd: dict, src: Source) -> torch.Tensor:
    t = sd[src.key]
    return t if src.part is None else t.chunk(3, dim=0)[src.part]


def import_state_dict(sd: dict[str, torch.Tensor], model) -> dict:
    """Load reference weights into a ccrk ``model`` of the matching architecture; returns what was
    dropped and what the checkpoint lacked. A shape mismatch, or a ccrk weight missing beyond the
    MLM head (absent from retrieval checkpoints), is an error."""
    plan, dropped = key_plan({k: tuple(v.shape) for k, v in sd.items()})
    own = model.state_dict()
    unknown = sorted(set(plan) - set(own))
    if unknown:
        raise CCRKError(f"{len(unknown)} checkpoint key(s) have no place in this ccrk model: " + ", ".join(unknown))
    wrong = [f"{k} {tuple(_tensor(sd, s).shape)} vs {tuple(own[k].shape)}" for k, s in plan.items()
             if tuple(_tensor(sd, s).shape) != tuple(own[k].shape)]
    if wrong:
        raise CCRKError("checkpoint shapes differ from the inferred architecture: " + "; ".join(wrong))
    # The MLM head's decoder weight is the word embedding (tied), its decoder bias the head's bias.
    tied = {"text.lm_head.decoder.weight", "text.lm_head.decoder.bias"}
    missing = sorted(set(own) - set(plan) - tied)
    if any(not k.startswith("text.lm_head.") for k in missing):
        raise CCRKError("the checkpoint lacks ccrk weight(s): " + ", ".join(k for k in missing if not k.startswith("text.lm_head.")))
    model.load_state_dict({k: _tensor(sd, s) for k, s in plan.items()}, strict=False)
    return {"dropped": dropped, "missing": missing, "mlm_head": not missing}


# ---------------------------------------------------------------------- `ccrk import-checkpoint`

XLMR_VOCAB = 250002  # XLM-R's vocabulary: its tokenizer is the released models' own
XLMR_TOKENIZER = "pretrained/xlm-roberta-large"


def default_tokenizer(vocab_size: int) -> str:
    """XLM-R large's tokenizer for the released models' vocabulary, else the demo tokenizer built to
    the checkpoint's vocabulary size (small test checkpoints, such as the parity fixture)."""
    return XLMR_TOKENIZER if vocab_size == XLMR_VOCAB else f"demo:{vocab_size}"


def _tokenizer(spec: str, vocab_size: int, work_dir: str):
    if spec.startswith("demo:"):
        # The demo vocabulary laid out as XLM-R (<s> <pad> </s> <unk> ... <mask>), sized to the checkpoint.
        spec = build_demo_tokenizer(os.path.join(work_dir, "demo-tokenizer"), vocab_size=int(spec[5:]) - 4)
    tok = load_tokenizer(spec)
    if len(tok) > vocab_size:
        raise CCRKError(f"tokenizer {spec} has {len(tok)} tokens but the checkpoint embeds only {vocab_size}")
    return tok


class ImportStage:
    """A reference checkpoint's import as a :class:`storage.stage.Stage` (kind ``run``; version = a
    hash of the file's sha256 and the options; complete once its checkpoint and catalog entry exist)."""

    def __init__(self, src: str, root: str | None = None, out: str | None = None, tokenizer: str | None = None,
                 text_heads: int | None = None, image_size: int | None = None, name: str | None = None):
        self.src, self.root, self.out, self.tokenizer = src, layout.data_root(root), out, tokenizer
        self.text_heads, self.image_size, self.name = text_heads, image_size, name

    def plan(self) -> StagePlan:
        self.sd = sd = read_state_dict(self.src)
        self.model_cfg = model_cfg = infer_model_config({k: tuple(v.shape) for k, v in sd.items()},
                                                        self.text_heads, self.image_size)
        self.vocab = model_cfg.pop("vocab_size")
        tok_spec = self.tokenizer or default_tokenizer(self.vocab)
        if "temp" in sd:
            model_cfg["temp"] = float(sd["temp"])
        config = {"name": self.name or "imported-" + os.path.splitext(os.path.basename(self.src))[0],
                  "objective": "ccrk", "seed": 0, "model": model_cfg,
                  "imported_from": {"sha256": file_sha256(self.src), "tokenizer": tok_spec}}
        self.config = config  # execute adds the tokenizer's path to its model block (after the version)
        version = content_version("run", params={"import": config})
        run_dir = os.path.abspath(self.out or layout.run_dir(self.root, version))
        self.summary = {"run_id": version, "run_dir": run_dir,
                        "checkpoint": os.path.join(run_dir, "checkpoints", "step-0000000"),
                        "source": os.path.abspath(self.src),
                        "layout": "pre-training" if _text_prefix(sd) == "text_encoder.bert." else "retrieval",
                        "tokenizer": tok_spec, "text_heads": model_cfg["text"]["num_heads"],
                        "image_size": model_cfg["vision"]["image_size"]}
        return StagePlan("run", config["name"], version, run_dir,
                         {"config": config, "imported_from": self.summary["source"]})

    def completed(self, plan: StagePlan) -> Outcome | None:
        if latest_checkpoint(plan.path) and Catalog(self.root).get(plan.version) is not None:
            return Outcome(dict(self.summary))
        return None

    def execute(self, plan: StagePlan) -> Outcome:
        summary, model_cfg, vocab = dict(self.summary), self.model_cfg, self.vocab
        with tempfile.TemporaryDirectory() as work:
            tok = _tokenizer(summary["tokenizer"], vocab, work)
            model = CCRKModel(model_cfg, vocab_size=vocab)
            loaded = import_state_dict(self.sd, model)
            model_cfg["text"]["tokenizer"] = os.path.join(plan.path, "tokenizer")
            save_model(model, self.config, summary["checkpoint"])
            tok.save_pretrained(os.path.join(plan.path, "tokenizer"))
        summary.update(mlm_head="loaded" if loaded["mlm_head"] else "absent (retrieval layout): initialised fresh",
                       dropped_buffers=len(loaded["dropped"]), tensors=len(self.sd),
                       parameters=sum(p.numel() for p in model.parameters()))
        return Outcome(summary, {k: v for k, v in summary.items() if k not in ("run_dir", "checkpoint")})

    def publish(self, plan: StagePlan, summary: dict) -> None:
        pass


def import_checkpoint(src: str, root: str | None = None, out: str | None = None, tokenizer: str | None = None,
                      text_heads: int | None = None, image_size: int | None = None, name: str | None = None) -> dict:
    """Write a reference checkpoint as a ccrk run (safetensors + JSON config + tokenizer) recorded in
    the catalog (:class:`ImportStage` through :func:`storage.stage.run_stage`); ``ccrk evaluate`` and
    ``ccrk finetune`` then take its run id. The same file and options give the same run, so a second
    import is a no-op."""
    stage = ImportStage(src, root, out, tokenizer, text_heads, image_size, name)
    return run_stage(stage, stage.root)
