"""The 1-to-K contrastive loss, the MITM / CMLM sampling and the loss options, against hand computations.

The authors' numbers are checked in test_parity_losses.py; here each form is computed by hand.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ccrk.losses import (KCL_NORMS, OneToKContrastiveLoss, mask_tokens, matching_negative_weights, negative_weights,
                         positive_weights, sample, similarity_weights)
from ccrk.objectives import LOSS_DEFAULTS, loss_config

torch.set_num_threads(1)


def reference_loss(images: list[list[float]], captions: list[list[list[float]]], temp: float,
                   norm: str = "soft", k_slots: int | None = None) -> float:
    """Plain-Python 1-to-K loss: image i's captions are captions[i] (any number, K_i >= 1). ``soft``:
    targets 1/K_i; ``paper``: the K_i positive terms summed; ``code``: that divided by ``k_slots``."""
    dot = lambda a, b: sum(x * y for x, y in zip(a, b)) / temp  # noqa: E731
    texts = [(i, t) for i, caps in enumerate(captions) for t in caps]
    i2t = 0.0
    for i, img in enumerate(images):
        log_z = math.log(sum(math.exp(dot(img, t)) for _, t in texts))
        own = [t for j, t in texts if j == i]
        weight = 1 / len(own) if norm == "soft" else 1.0
        i2t += -sum(weight * (dot(img, t) - log_z) for t in own)
    t2i = 0.0
    for i, t in texts:
        log_z = math.log(sum(math.exp(dot(img, t)) for img in images))
        t2i += -(dot(images[i], t) - log_z)
    loss = (i2t / len(images) + t2i / len(texts)) / 2
    return loss / k_slots if norm == "code" else loss


def _unit(*v):
    n = math.sqrt(sum(x * x for x in v))
    return [x / n for x in v]


@pytest.mark.parametrize("norm", KCL_NORMS)
def test_loss_equals_hand_computed_reference(norm):
    images = [_unit(1, 0), _unit(0, 1)]
    captions = [[_unit(1, 0.2), _unit(0.8, 0.6)], [_unit(0.1, 1), _unit(-0.3, 1)]]
    loss = OneToKContrastiveLoss(norm)(torch.tensor(images), torch.tensor(captions), torch.ones(2, 2, dtype=torch.bool),
                                       torch.tensor(0.5))
    assert loss.item() == pytest.approx(reference_loss(images, captions, 0.5, norm, k_slots=2), rel=1e-6)


def test_code_norm_is_paper_over_k_and_default():
    g = torch.Generator().manual_seed(2)
    img = F.normalize(torch.randn(4, 8, generator=g), dim=-1)
    txt = F.normalize(torch.randn(4, 3, 8, generator=g), dim=-1)
    valid, temp = torch.ones(4, 3, dtype=torch.bool), torch.tensor(0.07)
    code, paper, soft = (OneToKContrastiveLoss(n)(img, txt, valid, temp).item() for n in ("code", "paper", "soft"))
    assert code == pytest.approx(paper / 3, rel=1e-6)
    # The code's i2t over K equals the soft i2t; only its t2i half is also divided by K.
    logits = img @ txt.reshape(12, 8).t() / temp
    t2i = F.cross_entropy(logits.t(), torch.arange(4).repeat_interleave(3)).item()
    assert code == pytest.approx(soft - t2i / 2 + t2i / 6, rel=1e-5)
    assert LOSS_DEFAULTS["kcl_norm"] == "code"


def test_soft_target_is_one_over_k():
    # One image, K = 3 identical captions: the i2t cross-entropy against (1/3, 1/3, 1/3) is log 3
    # (the target's entropy); t2i has a single candidate image, so 0.
    img = torch.tensor([[1.0, 0.0]])
    texts = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]]])
    loss = OneToKContrastiveLoss("soft")(img, texts, torch.ones(1, 3, dtype=torch.bool), torch.tensor(0.1))
    assert loss.item() == pytest.approx(math.log(3) / 2, rel=1e-6)
    # 0/1 labels: the sum of three log(1/3) terms, then / 2 (t2i is 0), then / K (code) or not (paper).
    code = OneToKContrastiveLoss("code")(img, texts, torch.ones(1, 3, dtype=torch.bool), torch.tensor(0.1))
    paper = OneToKContrastiveLoss("paper")(img, texts, torch.ones(1, 3, dtype=torch.bool), torch.tensor(0.1))
    assert code.item() == pytest.approx(math.log(3) / 2, rel=1e-6)
    assert paper.item() == pytest.approx(3 * math.log(3) / 2, rel=1e-6)


@pytest.mark.parametrize("norm", KCL_NORMS)
def test_k1_reduces_to_standard_itc(norm):
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(6, 8, generator=g), dim=-1)
    txt = F.normalize(torch.randn(6, 8, generator=g), dim=-1)
    temp = torch.tensor(0.07)
    logits = img @ txt.t() / temp
    standard = (F.cross_entropy(logits, torch.arange(6)) + F.cross_entropy(logits.t(), torch.arange(6))) / 2
    ours = OneToKContrastiveLoss(norm)(img, txt[:, None, :], torch.ones(6, 1, dtype=torch.bool), temp)
    assert ours.item() == pytest.approx(standard.item(), rel=1e-6)


@pytest.mark.parametrize("norm", KCL_NORMS)
def test_missing_captions_are_masked_out(norm):
    g = torch.Generator().manual_seed(1)
    img = F.normalize(torch.randn(3, 4, generator=g), dim=-1)
    txt = F.normalize(torch.randn(3, 3, 4, generator=g), dim=-1).requires_grad_()
    valid = torch.tensor([[True, True, True], [True, False, False], [True, False, True]])
    loss = OneToKContrastiveLoss(norm)(img, txt, valid, torch.tensor(0.2))
    kept = [[txt[i, k].tolist() for k in range(3) if valid[i, k]] for i in range(3)]
    # code: divided by the K = 3 slots, not by the present count.
    assert loss.item() == pytest.approx(reference_loss(img.tolist(), kept, 0.2, norm, k_slots=3), rel=1e-5)
    loss.backward()
    assert txt.grad[~valid].abs().max() == 0  # a missing caption gets no gradient
    assert txt.grad[valid].abs().max() > 0
    # ...and whatever sits in its slot does not change the loss.
    garbage = txt.detach().clone()
    garbage[~valid] = 5.0
    again = OneToKContrastiveLoss(norm)(img, garbage, valid, torch.tensor(0.2))
    assert again.item() == pytest.approx(loss.item(), rel=1e-6)


def _own_sim(rows: list[list[float]]) -> torch.Tensor:
    """[B, B*K] cosines where each image's own K slots hold ``rows[b]`` and the other images' hold 0."""
    b, k = len(rows), len(rows[0])
    sim = torch.zeros(b, b * k)
    for i, row in enumerate(rows):
        sim[i, i * k:(i + 1) * k] = torch.tensor(row)
    return sim


def test_code_hard_positive_is_max_weight_minus_softmax_over_all_texts():
    sim = _own_sim([[0.9, 0.5, 0.1, 0.3], [0.2, 0.7, 0.4, 0.6]])
    sim[0, 4:] = torch.tensor([0.95, 0.0, 0.0, 0.0])  # another image's caption: in the softmax and the max
    valid = torch.tensor([[True, True, True, False], [True, True, True, True]])
    w = positive_weights(sim, valid, 0.07, "code")
    all_w = similarity_weights(sim, 0.07, valid.reshape(1, -1).expand(2, -1))
    assert torch.allclose(all_w[0], F.softmax((sim[0] / 0.07).masked_fill(~valid.reshape(-1), float("-inf")), 0) + 1e-5
                          * valid.reshape(-1))
    max_weight = all_w.max() + 1e-5
    assert torch.allclose(w[0, :3], max_weight - all_w[0, :3]) and w[0, 3] == 0
    assert torch.allclose(w[1], max_weight - all_w[1, 4:])
    assert w[0, 2] > w[0, 1] > w[0, 0] > 0  # the least similar own caption is the likeliest
    assert LOSS_DEFAULTS["itm_positive"] == "code"
    assert loss_config({"loss": {"itm_positive": "hard"}})["itm_positive"] == "code"  # the old name


def test_paper_softmax_and_uniform_positive_weights():
    sim = _own_sim([[0.9, 0.5, 0.1, 0.3]])
    valid = torch.tensor([[True, True, True, False]])
    paper = positive_weights(sim, valid, 0.07, "paper")  # the code's neg_sample_type=2
    assert torch.allclose(paper[0, :3], 0.9 / 0.07 + 1e-5 - sim[0, :3] / 0.07, atol=1e-5) and paper[0, 3] == 0
    assert paper[0, 0] > 0  # the most similar caption keeps a small weight
    soft = positive_weights(sim, valid, 0.07, "softmax")
    assert soft[0, 3] == 0 and soft.sum().item() == pytest.approx(1.0)
    assert torch.allclose(soft[0, :3], F.softmax(-sim[0, :3] / 0.07, 0))
    uniform = positive_weights(sim, valid, 0.07, "uniform")
    assert torch.equal(uniform, torch.tensor([[1.0, 1.0, 1.0, 0.0]]))
    with pytest.raises(ValueError, match="itm_positive must be one of"):
        positive_weights(sim, valid, 0.07, "hardest")


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


def test_matching_negatives_skip_own_and_missing_captions():
    g = torch.Generator().manual_seed(3)
    img = F.normalize(torch.randn(3, 4, generator=g), dim=-1)
    txt = F.normalize(torch.randn(6, 4, generator=g), dim=-1)
    valid = torch.tensor([[True, True], [True, False], [False, True]])
    txt[~valid.reshape(-1)] = 0.0
    pos_rows = torch.tensor([1, 2, 5])
    text_w, image_w = matching_negative_weights(img, txt, valid, pos_rows, 0.1)
    # Image 0: softmax over the 4 present captions + 1e-5, its own two zeroed.
    present = valid.reshape(-1)
    expected = F.softmax((img[0] @ txt[present].t()) / 0.1, 0) + 1e-5
    assert torch.allclose(text_w[0, present], torch.cat([torch.zeros(2), expected[2:]]))
    assert (text_w[:, ~present] == 0).all() and text_w[1, 2] == 0 and text_w[2, 5] == 0
    # The negative image of image b's positive caption: softmax over images, image b zeroed.
    assert torch.allclose(image_w[2], (F.softmax(txt[5] @ img.t() / 0.1, 0) + 1e-5) * torch.tensor([1.0, 1.0, 0.0]))


def test_loss_config_checks_values_and_keys():
    cfg = loss_config({})
    assert (cfg["mask_style"], cfg["mask_prob"], cfg["max_masks"], cfg["mask_span_prob"], cfg["mask_span_max"]) == \
        ("span", 0.4, 12, 0.2, 3)
    assert cfg["temp_clamp"] is True and cfg["gather_grad"] == "exact"
    for bad, message in [({"kcl_norm": "mean"}, "loss.kcl_norm must be one of code, paper, soft"),
                         ({"itm_positive": "x"}, "loss.itm_positive must be one of"),
                         ({"gather_grad": "sum"}, "loss.gather_grad must be one of exact, local"),
                         ({"mask_style": "whole-word"}, "loss.mask_style must be one of span, bernoulli"),
                         ({"mask_prob": 1.5}, "loss.mask_prob is out of range"),
                         ({"max_masks": 0}, "loss.max_masks is out of range"),
                         ({"temp_clamp": "no"}, "loss.temp_clamp must be true or false"),
                         ({"hard_positive": "code"}, "loss: unknown key 'hard_positive'")]:
        with pytest.raises(ValueError, match=message):
            loss_config({"loss": bad})


def test_bernoulli_masking_rates_and_specials():  # mask_style: bernoulli (the span masker: test_parity_losses.py)
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


class _ContrastiveOnlyModel(torch.nn.Module):
    """Features only (``fusion: false``): enough for CCRKObjective's contrastive path."""

    def __init__(self, temp: float):
        super().__init__()
        self.temp = torch.nn.Parameter(torch.tensor(temp))
        g = torch.Generator().manual_seed(4)
        self.img = F.normalize(torch.randn(3, 8, generator=g), dim=-1)
        self.txt = F.normalize(torch.randn(9, 8, generator=g), dim=-1)

    def clamp_temp(self):
        with torch.no_grad():
            self.temp.clamp_(0.001, 0.5)

    def encode_image(self, pixel_values):
        return None, self.img

    def encode_text_cls(self, ids, atts):
        return None, self.txt

    def text_tokens(self, state, rows):  # fusion only
        raise AssertionError("no MITM with fusion: false")


@pytest.mark.parametrize("clamp", [True, False])
def test_temp_clamp_option(clamp):
    from ccrk.objectives import CCRKObjective

    class Tok:
        mask_token_id, all_special_ids = 9, [0, 1, 2, 3, 9]

        def __len__(self):
            return 10

    model = _ContrastiveOnlyModel(0.9)
    objective = CCRKObjective(model, {"loss": {"fusion": False, "temp_clamp": clamp}}, Tok())
    ids = torch.zeros(3, 3, 4, dtype=torch.long)
    out = objective({"pixel_values": torch.zeros(3), "input_ids": ids, "attention_mask": torch.ones_like(ids),
                     "text_valid": torch.ones(3, 3, dtype=torch.bool)}, seed=0)
    assert model.temp.item() == pytest.approx(0.5 if clamp else 0.9)
    expected = OneToKContrastiveLoss("code")(model.img, model.txt.reshape(3, 3, 8), torch.ones(3, 3, dtype=torch.bool),
                                             torch.tensor(0.5 if clamp else 0.9))
    assert out["itc"].item() == pytest.approx(expected.item(), rel=1e-6)
