"""The image encoder: a transformers ``SwinModel`` whose output is [pooled CLS, patch tokens].

The CLS token is the average of the final (layer-normed) patch tokens, as in X-VLM/CCLM, so the
contrastive feature and the fusion encoder see the same token sequence. A model pre-trained at
one window size is fine-tuned at another (224 px / window 7 -> 384 px / window 12, as the
authors do) through :func:`interpolate_relative_position_bias`.
"""
from __future__ import annotations

import os

import numpy as np
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


def check_window_fits(cfg: dict) -> None:
    """Raise unless every Swin stage's feature map is a whole number of windows.

    transformers' ``SwinModel`` keeps one ``window_size`` for all stages: a stage whose map equals
    the window runs one unshifted window (384 px, patch 4, window 12: the last stage is 12 x 12),
    a smaller map fails on the bias shape, and a map that is no multiple of the window is
    zero-padded without a mask, where the authors' Swin requires whole windows.
    """
    side, patch, window = cfg["image_size"], cfg.get("patch_size", 4), cfg.get("window_size", 7)
    if side % (patch * 2 ** (len(cfg["depths"]) - 1)):
        raise CCRKError(f"image_size {side} is not a multiple of patch_size x 2^(stages-1) = "
                        f"{patch * 2 ** (len(cfg['depths']) - 1)}")
    for stage in range(len(cfg["depths"])):
        res = side // patch // 2 ** stage
        if res < window or res % window:
            raise CCRKError(f"Swin stage {stage} is {res} x {res} patches, not a multiple of window_size {window}")


def _geometric_offsets(src_half: int, dst_half: int) -> np.ndarray:
    """Source offsets -d_n..0..d_n spaced 1, q, q^2, ..., with q found by bisection so d_n reaches
    about ``dst_half`` (BEiT's / the authors' grid): near offsets keep their spacing, far ones spread."""
    lo, hi = 1.01, 1.5
    while hi - lo > 1e-6:
        q = (lo + hi) / 2.0
        if (1.0 - q ** src_half) / (1.0 - q) > dst_half:
            hi = q
        else:
            lo = q
    offsets, cur = [], 1.0
    for i in range(src_half):
        offsets.append(cur)
        cur += q ** (i + 1)
    return np.array([-d for d in reversed(offsets)] + [0.0] + offsets)


def interpolate_relative_position_bias(table: torch.Tensor, dst_window: int) -> torch.Tensor:
    """A Swin ``relative_position_bias_table`` [(2w-1)^2, heads] resized to window ``dst_window``:
    [(2W-1)^2, heads], float32 as the authors' (the table itself when the sizes match).

    Per head, the (2w-1) x (2w-1) grid (rows: vertical offset, columns: horizontal) sits on
    :func:`_geometric_offsets` and a bicubic interpolating spline is read at the integer offsets
    -(W-1)..W-1. That is what the authors' ``interp2d(x, y, z, kind='cubic')`` computed on a
    rectangular grid: FITPACK's regrid with s=0, which ``RectBivariateSpline`` calls, on ``z.T``
    since interp2d's x runs along z's columns; points past the grid are clamped to its edge by both.
    """
    src_side, dst_side = int(table.shape[0] ** 0.5), 2 * dst_window - 1
    if src_side * src_side != table.shape[0] or src_side % 2 == 0:
        raise CCRKError(f"a relative position table has {table.shape[0]} rows, not (2w-1)^2")
    if src_side == dst_side:
        return table
    if src_side < 5:
        raise CCRKError(f"a window of {(src_side + 1) // 2} has too few offsets for a bicubic resize (needs 3+)")
    from scipy.interpolate import RectBivariateSpline  # about 1 s to import: only when a table is resized

    src = _geometric_offsets(src_side // 2, dst_side // 2)
    dst = np.arange(-(dst_side // 2), dst_side // 2 + 1, dtype=np.float64)
    heads = []
    for head in table.detach().float().cpu().unbind(dim=1):
        grid = head.reshape(src_side, src_side).numpy()
        spline = RectBivariateSpline(src, src, grid.T, kx=3, ky=3, s=0)
        heads.append(torch.from_numpy(spline(dst, dst).T.astype(np.float32)).reshape(-1))
    return torch.stack(heads, dim=1).to(table.device)


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
