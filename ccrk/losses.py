"""CCRk's losses: 1-to-K contrastive, hard-mined sampling for MITM/CMLM, MLM masking.

Shapes: ``B`` images in the local batch, ``K`` caption slots per image (one per language, some
missing: ``text_valid`` is False there), ``N`` images in the gathered (global) batch. Text rows are
image-major: caption ``k`` of image ``b`` is row ``b*K + k``.

Where the paper and the authors' code (github.com/BUAADreamer/CCRK, 06449d2) differ, each form is
a named option (``loss:`` in the config, defaults in ``ccrk.specs.LossSpec``):

- ``kcl_norm``, the 1-to-K normalisation: ``code`` | ``paper`` | ``soft`` (:func:`one_to_k_contrastive`);
- ``itm_positive``, the MITM positive: ``code`` | ``paper`` | ``softmax`` | ``uniform`` (:func:`positive_weights`);
- ``mask_style``, MLM masking: ``span`` (the code's, :func:`span_mask_tokens`) | ``bernoulli`` (:func:`mask_tokens`);
- ``gather_grad``, the gradient of features gathered across ranks: ``exact`` | ``local`` (:func:`gather_features`);
- ``temp_clamp`` (in ``ccrk.objectives``): the code clamps the temperature at every pre-training forward.

The fine-tuning contrastive loss (:func:`id_contrastive_loss`) and the MLM loss from logits
(:func:`mlm_loss`) are here too, tested against the code's numbers (tests/test_parity_losses.py).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

KCL_NORMS = ("code", "paper", "soft")
POSITIVE_MODES = ("code", "paper", "softmax", "uniform")
GATHER_GRADS = ("exact", "local")
MASK_STYLES = ("span", "bernoulli")
IGNORE_INDEX = -100  # MLM labels at unmasked / padded positions


def _choice(name: str, value, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}, not {value!r}")


# ---------------------------------------------------------------------- gathering across ranks


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, exact: bool):
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.rows, ctx.exact = x.shape[0], exact
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        if ctx.exact:
            # Every rank computes the same global loss: summing their gradients and keeping the local
            # slice makes DDP's gradient average equal the one-process gradient on the whole batch.
            dist.all_reduce(grad)
        start = dist.get_rank() * ctx.rows
        return grad[start:start + ctx.rows], None


def gather_features(x: torch.Tensor, grad: str = "exact") -> torch.Tensor:
    """All ranks' rows concatenated in rank order; gradients reach the local slice.

    ``grad="exact"``: the gradient of the loss as written (DDP's average then equals one process on
    the whole batch). ``grad="local"``: the authors' AllGather, which keeps this rank's slice of its
    own gradient without summing the other ranks'; after DDP's average the gradient through the
    gathered features is the exact one divided by the world size (the temperature's is unchanged).
    """
    _choice("gather_grad", grad, GATHER_GRADS)
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    if not x.requires_grad:
        y = x.to(torch.uint8) if x.dtype == torch.bool else x  # gloo gathers no bools
        parts = [torch.empty_like(y) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, y.contiguous())
        return torch.cat(parts, dim=0).to(x.dtype)
    return _GatherWithGrad.apply(x, grad == "exact")


# ---------------------------------------------------------------------- contrastive losses


def one_to_k_contrastive(image_feat: torch.Tensor, text_feat: torch.Tensor, text_valid: torch.Tensor,
                         temp: torch.Tensor | float, norm: str, gather_grad: str = "exact") -> torch.Tensor:
    """The 1-to-K image-text contrastive loss on the batch gathered across ranks.

    ``image_feat`` [B, E], ``text_feat`` [B, K, E], ``text_valid`` [B, K]. Logits are image vs every
    present caption ([N, N*K] / temp); missing captions are neither candidates nor positives.
    Image-to-text, with ``P_i`` the present captions of image i:

    - ``code`` (the authors' get_unialign_contrastive_loss, need_divm=0): 0/1 labels, i.e.
      ``-sum_{k in P_i} log p(k | i)``, averaged over images; text-to-image is the cross-entropy to
      the caption's own image, averaged over present captions; the loss is (i2t + t2i) / 2 / K. With
      missing captions the division stays by the K slots (a constant), so every present positive term
      keeps the weight it has in a complete batch;
    - ``paper`` (Eq. 4-6 as we read them: the K positive terms summed; the code's need_divm=1):
      the same without the division by K;
    - ``soft``: soft targets 1/|P_i| on the present captions, (i2t + t2i) / 2 (ccrk before issue 22).

    Every image is expected to have at least one caption (the data stream skips the others). With
    K = 1 all three are the standard (CLIP / ALBEF) contrastive loss.
    """
    _choice("kcl_norm", norm, KCL_NORMS)
    image_feat = gather_features(image_feat, gather_grad)
    text_feat = gather_features(text_feat, gather_grad)
    valid = gather_features(text_valid)
    n, k = valid.shape
    logits = image_feat @ text_feat.reshape(n * k, -1).t() / temp  # [N, N*K]
    owner = torch.arange(n, device=logits.device).repeat_interleave(k)  # image of each caption
    valid = valid.reshape(-1)
    positive = (owner[None, :] == torch.arange(n, device=logits.device)[:, None]) & valid[None, :]
    logits = logits.masked_fill(~valid[None, :], float("-inf"))
    log_p = F.log_softmax(logits, dim=1).masked_fill(~valid[None, :], 0.0)  # 0 * -inf would be nan
    targets = positive.float()
    if norm == "soft":
        targets = targets / targets.sum(dim=1, keepdim=True).clamp(min=1)
    loss_i2t = -(targets * log_p).sum(dim=1).mean()
    loss_t2i = F.cross_entropy(logits.t()[valid], owner[valid])
    loss = (loss_i2t + loss_t2i) / 2
    return loss / k if norm == "code" else loss


class OneToKContrastiveLoss(nn.Module):
    """:func:`one_to_k_contrastive` as a module holding its options."""

    def __init__(self, norm: str, gather_grad: str = "exact"):
        super().__init__()
        _choice("kcl_norm", norm, KCL_NORMS)
        _choice("gather_grad", gather_grad, GATHER_GRADS)
        self.norm, self.gather_grad = norm, gather_grad

    def forward(self, image_feat: torch.Tensor, text_feat: torch.Tensor, text_valid: torch.Tensor,
                temp: torch.Tensor) -> torch.Tensor:
        return one_to_k_contrastive(image_feat, text_feat, text_valid, temp, self.norm, self.gather_grad)


def id_contrastive_loss(image_feat: torch.Tensor, text_feat: torch.Tensor, temp: torch.Tensor | float,
                        image_ids: torch.Tensor | None = None, gather_grad: str = "exact") -> torch.Tensor:
    """Fine-tuning contrastive loss on row-aligned pairs (image_feat [M, E], text_feat [M, E]), gathered
    across ranks: with ``image_ids``, the labels of a row are spread evenly over every pair sharing its
    image id (eq(id, id^T) / row sums) in both directions; without, pair i is i's only positive (the
    authors' get_contrastive_loss)."""
    image_feat, text_feat = gather_features(image_feat, gather_grad), gather_features(text_feat, gather_grad)
    logits = image_feat @ text_feat.t() / temp
    if image_ids is None:
        labels = torch.arange(logits.shape[0], device=logits.device)
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
    ids = gather_features(image_ids.reshape(-1))
    positive = (ids[:, None] == ids[None, :]).float()
    labels = positive / positive.sum(dim=1, keepdim=True)  # symmetric support: serves both directions
    loss_i2t = -(F.log_softmax(logits, dim=1) * labels).sum(dim=1).mean()
    loss_t2i = -(F.log_softmax(logits.t(), dim=1) * labels).sum(dim=1).mean()
    return (loss_i2t + loss_t2i) / 2


def mlm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Masked-LM cross-entropy averaged over the predicted tokens: logits [..., V], labels [...] with
    ``IGNORE_INDEX`` where nothing is predicted (the reference's padded masked_ids)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=IGNORE_INDEX)


# ---------------------------------------------------------------------- sampling for MITM and CMLM


@torch.no_grad()
def similarity_weights(sim: torch.Tensor, temp: float | torch.Tensor,
                       candidates: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(sim / temp) + 1e-5 over each row's candidates, 0 elsewhere (the code's weights_i2t / t2i)."""
    logits = sim / temp
    if candidates is not None:
        logits = logits.masked_fill(~candidates, float("-inf"))
    w = F.softmax(logits.float(), dim=1) + 1e-5
    return w if candidates is None else w.masked_fill(~candidates, 0.0)


def _own_block(x: torch.Tensor, k: int) -> torch.Tensor:
    """[B, B*K] image-vs-all-captions -> [B, K]: each image against its own K caption slots."""
    b = x.shape[0]
    idx = torch.arange(b, device=x.device)
    return x.reshape(b, b, k)[idx, idx]


@torch.no_grad()
def positive_weights(sim: torch.Tensor, valid: torch.Tensor, temp: float | torch.Tensor, mode: str) -> torch.Tensor:
    """Sampling weights [B, K] of each image's present captions as its MITM (hard) positive.

    ``sim`` [B, B*K] is the cosine of every local image with every local caption slot (image-major;
    missing slots are ignored). With w_i2t = :func:`similarity_weights` (sim, temp) over the present
    captions and s = sim / temp:

    - ``code`` (the authors' neg_sample_type=1): max(w_i2t) + 1e-5 - w_i2t[b, own k], the max over
      the whole [B, B*K] matrix: the least similar own caption is the likeliest;
    - ``paper``: the code's neg_sample_type=2 (sim-based): max(s) + 1e-5 - s[b, own k]. Whether this is
      the paper's Eq. 8 is not verified; it is the code's alternative to its default;
    - ``softmax``: softmax(-s[b, own]) over the present own captions (ccrk before issue 22);
    - ``uniform``: every present caption alike.
    """
    _choice("itm_positive", mode, POSITIVE_MODES)
    b, k = valid.shape
    cand = valid.reshape(1, -1).expand(b, -1)
    if mode == "code":
        w_all = similarity_weights(sim, temp, cand)
        w = w_all[cand].max() + 1e-5 - _own_block(w_all, k)
    elif mode == "paper":
        s = sim.float() / temp
        w = s[cand].max() + 1e-5 - _own_block(s, k)
    elif mode == "softmax":
        w = F.softmax((-_own_block(sim.float(), k) / temp).masked_fill(~valid, float("-inf")), dim=1)
    else:
        w = valid.float()
    return w.masked_fill(~valid, 0.0)


@torch.no_grad()
def negative_weights(sim: torch.Tensor, exclude: torch.Tensor, temp: float | torch.Tensor,
                     hard: bool = True) -> torch.Tensor:
    """Weights over candidates ([R, M]): softmax similarity + 1e-5 (hard) or uniform, excluded ones
    zeroed after the softmax (as the code does: they still count in its normaliser)."""
    w = F.softmax(sim.float() / temp, dim=1) + 1e-5 if hard else torch.ones_like(sim, dtype=torch.float)
    w = w.masked_fill(exclude, 0.0)
    if bool((w.sum(dim=1) <= 0).any()):
        raise ValueError("MITM needs at least two images with captions in the local batch")
    return w


def sample(weights: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One index per row, in proportion to the row's weights."""
    return torch.multinomial(weights.float(), 1, generator=generator).squeeze(1)


@torch.no_grad()
def matching_negative_weights(image_feat: torch.Tensor, text_feat: torch.Tensor, valid: torch.Tensor,
                              pos_rows: torch.Tensor, temp: float | torch.Tensor,
                              hard: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(text weights [B, B*K], image weights [B, B]) for the MITM hard negatives of the local batch.

    Image b's negative caption is drawn over every present caption of the other images, from the
    image-to-text softmax of row b; the negative image of b's positive caption (flat row
    ``pos_rows[b]``) over the other images, from that caption's text-to-image softmax. Missing
    captions (zero rows of ``text_feat``) are left out of the softmax and never drawn.
    """
    b, k = valid.shape
    own_image = torch.arange(b, device=valid.device).repeat_interleave(k)[None, :] == \
        torch.arange(b, device=valid.device)[:, None]  # [B, B*K]
    missing = ~valid.reshape(1, -1).expand(b, -1)
    sim_i2t = (image_feat @ text_feat.t()).float().masked_fill(missing, float("-inf"))
    text_w = negative_weights(sim_i2t, own_image | missing, temp, hard)
    image_w = negative_weights((text_feat[pos_rows] @ image_feat.t()).float(),
                               torch.eye(b, dtype=torch.bool, device=valid.device), temp, hard)
    return text_w, image_w


# ---------------------------------------------------------------------- MLM masking


def _replace(input_ids: torch.Tensor, predict: torch.Tensor, mask_id: int, low: int, high: int,
             generator: torch.Generator | None) -> torch.Tensor:
    """The 80/10/10 rule on the ``predict`` positions: <mask>, a random id in [low, high), unchanged."""
    action = torch.rand(input_ids.shape, generator=generator, device=input_ids.device)
    masked = input_ids.clone()
    masked[predict & (action < 0.8)] = mask_id
    rand = predict & (action >= 0.8) & (action < 0.9)
    masked[rand] = torch.randint(low, high, input_ids.shape, generator=generator, device=input_ids.device)[rand]
    return masked


def mask_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor, mask_id: int, vocab_size: int,
                special_ids: list[int], mask_prob: float = 0.15, generator: torch.Generator | None = None,
                random_low: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking (``mask_style: bernoulli``): each non-special token is predicted with probability
    ``mask_prob`` (at least one per row); of those 80% become <mask>, 10% a random id in
    [random_low, vocab_size), 10% stay. Returns (masked_ids, predict [B, L] bool)."""
    dev = input_ids.device
    candidate = attention_mask.bool() & ~torch.isin(input_ids, torch.tensor(special_ids, device=dev))
    u = torch.rand(input_ids.shape, generator=generator, device=dev)
    predict = candidate & (u < mask_prob)
    # Rows where nothing was drawn predict their candidate with the smallest draw.
    none = ~predict.any(dim=1) & candidate.any(dim=1)
    first = u.masked_fill(~candidate, 2.0).argmin(dim=1)
    predict[none, first[none]] = True
    return _replace(input_ids, predict, mask_id, random_low, vocab_size, generator), predict


def span_mask_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor, mask_id: int, vocab_size: int,
                     mask_prob: float = 0.4, max_masks: int = 12, span_prob: float = 0.2, span_max: int = 3,
                     generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The authors' masking (``mask_style: span``, their TextMaskingGenerator without whole-word masking).

    A row of n attended tokens (<s> and </s> included) predicts n_pred = min(max_masks, max(1,
    round(n * mask_prob))) of them (round half to even, as Python's). Candidates are every attended
    token but the first (<s>; </s> can be picked), visited in random order: a visited token not yet
    chosen starts, with probability ``span_prob``, a span of randint(2, span_max) tokens (cut at the
    row's last token), else a single token, until n_pred are chosen; if the last span overshoots, a
    random n_pred of the chosen are kept. Each chosen token becomes <mask> with probability 0.8, else
    with probability 0.5 a random id uniform over the whole vocabulary [0, vocab_size), else stays.

    Every draw comes from ``generator`` in a fixed order and shape, so a seeded generator gives the
    same masks again (training stays resumable). Returns (masked_ids, predict [R, L] bool).
    """
    dev, (rows, length) = input_ids.device, input_ids.shape
    draw = lambda: torch.rand(rows, length, generator=generator, device=dev)  # noqa: E731
    order_key, span_u, trim_key = draw(), draw(), draw()
    span_len = torch.randint(2, max(2, span_max) + 1, (rows, length), generator=generator, device=dev)
    spans = span_prob > 0 and span_max >= 2
    # Per row, in token order: the attended positions (any padding layout), then the draws at them.
    atts = attention_mask.bool()
    tokens = torch.argsort((~atts).to(torch.int8), dim=1, stable=True)
    n = atts.sum(dim=1)
    index = torch.arange(length, device=dev)[None, :]
    visit_key = order_key.gather(1, tokens).masked_fill((index == 0) | (index >= n[:, None]), 2.0)  # <s> never
    visit = torch.argsort(visit_key, dim=1)
    starts_span = span_u.gather(1, tokens) < span_prob
    sizes, trim = span_len.gather(1, tokens), trim_key.gather(1, tokens)
    # The choice is sequential (a span may cover tokens visited later); on short rows, one caption
    # per image, it is cheapest in plain Python on one CPU copy of the draws.
    tokens, n, visit, starts_span, sizes, trim = (t.cpu().tolist()
                                                  for t in (tokens, n, visit, starts_span, sizes, trim))
    rows_hit, cols_hit = [], []
    for r in range(rows):
        if n[r] < 2:
            continue
        n_pred = min(max_masks, max(1, round(n[r] * mask_prob)))
        chosen: set[int] = set()
        for i in visit[r][:n[r] - 1]:
            if len(chosen) >= n_pred:
                break
            if i in chosen:
                continue
            size = sizes[r][i] if spans and starts_span[r][i] else 1
            chosen.update(range(i, min(i + size, n[r])))
        picked = sorted(chosen, key=trim[r].__getitem__)[:n_pred]  # a random n_pred of an overshoot
        rows_hit += [r] * len(picked)
        cols_hit += [tokens[r][i] for i in picked]
    predict = torch.zeros(rows, length, dtype=torch.bool)
    predict[rows_hit, cols_hit] = True
    predict = predict.to(dev)
    return _replace(input_ids, predict, mask_id, 0, vocab_size, generator), predict
