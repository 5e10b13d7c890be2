"""ITC retrieval with ITM re-ranking of the top k, on a small deterministic colour-matching model.

The model below is a real ``nn.Module`` with the three methods evaluation uses. Its ITC features
are deliberately off by one colour (image c is closest to the text of colour c-1, then to its own
text), while its ITM head compares exact colours: ITC alone ranks every ground truth second, and
re-ranking the top 2 by ITM puts every ground truth first.
"""
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ccrk.evaluation import benchmarks as bm
from ccrk.evaluation import metrics, retrieval
from ccrk.evaluation.metrics import recall_at_k

PALETTE = {"red": (230, 20, 20), "green": (20, 200, 40), "blue": (30, 40, 220), "yellow": (240, 230, 30),
           "black": (10, 10, 10)}
NAMES = list(PALETTE)
SPANISH = {"red": "rojo", "green": "verde", "blue": "azul", "yellow": "amarillo", "black": "negro"}


class ColourTokenizer:
    """Word -> colour id (1-based; 0 is padding), in English or Spanish."""
    vocab = {**{n: i + 1 for i, n in enumerate(NAMES)}, **{SPANISH[n]: i + 1 for i, n in enumerate(NAMES)}}

    def __call__(self, texts, padding="longest", truncation=True, max_length=8, return_tensors="pt"):
        ids = [[self.vocab[w] for w in t.split()][:max_length] for t in texts]
        length = max(len(x) for x in ids)
        return {"input_ids": torch.tensor([x + [0] * (length - len(x)) for x in ids]),
                "attention_mask": torch.tensor([[1] * len(x) + [0] * (length - len(x)) for x in ids])}


class ColourModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("palette", torch.tensor([PALETTE[n] for n in NAMES], dtype=torch.float32) / 255)

    def _colour_index(self, rgb):
        return torch.cdist(rgb, self.palette).argmin(dim=1)

    def encode_image(self, pixel_values):
        rgb = pixel_values.mean(dim=(2, 3))
        embeds = rgb[:, None, :].repeat(1, 2, 1)  # two identical "patches"
        return embeds, F.one_hot(self._colour_index(rgb), len(NAMES)).float()

    def encode_text(self, input_ids, attention_mask):
        c = input_ids[:, 0] - 1
        embeds = self.palette[c][:, None, :].repeat(1, input_ids.shape[1], 1)
        n = len(NAMES)
        feat = F.one_hot((c + 1) % n, n).float() + 0.5 * F.one_hot(c, n).float()  # off by one colour
        return embeds, F.normalize(feat, dim=-1)

    def itm_logits(self, image_embeds, image_atts, text_embeds, text_atts):
        match = -(image_embeds[:, 0] - text_embeds[:, 0]).norm(dim=-1)
        return torch.stack([-match, match], dim=1)


def to_tensor(img):
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1)


@pytest.fixture
def colour_benchmark(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for name, rgb in PALETTE.items():
        Image.new("RGB", (6, 6), rgb).save(images / f"{name}.png")
    for lang in ("en", "es"):
        d = tmp_path / "annotations" / lang
        d.mkdir(parents=True)
        with open(d / "test.jsonl", "w") as f:
            for name in NAMES:
                text = name if lang == "en" else SPANISH[name]
                f.write(json.dumps({"sentences": [text], "id": name, "img_path": f"{name}.png"}) + "\n")
    return bm.load_xflickrco(str(tmp_path))


def test_itc_alone_ranks_every_ground_truth_second(colour_benchmark):
    enc = retrieval.Encoder(ColourModel(), ColourTokenizer(), to_tensor)
    r = retrieval.evaluate_set(enc, colour_benchmark.sets["en"][0], itc_only=True)
    assert r.tr_ranks.tolist() == [1] * 5 and r.ir_ranks.tolist() == [1] * 5
    assert r.tr_recall == {1: 0.0, 5: 100.0, 10: 100.0}


def test_itm_reranking_of_the_top_k_puts_the_ground_truth_first(colour_benchmark):
    enc = retrieval.Encoder(ColourModel(), ColourTokenizer(), to_tensor)
    r = retrieval.evaluate_set(enc, colour_benchmark.sets["en"][0], k_test=2)
    assert r.tr_ranks.tolist() == [0] * 5 and r.ir_ranks.tolist() == [0] * 5
    assert r.tr_recall[1] == 100.0 and r.ir_recall[1] == 100.0


def test_ground_truth_outside_the_top_k_stays_below_every_reranked_candidate(colour_benchmark):
    enc = retrieval.Encoder(ColourModel(), ColourTokenizer(), to_tensor)
    r = retrieval.evaluate_set(enc, colour_benchmark.sets["en"][0], k_test=1)
    # Only the wrong ITC favourite is re-scored; the ground truth comes right after it.
    assert r.tr_ranks.tolist() == [1] * 5 and r.ir_ranks.tolist() == [1] * 5


class ConstantItmModel(ColourModel):
    """A collapsed ITM head: the same logit for every pair."""

    def itm_logits(self, image_embeds, image_atts, text_embeds, text_atts):
        return torch.zeros(len(image_embeds), 2)


def test_constant_itm_logits_do_not_give_perfect_recall(colour_benchmark):
    enc = retrieval.Encoder(ConstantItmModel(), ColourTokenizer(), to_tensor)
    r = retrieval.evaluate_set(enc, colour_benchmark.sets["en"][0], k_test=2)
    # Each ground truth ties with the other re-ranked candidate, which counts above it.
    assert r.tr_ranks.tolist() == [1] * 5 and r.ir_ranks.tolist() == [1] * 5
    assert r.tr_recall[1] == 0.0 and r.ir_recall[1] == 0.0


def test_constant_itm_logits_tie_only_the_reranked_candidates():
    sim = torch.tensor([[0.9, 0.8, 0.1, 0.3],
                        [0.2, 0.7, 0.6, 0.5]])
    embeds, atts = torch.zeros(4, 1, 1), torch.ones(4, 1, dtype=torch.long)
    constant = SimpleNamespace(itm_logits=lambda ie, ia, te, ta: torch.zeros(len(ie), 2))
    s_i2t, _ = retrieval.rerank_scores(sim, 2, retrieval.pair_scorer(constant, embeds[:2], atts[:2], embeds, atts))
    text_image = np.array([0, 0, 1, 1])
    # Image 1's top 2 by ITC (texts 1, 2) tie at the ITM logit; the others stay below in ITC order.
    assert s_i2t[1, 1] == s_i2t[1, 2] and s_i2t[1, 3] < s_i2t[1, 2] and s_i2t[1, 0] < s_i2t[1, 3]
    assert metrics.text_retrieval_ranks(s_i2t, text_image).tolist() == [0, 1]


def test_rerank_scores_by_hand():
    # 2 images, 3 texts; ITM prefers text 2 for image 0, although ITC ranks it last.
    sim = torch.tensor([[0.9, 0.8, 0.1],
                        [0.2, 0.7, 0.6]])
    image_embeds = torch.tensor([[[0.0]], [[1.0]]])
    text_embeds = torch.tensor([[[0.5]], [[0.9]], [[0.0]]])
    ones_i, ones_t = torch.ones(2, 1, dtype=torch.long), torch.ones(3, 1, dtype=torch.long)

    def itm(ie, ia, te, ta):
        match = -(ie[:, 0, 0] - te[:, 0, 0]).abs()
        return torch.stack([-match, match], dim=1)

    scorer = retrieval.pair_scorer(SimpleNamespace(itm_logits=itm), image_embeds, ones_i, text_embeds, ones_t)
    s_i2t, s_t2i = retrieval.rerank_scores(sim, 3, scorer)
    assert np.argsort(-s_i2t[0]).tolist() == [2, 0, 1]  # |0-0| < |0-0.5| < |0-0.9|
    assert s_i2t[0, 2] == pytest.approx(0.0)
    s_i2t, _ = retrieval.rerank_scores(sim, 2, scorer)
    # Text 2 is outside image 0's top 2: it stays last although its ITM score would be best.
    assert np.argsort(-s_i2t[0]).tolist() == [0, 1, 2]
    assert s_t2i.shape == (3, 2)


class CollapsingTokenizer(ColourTokenizer):
    """Reads every word as "red", like a tokenizer that turns an unknown script into one token."""

    def __call__(self, texts, **kwargs):
        return super().__call__(["red" for _ in texts], **kwargs)


def test_distinct_text_frac_flags_a_collapsed_language(colour_benchmark):
    model = ColourModel()
    fine = retrieval.evaluate_set(retrieval.Encoder(model, ColourTokenizer(), to_tensor),
                                  colour_benchmark.sets["es"][0], itc_only=True)
    collapsed = retrieval.evaluate_set(retrieval.Encoder(model, CollapsingTokenizer(), to_tensor),
                                       colour_benchmark.sets["es"][0], itc_only=True)
    assert fine.distinct_text_frac == 1.0
    assert collapsed.distinct_text_frac == pytest.approx(1 / 5)  # 5 captions, one vector


def test_distinct_text_frac_counts_per_distinct_caption():
    feat = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]], dtype=np.float32)
    # Repeated captions share their vector by right: not a collapse.
    assert retrieval.distinct_text_frac(feat, ["a dog", "a dog", "a cat", "a cat"]) == 1.0
    assert retrieval.distinct_text_frac(feat, ["a dog", "one dog", "a cat", "one cat"]) == 0.5


def test_images_are_encoded_once_for_all_languages(colour_benchmark):
    enc = retrieval.Encoder(ColourModel(), ColourTokenizer(), to_tensor, batch_size=2)
    en = retrieval.evaluate_set(enc, colour_benchmark.sets["en"][0], k_test=2)
    es = retrieval.evaluate_set(enc, colour_benchmark.sets["es"][0], k_test=2)
    assert enc.images_encoded == 5
    assert es.tr_ranks.tolist() == en.tr_ranks.tolist()


def test_evaluate_benchmark_aligns_instances_across_languages(colour_benchmark):
    results = retrieval.evaluate_benchmark(ColourModel(), ColourTokenizer(), to_tensor, colour_benchmark,
                                           k_test=1)
    assert list(results) == ["en", "es"]
    ranks, keys = retrieval.aligned_ranks(results, ["en", "es"], "ir")
    assert ranks.shape == (2, 5) and keys[0] == "red#0"
    assert recall_at_k(results["es"].tr_ranks)[1] == 0.0


def test_finetune_itc_loss_treats_every_same_image_pair_as_positive():
    from ccrk.losses import id_contrastive_loss as itc_loss

    feat = F.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]), dim=-1)
    ids = torch.tensor([7, 7, 3])  # two captions of image 7, one of image 3
    loss = itc_loss(feat, feat, 0.1, ids)
    # Rows 0/1: labels 1/2 on columns 0 and 1, whose logits are equal (10) vs 0 -> -log(e^10 / (2e^10 + 1)).
    first = -np.log(np.exp(10) / (2 * np.exp(10) + 1))
    third = -np.log(np.exp(10) / (np.exp(10) + 2))
    assert float(loss) == pytest.approx((2 * first + third) / 3, rel=1e-5)


def test_finetune_plans_pick_the_published_training_files(tmp_path):
    from ccrk.evaluation.protocols import plan_finetune
    from storage.errors import CCRKError

    for path in ("annotations/en/train_ann.jsonl", "annotations/de/train_100.jsonl", "annotations/de/test.jsonl"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text("")
    zs = plan_finetune("zero-shot", "xflickrco", str(tmp_path))
    assert zs.train_files[0].endswith("en/train_ann.jsonl") and zs.eval_langs is None
    fs = plan_finetune("few-shot", "xflickrco", str(tmp_path), lang="de", shots=100)
    assert fs.train_files[0].endswith("de/train_100.jsonl") and fs.eval_langs == ["de"]
    with pytest.raises(CCRKError, match="--shots is required"):
        plan_finetune("few-shot", "xflickrco", str(tmp_path), lang="de")
    with pytest.raises(CCRKError, match="train.cs.json not found"):
        plan_finetune("single", "multi30k", str(tmp_path), lang="cs")
