"""ccrk's losses and sampling weights against numbers produced by the authors' code (issue 22).

The fixture folder (``CCRK_PARITY_FIXTURE``, default ``<checkout>/../shared/reference-parity``) holds
features, logits and losses computed by github.com/BUAADreamer/CCRK at 06449d2 (its README.md:
"losses.json", "outputs.safetensors", "Layout conventions"). Every size comes from its config.json,
so another fixture made the same way passes too. The span-masking tests need no fixture.

The matching and MLM losses through the ported model are in ``tests/test_parity_model.py``.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ccrk import losses
from ccrk.objectives import CCRKObjective, loss_config
from parity_fixture import FIXTURE, StubTokenizer, argmax, require

torch.set_num_threads(1)



class Ref:
    """The fixture's sizes, inputs, outputs and losses."""

    def __init__(self, folder: Path):
        from safetensors.torch import load_file

        config = json.loads((folder / "config.json").read_text())
        self.spec = config["spec"]
        self.special = {name.split("(")[0]: int(i) for name, i in config["special_token_ids"].items()}
        self.losses = json.loads((folder / "losses.json").read_text())
        self.inp = load_file(str(folder / "inputs.safetensors"))
        self.out = load_file(str(folder / "outputs.safetensors"))
        self.b, self.k = int(self.spec["B"]), int(self.spec["K"])
        self.temp = self.out["temp"]
        self.valid = torch.ones(self.b, self.k, dtype=torch.bool)  # the reference has every caption


@pytest.fixture(scope="module")
def ref() -> Ref:
    require("losses.json")
    return Ref(FIXTURE)


def close_loss(ours, expected: float) -> None:
    ours = float(ours.detach() if isinstance(ours, torch.Tensor) else ours)
    assert abs(ours - expected) <= 1e-5 * max(1.0, abs(expected)), (ours, expected)


def close_tensor(ours: torch.Tensor, expected) -> None:
    expected = torch.as_tensor(expected, dtype=torch.float32)
    assert ours.shape == expected.shape
    tol = 1e-4 * max(1.0, float(expected.abs().max()))
    assert float((ours.float() - expected).abs().max()) <= tol, (ours, expected)


# ---------------------------------------------------------------------- contrastive losses


def test_one_to_k_contrastive_code_and_paper_norms(ref):
    img, txt = ref.out["pre_image_feat"], ref.out["pre_text_feat"].reshape(ref.b, ref.k, -1)
    code = losses.one_to_k_contrastive(img, txt, ref.valid, ref.temp, "code")
    close_loss(code, ref.losses["unialign_itc"])
    close_loss(code, ref.losses["unialign_itc_no_allgather"])  # one process: gathering changes nothing
    paper = losses.one_to_k_contrastive(img, txt, ref.valid, ref.temp, "paper")
    close_loss(paper, ref.losses["unialign_itc_need_divm1"])
    # The defaults are the code's: the objective's contrastive module reproduces unialign_itc.
    itc = losses.OneToKContrastiveLoss(loss_config({})["kcl_norm"], loss_config({})["gather_grad"])
    close_loss(itc(img, txt, ref.valid, ref.temp), ref.losses["unialign_itc"])


def test_one_caption_contrastive_is_cclm_easy(ref):
    img, first = ref.out["pre_image_feat"], ref.out["pre_text_feat"][0::ref.k]
    close_loss(losses.id_contrastive_loss(img, first, ref.temp), ref.losses["cclm_easy_itc"])
    for norm in losses.KCL_NORMS:  # K = 1: every 1-to-K form is the plain contrastive loss
        ours = losses.one_to_k_contrastive(img, first[:, None], torch.ones(ref.b, 1, dtype=torch.bool), ref.temp, norm)
        close_loss(ours, ref.losses["cclm_easy_itc"])


def test_finetuning_contrastive_with_image_ids(ref):
    img, txt, ids = ref.out["image_feat"], ref.out["text_feat"], ref.inp["image_ids"]
    close_loss(losses.id_contrastive_loss(img, txt[0::ref.k], ref.temp, ids), ref.losses["ft_itc_first_caption_idx"])
    close_loss(losses.id_contrastive_loss(img, txt[0::ref.k], ref.temp), ref.losses["ft_itc_first_caption_noidx"])
    close_loss(losses.id_contrastive_loss(img.repeat_interleave(ref.k, 0), txt, ref.temp,
                                          ids.repeat_interleave(ref.k)), ref.losses["ft_itc_all_pairs_dup_idx"])


# ---------------------------------------------------------------------- MITM sampling weights


def test_similarity_weights(ref):
    img, txt = ref.out["pre_image_feat"], ref.out["pre_text_feat"]
    close_tensor(losses.similarity_weights(img @ txt.t(), ref.temp), ref.out["unialign_weights_i2t"])
    close_tensor(losses.similarity_weights(txt @ img.t(), ref.temp), ref.out["unialign_weights_t2i"])


def test_hard_positive_weights_and_choices(ref):
    img, txt = ref.out["pre_image_feat"], ref.out["pre_text_feat"]
    sim = img @ txt.t()
    w = losses.positive_weights(sim, ref.valid, ref.temp, loss_config({})["itm_positive"])  # the default: code
    close_tensor(w, ref.out["unialign_hardpos_weights"])
    # max_weight - w_i2t[b, own] = w: adding the own block back gives max_weight everywhere.
    own = losses.similarity_weights(sim, ref.temp).reshape(ref.b, ref.b, ref.k)[range(ref.b), range(ref.b)]
    close_tensor(w + own, torch.full((ref.b, ref.k), ref.losses["unialign_max_weight"]))
    choice = argmax(w)
    assert choice.tolist() == ref.losses["unialign_hardpos_choice_in_slice"]
    assert (torch.arange(ref.b) * ref.k + choice).tolist() == ref.losses["unialign_text_pos_idx_ls"]


def test_hard_negative_weights_and_choices(ref):
    img, txt = ref.out["pre_image_feat"], ref.out["pre_text_feat"]
    pos_rows = torch.tensor(ref.losses["unialign_text_pos_idx_ls"])
    text_w, image_w = losses.matching_negative_weights(img, txt, ref.valid, pos_rows, ref.temp)
    close_tensor(text_w, ref.out["unialign_neg_txt_weights"])
    close_tensor(image_w, ref.out["unialign_neg_img_weights"])
    assert argmax(text_w).tolist() == ref.losses["unialign_neg_txt_choice"]
    assert argmax(image_w).tolist() == ref.losses["unialign_neg_img_choice"]


def test_finetuning_hard_negative_weights(ref):
    # get_matching_loss with image ids on the first captions: other ids only, softmax + 1e-5.
    img, first, ids = ref.out["image_feat"], ref.out["text_feat"][0::ref.k], ref.inp["image_ids"]
    same = ids[:, None] == ids[None, :]
    txt_w = losses.negative_weights(img @ first.t(), same, ref.temp)
    img_w = losses.negative_weights(first @ img.t(), same, ref.temp)
    close_tensor(txt_w, ref.out["ft_itm_neg_txt_weights"])
    close_tensor(img_w, ref.out["ft_itm_neg_img_weights"])
    assert argmax(txt_w).tolist() == ref.losses["ft_itm_neg_txt_choice"]
    assert argmax(img_w).tolist() == ref.losses["ft_itm_neg_img_choice"]


# ---------------------------------------------------------------------- MLM


def test_mlm_loss_from_logits(ref):
    logits, labels = ref.out["mlm_logits"], ref.inp["masked_ids"]
    close_loss(losses.mlm_loss(logits, labels), ref.losses["mlm_all_pairs"])
    rows = ref.losses["unialign_text_pos_idx_ls"]  # image repeated per caption: these rows are the hard positives'
    close_loss(losses.mlm_loss(logits[rows], labels[rows]), ref.losses["unialign_mlm_at_pos"])


# ---------------------------------------------------------------------- the objective's wiring


class _FeatureModel(torch.nn.Module):
    """Stands in for CCRKModel: returns the fixture's pre-training features, and records which
    (image, caption) rows MITM and MLM ask for (token embeddings carry their row number)."""

    def __init__(self, ref: Ref, vocab: int):
        super().__init__()
        self.ref, self.vocab, self.calls = ref, vocab, {}
        self.temp = torch.nn.Parameter(ref.temp.clone())

    def clamp_temp(self):
        with torch.no_grad():
            self.temp.clamp_(0.001, 0.5)

    def encode_image(self, pixel_values):
        b = pixel_values.shape[0]
        return torch.arange(b, dtype=torch.float).reshape(b, 1, 1), self.ref.out["pre_image_feat"]

    def encode_text_cls(self, ids, atts):
        return None, self.ref.out["pre_text_feat"]

    def text_tokens(self, state, rows):
        return rows.float().reshape(-1, 1, 1).expand(-1, self.ref.inp["text_ids"].shape[1], 1)

    def itm_logits(self, image_embeds, image_atts, text_embeds, text_atts):
        self.calls["itm"] = (image_embeds[:, 0, 0].long().tolist(), text_embeds[:, 0, 0].long().tolist())
        return torch.zeros(image_embeds.shape[0], 2)

    def mlm_logits(self, masked_ids, atts, image_embeds, image_atts, predict):
        self.calls["mlm"] = (masked_ids, predict)
        return torch.zeros(int(predict.sum()), self.vocab)


def test_objective_defaults_reproduce_the_reference_choices(ref, monkeypatch):
    monkeypatch.setattr(losses, "sample", argmax)
    ids, atts = ref.inp["text_ids"], ref.inp["text_atts"]
    vocab = int(ref.spec["text"]["vocab_size"])
    tok = StubTokenizer(vocab, ref.special["mask"], list(ref.special.values()))
    model = _FeatureModel(ref, vocab)
    objective = CCRKObjective(model, {"loss": {}}, tok)
    batch = {"pixel_values": ref.inp["images"], "input_ids": ids.reshape(ref.b, ref.k, -1),
             "attention_mask": atts.reshape(ref.b, ref.k, -1), "text_valid": ref.valid}
    out = objective(batch, seed=0)
    close_loss(out["itc"], ref.losses["unialign_itc"])
    pos, neg_txt, neg_img = (ref.losses[k] for k in ("unialign_text_pos_idx_ls", "unialign_neg_txt_choice",
                                                      "unialign_neg_img_choice"))
    images, texts = model.calls["itm"]
    # The code's batch: (image, hard positive) 1, (image, hard negative text) 0, (hard negative image, positive) 0.
    assert sorted(zip(images, texts)) == sorted([*zip(range(ref.b), pos), *zip(range(ref.b), neg_txt),
                                                 *zip(neg_img, pos)])
    masked, predict = model.calls["mlm"]  # CMLM on the hard positives' captions
    for r, row in enumerate(pos):
        n = int(atts[row].sum())
        keep = ~predict[r, :n]
        assert torch.equal(masked[r, :n][keep], ids[row, :n][keep])


# ---------------------------------------------------------------------- span masking (no fixture)


def _rows(n_rows: int, lengths: list[int], length: int, vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab - 1, (n_rows, length), generator=g)
    atts = torch.zeros_like(ids)
    for r in range(n_rows):
        n = lengths[r % len(lengths)]
        ids[r, 0], ids[r, n - 1], ids[r, n:] = 0, 2, 1  # <s> words </s> <pad>...
        atts[r, :n] = 1
    return ids, atts


def _mask(ids, atts, seed=0, vocab=1000, **kw):
    return losses.span_mask_tokens(ids, atts, mask_id=vocab - 1, vocab_size=vocab,
                                   generator=torch.Generator().manual_seed(seed), **kw)


def test_span_masking_counts_and_positions():
    lengths = [2, 3, 5, 8, 12, 20, 33, 40]
    ids, atts = _rows(800, lengths, 40, 1000)
    masked, predict = _mask(ids, atts)  # the defaults: 0.4, 12, 0.2, 3
    n = atts.sum(dim=1)
    expected = torch.tensor([min(12, max(1, round(int(v) * 0.4)), int(v) - 1) for v in n])
    assert torch.equal(predict.sum(dim=1), expected)  # 2 tokens: 1, 40 tokens: capped at 12
    assert not predict[:, 0].any()  # never <s>
    assert not (predict & ~atts.bool()).any()  # never padding
    assert torch.equal(masked[~predict], ids[~predict])
    last = atts.sum(dim=1) - 1
    assert predict[torch.arange(800), last].any()  # </s> is a candidate
    # A single masked token is uniform over positions 1..n-1 (</s> included).
    ids, atts = _rows(6000, [6], 6, 1000)
    _, predict = _mask(ids, atts, mask_prob=0.1, span_prob=0.0)
    share = predict.float().mean(dim=0)
    assert share[0] == 0 and torch.allclose(share[1:], torch.full((5,), 0.2), atol=0.025)


def test_span_masking_spans_are_contiguous():
    ids, atts = _rows(500, [10, 17, 25], 25, 1000)
    # Always a span of exactly 2, 2 to predict: the first visited token and the next one, unless the
    # first is the last token (the span is cut there) and a trimmed overshoot keeps it.
    _, predict = _mask(ids, atts, mask_prob=0.2, max_masks=2, span_prob=1.0, span_max=2)
    last = atts.sum(dim=1) - 1
    for r in range(500):
        pos = torch.nonzero(predict[r]).flatten().tolist()
        assert len(pos) == 2
        assert pos[1] == pos[0] + 1 or int(last[r]) in pos
    # Spans of 2..3 make adjacent masked tokens far more common than single-token masking does.
    adjacent = lambda p: (p[:, 1:] & p[:, :-1]).sum().item() / p.sum().item()  # noqa: E731
    spans = adjacent(_mask(ids, atts, span_prob=1.0)[1])
    singles = adjacent(_mask(ids, atts, span_prob=0.0)[1])
    assert spans > 0.55 and singles < 0.42  # measured: about 0.61 and 0.36


def test_span_masking_is_deterministic_under_a_seeded_generator():
    ids, atts = _rows(64, [7, 15, 30], 30, 1000)
    a, b, c = _mask(ids, atts, seed=3), _mask(ids, atts, seed=3), _mask(ids, atts, seed=4)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


def test_span_masking_80_10_10():
    ids, atts = _rows(3000, [30], 30, 1000)
    masked, predict = _mask(ids, atts)
    share = lambda m: (m & predict).sum().item() / predict.sum().item()  # noqa: E731
    assert share(masked == 999) == pytest.approx(0.8, abs=0.02)
    assert share((masked != 999) & (masked != ids)) == pytest.approx(0.1, abs=0.015)  # random (rarely the original)
    assert share(masked == ids) == pytest.approx(0.1, abs=0.015)
    # The random ids are uniform over the whole vocabulary, special ids included (as the code's).
    ids, atts = _rows(3000, [30], 30, 12)
    masked, predict = _mask(ids, atts, vocab=12)
    replaced = masked[predict & (masked != 11)]
    assert set(replaced.tolist()) >= set(range(4))
