"""CCRk's losses: 1-to-K contrastive, hard-mined sampling for MITM/CMLM, BERT-style masking.

Shapes: ``B`` images in the local batch, ``K`` caption slots per image (one per language, some
missing: ``text_valid`` is False there), ``N`` images in the gathered (global) batch.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.rows = x.shape[0]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad):
        # Every rank computes the same global loss: summing their gradients and keeping the local
        # slice makes DDP's gradient average equal the one-process gradient on the whole batch.
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        start = dist.get_rank() * ctx.rows
        return grad[start:start + ctx.rows]


def gather_features(x: torch.Tensor) -> torch.Tensor:
    """All ranks' rows concatenated in rank order; gradients reach the local slice."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    if not x.requires_grad:
        y = x.to(torch.uint8) if x.dtype == torch.bool else x  # gloo gathers no bools
        parts = [torch.empty_like(y) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, y.contiguous())
        return torch.cat(parts, dim=0).to(x.dtype)
    return _GatherWithGrad.apply(x)


class OneToKContrastiveLoss(nn.Module):
    """Image-to-text: soft target 1/K_i on image i's K_i captions; text-to-image: own image.

    With K = 1 this is the standard (CLIP / ALBEF) image-text contrastive loss.
    """

    def forward(self, image_feat: torch.Tensor, text_feat: torch.Tensor, text_valid: torch.Tensor,
                temp: torch.Tensor) -> torch.Tensor:
        image_feat, text_feat, valid = gather_features(image_feat), gather_features(text_feat), gather_features(text_valid)
        n, k = valid.shape
        logits = image_feat @ text_feat.reshape(n * k, -1).t() / temp  # [N, N*K]
        owner = torch.arange(n, device=logits.device).repeat_interleave(k)  # image of each caption
        valid = valid.reshape(-1)
        # The 1-to-K soft labels: 1/K_i on each of image i's present captions.
        targets = (owner[None, :] == torch.arange(n, device=logits.device)[:, None]) & valid[None, :]
        targets = targets.float() / targets.sum(dim=1, keepdim=True).clamp(min=1)
        logits = logits.masked_fill(~valid[None, :], float("-inf"))  # missing captions are not candidates
        log_p = F.log_softmax(logits, dim=1).masked_fill(~valid[None, :], 0.0)
        loss_i2t = -(targets * log_p).sum(dim=1).mean()
        loss_t2i = F.cross_entropy(logits.t()[valid], owner[valid])
        return (loss_i2t + loss_t2i) / 2


# ---------------------------------------------------------------------- sampling for MITM and CMLM


@torch.no_grad()
def positive_weights(sim_own: torch.Tensor, valid: torch.Tensor, temp: float | torch.Tensor,
                     hard: bool = True) -> torch.Tensor:
    """Weights over each image's K captions ([B, K]): growing as similarity falls (hard) or uniform."""
    if hard:
        w = F.softmax((-sim_own / temp).masked_fill(~valid, float("-inf")), dim=1)
    else:
        w = valid.float()
    return w.masked_fill(~valid, 0.0)


@torch.no_grad()
def negative_weights(sim: torch.Tensor, exclude: torch.Tensor, temp: float | torch.Tensor,
                     hard: bool = True) -> torch.Tensor:
    """Weights over candidates ([R, M]): softmax similarity (hard) or uniform, excluded ones zeroed."""
    w = F.softmax(sim / temp, dim=1) + 1e-5 if hard else torch.ones_like(sim)
    w = w.masked_fill(exclude, 0.0)
    if bool((w.sum(dim=1) <= 0).any()):
        raise ValueError("MITM needs at least two images with captions in the local batch")
    return w


def sample(weights: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One index per row, in proportion to the row's weights."""
    return torch.multinomial(weights.float(), 1, generator=generator).squeeze(1)


def mask_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor, mask_id: int, vocab_size: int,
                special_ids: list[int], mask_prob: float = 0.15, generator: torch.Generator | None = None,
                random_low: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking: ``mask_prob`` of the tokens (at least one per row) to predict; of those 80%
    become <mask>, 10% a random token, 10% stay. Returns (masked_ids, predict [B, L] bool)."""
    dev = input_ids.device
    candidate = attention_mask.bool() & ~torch.isin(input_ids, torch.tensor(special_ids, device=dev))
    u = torch.rand(input_ids.shape, generator=generator, device=dev)
    predict = candidate & (u < mask_prob)
    # Rows where nothing was drawn predict their candidate with the smallest draw.
    none = ~predict.any(dim=1) & candidate.any(dim=1)
    first = u.masked_fill(~candidate, 2.0).argmin(dim=1)
    predict[none, first[none]] = True
    action = torch.rand(input_ids.shape, generator=generator, device=dev)
    masked = input_ids.clone()
    masked[predict & (action < 0.8)] = mask_id
    rand = predict & (action >= 0.8) & (action < 0.9)
    masked[rand] = torch.randint(random_low, vocab_size, input_ids.shape, generator=generator, device=dev)[rand]
    return masked, predict
