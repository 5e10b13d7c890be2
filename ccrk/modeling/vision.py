"""The image encoder: a transformers ``SwinModel`` whose output is [pooled CLS, patch tokens].

The CLS token is the average of the final (layer-normed) patch tokens, as in X-VLM/CCLM, so the
contrastive feature and the fusion encoder see the same token sequence.
"""
from __future__ import annotations

import os

import torch
from torch import nn

from storage.errors import CCRKError


def swin_config(cfg: dict):
    """A SwinConfig from our YAML ``model.vision`` block (ignored keys: init)."""
    from transformers import SwinConfig

    return SwinConfig(image_size=cfg["image_size"], patch_size=cfg.get("patch_size", 4),
                      embed_dim=cfg["embed_dim"], depths=list(cfg["depths"]), num_heads=list(cfg["num_heads"]),
                      window_size=cfg.get("window_size", 7), drop_path_rate=cfg.get("drop_path", 0.1),
                      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


class VisionEncoder(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        from transformers import SwinModel

        init = cfg.get("init", "random")
        self.pretrained_names: set[str] = set()
        if init != "random":
            if not os.path.isdir(init):
                raise CCRKError(f"vision init directory {init} does not exist (expected a local HF Swin checkpoint)")
            self.swin = SwinModel.from_pretrained(init, add_pooling_layer=True,
                                                  drop_path_rate=cfg.get("drop_path", 0.1))
            if self.swin.config.image_size != cfg["image_size"]:
                raise CCRKError(f"{init}: Swin image_size {self.swin.config.image_size} != config {cfg['image_size']}")
            self.pretrained_names = {f"swin.{n}" for n, _ in self.swin.named_parameters()}
        else:
            self.swin = SwinModel(swin_config(cfg), add_pooling_layer=True)
        self.width = self.swin.num_features

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.swin(pixel_values=pixel_values)
        return torch.cat([out.pooler_output.unsqueeze(1), out.last_hidden_state], dim=1)
