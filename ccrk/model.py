"""The CCRk model: Swin image encoder, XLM-R text encoder, XLM-R fusion encoder, and their heads.

Public API (consumed by evaluation): :func:`load_pretrained`, ``CCRKModel.encode_image``,
``encode_text``, ``itm_logits`` and the learnable temperature ``temp``. Checkpoints are
``<run_dir>/checkpoints/step-XXXXXXX/model.safetensors`` + ``config.json`` (the run config); the
tokenizer is saved once at ``<run_dir>/tokenizer``.
"""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from torch import nn

from ccrk.modeling.text import TextFusionEncoder
from ccrk.modeling.vision import VisionEncoder, check_window_fits, interpolate_relative_position_bias
from ccrk.tokenizer import load_tokenizer
from storage import atomic
from storage.errors import CCRKError

TEMP_RANGE = (0.001, 0.5)
# The vision keys load_pretrained may change: none alters a weight's shape but the bias tables'.
RESIZABLE_VISION_KEYS = ("image_size", "window_size", "drop_path")


def _mlp(width: int, out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(width, 2 * width), nn.LayerNorm(2 * width), nn.GELU(), nn.Linear(2 * width, out))


class CCRKModel(nn.Module):
    def __init__(self, model_cfg: dict, vocab_size: int):
        super().__init__()
        self.cfg = model_cfg
        self.vision = VisionEncoder(model_cfg["vision"])
        self.text = TextFusionEncoder(model_cfg["text"], vocab_size, self.vision.width)
        hidden = self.text.config.hidden_size
        embed_dim = model_cfg.get("embed_dim", 256)
        self.vision_proj = nn.Linear(self.vision.width, embed_dim)
        self.text_proj = nn.Linear(hidden, embed_dim)
        self.itm_head = _mlp(hidden, 2)
        self.temp = nn.Parameter(torch.tensor(float(model_cfg.get("temp", 0.07))))
        for m in (self.vision_proj, self.text_proj, self.itm_head):
            m.apply(self.text._init_weights)

    # ------------------------------------------------------------------ API

    def encode_image(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(image_embeds [B, 1+N, Dv], image_feat [B, E] L2-normalised)."""
        embeds = self.vision(pixel_values)
        return embeds, F.normalize(self.vision_proj(embeds[:, 0]).float(), dim=-1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(text_embeds [B, L, D] from the text-only layers, text_feat [B, E] L2-normalised)."""
        embeds = self.text.encode(input_ids, attention_mask)
        return embeds, F.normalize(self.text_proj(embeds[:, 0]).float(), dim=-1)

    def encode_text_cls(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        """(state, text_feat [B, E]): the contrastive feature alone, the last text layer run at CLS
        only; ``text_tokens(state, rows)`` then gives chosen rows' token embeddings (training)."""
        cls, state = self.text.encode_cls(input_ids, attention_mask)
        return state, F.normalize(self.text_proj(cls).float(), dim=-1)

    def text_tokens(self, state, rows: torch.Tensor) -> torch.Tensor:
        """``encode_text(...)[0][rows]`` from an ``encode_text_cls`` state: [R, L, D]."""
        return self.text.finish(state, rows)

    def fuse(self, image_embeds, image_atts, text_embeds, text_atts) -> torch.Tensor:
        return self.text.fuse(text_embeds, text_atts, image_embeds, image_atts)

    def itm_logits(self, image_embeds, image_atts, text_embeds, text_atts, image_kv=None) -> torch.Tensor:
        """[B, 2] matching logits on the fusion CLS (index 1 = match). ``image_kv``
        (``text.image_keys_values``, one row per pair) stands in for ``image_embeds``."""
        cls = self.text.fuse(text_embeds, text_atts, image_embeds, image_atts, image_kv=image_kv, cls_only=True)
        return self.itm_head(cls[:, 0]).float()

    @torch.no_grad()
    def itm_pair_scores(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor, text_atts: torch.Tensor,
                        image_idx: torch.Tensor, text_idx: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """ITM "match" logit of each pair (image_idx[n], text_idx[n]): (n,) float64 on the CPU.

        For re-ranking, where every image meets many texts: the pairs are taken image by image, so
        an image's cross-attention keys and values are computed once for all its texts and its
        texts' queries attend to them as one sequence; each batch is cut to its longest caption and
        the last fusion layer runs at CLS.
        """
        image_idx, text_idx = image_idx.cpu(), text_idx.cpu()
        order = torch.argsort(image_idx, stable=True)
        images, counts = torch.unique_consecutive(image_idx[order], return_counts=True)
        out = torch.empty(len(order), dtype=torch.float64)
        start = 0
        for image, n in zip(images.tolist(), counts.tolist()):
            kv = self.text.image_keys_values(image_embeds[image:image + 1])
            for b0 in range(start, start + n, batch_size):
                sel = order[b0:min(b0 + batch_size, start + n)]
                rows = text_idx[sel].to(text_embeds.device)
                atts = text_atts[rows]
                length = max(1, int(atts.sum(dim=1).max()))  # captions are right-padded
                logits = self.itm_logits(None, None, text_embeds[rows, :length], atts[:, :length], image_kv=kv)
                out[sel] = logits[:, 1].double().cpu()
            start += n
        return out

    def mlm_logits(self, masked_ids, attention_mask, image_embeds, image_atts, predict: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits at the ``predict`` positions ([B, L] bool) only: [n_predict, V]."""
        text_embeds = self.text.encode(masked_ids, attention_mask)
        fused = self.fuse(image_embeds, image_atts, text_embeds, attention_mask)
        return self.text.lm_head(fused[predict]).float()

    def clamp_temp(self) -> None:
        with torch.no_grad():
            self.temp.clamp_(*TEMP_RANGE)

    # ------------------------------------------------------------------ parameters

    def pretrained_parameter_names(self) -> set[str]:
        """Names loaded from pretrained checkpoints; every other parameter is new (trained with 2x lr)."""
        return ({f"vision.{n}" for n in self.vision.pretrained_names}
                | {f"text.{n}" for n in self.text.pretrained_names})


# ---------------------------------------------------------------------- checkpoints


def build_model(config: dict, tokenizer=None):
    """(model, tokenizer) from a run config (random or pretrained-directory initialisation)."""
    tokenizer = tokenizer or load_tokenizer(config["model"]["text"].get("tokenizer", "demo"))
    resolve_architecture(config["model"])
    return CCRKModel(config["model"], vocab_size=len(tokenizer)), tokenizer


def resolve_architecture(model_cfg: dict) -> dict:
    """Fill the architecture keys from pretrained directories' configs, so a checkpoint is self-contained."""
    vision, text = model_cfg["vision"], model_cfg["text"]
    if vision.get("init", "random") != "random":
        from transformers import SwinConfig

        c = SwinConfig.from_pretrained(vision["init"])
        vision.update(image_size=c.image_size, patch_size=c.patch_size, embed_dim=c.embed_dim,
                      depths=list(c.depths), num_heads=list(c.num_heads), window_size=c.window_size)
    if text.get("init", "random") != "random":
        from transformers import XLMRobertaConfig

        c = XLMRobertaConfig.from_pretrained(text["init"])
        text.update(hidden_size=c.hidden_size, num_heads=c.num_attention_heads,
                    intermediate_size=c.intermediate_size, max_position=c.max_position_embeddings)
    return model_cfg


def latest_checkpoint(run_dir: str) -> str | None:
    ckpt_root = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(ckpt_root):
        return None
    steps = sorted(d for d in os.listdir(ckpt_root)
                   if d.startswith("step-") and os.path.exists(os.path.join(ckpt_root, d, "model.safetensors")))
    return os.path.join(ckpt_root, steps[-1]) if steps else None


def save_model(model: CCRKModel, config: dict, ckpt_dir: str) -> None:
    from safetensors.torch import save_model as st_save

    with atomic.atomic_path(os.path.join(ckpt_dir, "model.safetensors")) as tmp:
        st_save(model, tmp)  # handles the tied LM-head / embedding weight
    atomic.write_json(os.path.join(ckpt_dir, "config.json"), config)


@contextmanager
def readable_weights(path: str) -> Iterator[None]:
    """A safetensors file read inside the block that is no safetensors file (random bytes, cut
    short, a foreign header) is one line naming it, not the library's traceback."""
    try:
        yield
    except SafetensorError as exc:
        raise CCRKError(f"{path} is not a readable safetensors file ({(str(exc).splitlines() or [''])[0][:200]}): "
                        "the checkpoint is damaged; save or copy it again") from None


def load_pretrained(run_or_dir: str, device: str | torch.device = "cpu", vision: dict | None = None):
    """(model, tokenizer, config) from a run dir (its latest checkpoint) or a checkpoint dir.

    ``vision`` overrides keys of ``config["model"]["vision"]`` (:data:`RESIZABLE_VISION_KEYS`),
    e.g. ``{"image_size": 384, "window_size": 12}`` to fine-tune or evaluate a 224 px / window 7
    pre-training at the authors' 384 px / window 12: the model is built at the new settings, every
    relative position bias table is interpolated to the new window, the window-tied buffers are the
    new model's, and the returned config carries the new vision block.
    """
    from safetensors.torch import load_model

    ckpt = run_or_dir
    if not os.path.exists(os.path.join(ckpt, "model.safetensors")):
        ckpt = latest_checkpoint(run_or_dir)
        if ckpt is None:
            raise CCRKError(f"{run_or_dir} has no checkpoint (expected checkpoints/step-*/model.safetensors)")
    with open(os.path.join(ckpt, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    if vision:
        config = _with_vision(config, vision)
    tok_dir = next((d for d in (os.path.join(ckpt, "tokenizer"),
                                os.path.join(os.path.dirname(os.path.dirname(ckpt)), "tokenizer"))
                    if os.path.isdir(d)), None)
    tokenizer = load_tokenizer(tok_dir or config["model"]["text"].get("tokenizer", "demo"))
    # Random init here: the checkpoint holds every weight, pretrained directories need not exist.
    model_cfg = json.loads(json.dumps(config["model"]))
    model_cfg["vision"]["init"] = model_cfg["text"]["init"] = "random"
    model = CCRKModel(model_cfg, vocab_size=len(tokenizer))
    weights = os.path.join(ckpt, "model.safetensors")
    with readable_weights(weights):
        if vision:
            _load_resized(model, weights, str(device))
        else:
            load_model(model, weights, device=str(device))
    model.to(device).eval()
    return model, tokenizer, config


def _with_vision(config: dict, vision: dict) -> dict:
    """A copy of the run config with ``vision`` overriding its vision block, checked to fit Swin."""
    unknown = sorted(set(vision) - set(RESIZABLE_VISION_KEYS))
    if unknown:
        raise CCRKError(f"vision overrides {unknown} change weight shapes; only {list(RESIZABLE_VISION_KEYS)} can")
    config = json.loads(json.dumps(config))
    config["model"]["vision"].update(vision)
    check_window_fits(config["model"]["vision"])
    return config


def _load_resized(model: CCRKModel, path: str, device: str) -> None:
    """Load a checkpoint saved at another window size: bias tables interpolated, as the authors'
    ``load_pretrained`` does; any ``relative_position_index`` / ``attn_mask`` buffer a checkpoint
    may hold (older transformers persisted the index) is dropped for the one the new model built."""
    from safetensors.torch import load_file

    state = load_file(path, device=device)
    for name in list(state):
        if "relative_position_bias_table" in name:
            window = model.get_submodule(name.rsplit(".", 1)[0]).window_size[0]
            state[name] = interpolate_relative_position_bias(state[name], window)
        elif "relative_position_index" in name or "attn_mask" in name:
            del state[name]
    missing, unexpected = model.load_state_dict(state, strict=False)
    # save_model writes one of each group of tied tensors; a missing name is fine if it shares a loaded one's storage.
    params = model.state_dict()
    loaded = {params[n].data_ptr() for n in state if n in params}
    missing = [n for n in missing if params[n].data_ptr() not in loaded]
    if missing or unexpected:
        raise CCRKError(f"{path}: missing weights {sorted(missing)}, unexpected {sorted(unexpected)}")
