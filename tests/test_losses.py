"""The 1-to-K contrastive loss and the MITM / CMLM sampling, against hand computations."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ccrk.losses import OneToKContrastiveLoss, mask_tokens, negative_weights, positive_weights, sample

torch.set_num_threads(1)


def reference_loss(images: list[list[float]], captions: list[list[list[float]]], temp: float) -> float:
    """Plain-Python 1-to-K loss: image i's captions are captions[i] (any number, K_i >= 1)."""
    dot = lambda a, b: sum(x * y for x, y in zip(a, b)) / temp  # noqa: E731
    texts = [(i, t) for i, caps in enumerate(captions) for t in caps]
    i2t = 0.0
    for i, img in enumerate(images):
        log_z = math.log(sum(math.exp(dot(img, t)) for _, t in texts))
        own = [t for j, t in texts if j == i]
        i2t += -sum((1 / len(own)) * (dot(img, t) - log_z) for t in own)
    t2i = 0.0
    for i, t in texts:
        log_z = math.log(sum(math.exp(dot(img, t)) for img in images))
        t2i += -(dot(images[i], t) - log_z)
    return (i2t / len(images) + t2i / len(texts)) / 2


def _unit(*v):
    n = math.sqrt(sum(x * x for x in v))
    return [x / n for x in v]


def test_loss_equals_hand_computed_reference():
    images = [_unit(1, 0), _unit(0, 1)]
    captions = [[_unit(1, 0.2), _unit(0.8, 0.6)], [_unit(0.1, 1), _unit(-0.3, 1)]]
    loss = OneToKContrastiveLoss()(torch.tensor(images), torch.tensor(captions), torch.ones(2, 2, dtype=torch.bool),
                                   torch.tensor(0.5))
    assert loss.item() == pytest.approx(reference_loss(images, captions, 0.5), rel=1e-6)


def test_soft_target_is_one_over_k():
    # One image, K = 3 identical captions: the i2t cross-entropy against (1/3, 1/3, 1/3) is log 3
    # (the target's entropy); t2i has a single candidate image, so 0.
    img = torch.tensor([[1.0, 0.0]])
    texts = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]]])
    loss = OneToKContrastiveLoss()(img, texts, torch.ones(1, 3, dtype=torch.bool), torch.tensor(0.1))
    assert loss.item() == pytest.approx(math.log(3) / 2, rel=1e-6)


def test_k1_reduces_to_standard_itc():
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(6, 8, generator=g), dim=-1)
    txt = F.normalize(torch.randn(6, 8, generator=g), dim=-1)
    temp = torch.tensor(0.07)
    logits = img @ txt.t() / temp
    standard = (F.cross_entropy(logits, torch.arange(6)) + F.cross_entropy(logits.t(), torch.arange(6))) / 2
    ours = OneToKContrastiveLoss()(img, txt[:, None, :], torch.ones(6, 1, dtype=torch.bool), temp)
    assert ours.item() == pytest.approx(standard.item(), rel=1e-6)


def test_missing_captions_are_masked_out():
    g = torch.Generator().manual_seed(1)
    img = F.normalize(torch.randn(3, 4, generator=g), dim=-1)
    txt = F.normalize(torch.randn(3, 3, 4, generator=g), dim=-1).requires_grad_()
    valid = torch.tensor([[True, True, True], [True, False, False], [True, False, True]])
    loss = OneToKContrastiveLoss()(img, txt, valid, torch.tensor(0.2))
    kept = [[txt[i, k].tolist() for k in range(3) if valid[i, k]] for i in range(3)]
    assert loss.item() == pytest.approx(reference_loss(img.tolist(), kept, 0.2), rel=1e-5)
    loss.backward()
    assert txt.grad[~valid].abs().max() == 0  # a missing caption gets no gradient
    assert txt.grad[valid].abs().max() > 0
    # ...and whatever sits in its slot does not change the loss.
    garbage = txt.detach().clone()
    garbage[~valid] = 5.0
    assert OneToKContrastiveLoss()(img, garbage, valid, torch.tensor(0.2)).item() == pytest.approx(loss.item(), rel=1e-6)


def test_hard_positive_weight_grows_as_similarity_falls():
    sim = torch.tensor([[0.9, 0.5, 0.1, 0.3]])
    valid = torch.tensor([[True, True, True, False]])
    w = positive_weights(sim, valid, 0.07)
    assert w[0, 3] == 0 and w.sum().item() == pytest.approx(1.0)
    assert w[0, 2] > w[0, 1] > w[0, 0]
    uniform = positive_weights(sim, valid, 0.07, hard=False)
    assert torch.equal(uniform, torch.tensor([[1.0, 1.0, 1.0, 0.0]]))


def test_hard_negatives_follow_similarity_and_skip_own_captions():
    sim = torch.tensor([[0.9, 0.8, 0.7, 0.0], [0.1, 0.2, 0.95, 0.9]])
    own = torch.tensor([[True, False, False, False], [False, False, True, True]])
    w = negative_weights(sim, own, 0.07)
    assert (w[own] == 0).all()
    assert w[0, 1] > w[0, 2] > w[0, 3]
    draws = sample(w.repeat(500, 1), torch.Generator().manual_seed(0)).reshape(500, 2)
    assert not own[0, draws[:, 0]].any() and not own[1, draws[:, 1]].any()
    assert (draws[:, 0] == 1).float().mean() > 0.5  # the most similar other caption dominates
    with pytest.raises(ValueError, match="at least two images"):
        negative_weights(torch.zeros(1, 2), torch.ones(1, 2, dtype=torch.bool), 0.07)


def test_masking_rates_and_specials():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 500, (400, 30), generator=g)
    ids[:, 0], ids[:, -1] = 0, 2  # <s> ... </s>
    atts = torch.ones_like(ids)
    atts[:200, 20:] = 0
    ids[:200, 20:] = 1  # padding
    masked, predict = mask_tokens(ids, atts, mask_id=599, vocab_size=599, special_ids=[0, 1, 2, 3, 599],
                                  mask_prob=0.15, generator=g)
    assert not predict[:, 0].any() and not predict[:, -1].any() and not predict[:200, 20:].any()
    assert predict.any(dim=1).all()
    candidates = atts.bool().sum() - 2 * 400
    assert predict.sum().item() / candidates.item() == pytest.approx(0.15, abs=0.02)
    share = lambda m: (m & predict).sum().item() / predict.sum().item()  # noqa: E731
    assert share(masked == 599) == pytest.approx(0.8, abs=0.04)
    assert share((masked != 599) & (masked != ids)) == pytest.approx(0.1, abs=0.03)  # random (rarely == original)
    assert torch.equal(masked[~predict], ids[~predict])
