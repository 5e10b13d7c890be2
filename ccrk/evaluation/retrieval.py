"""Retrieval evaluation: ITC similarity, then the top-k candidates re-ranked by the ITM head.

As in the reference (CCLM / CCRk ``evaluation``): every image scores every text by the cosine of
their ITC features; for each image the ``k_test`` best texts (and for each text the ``k_test`` best
images) are re-scored by the fusion encoder's ITM logit (index 1, "match"). Candidates outside
the top k keep their ITC order *below* all re-ranked ones (the reference fills them with -100, which
leaves their order to argsort's whims). ``itc_only`` skips re-ranking. Ranks follow
``metrics``' pessimistic tie rule, so constant ITM logits (a collapsed head) tie every re-ranked
candidate with the ground truth and put it last among them rather than first.

The model is used only through ``encode_image``, ``encode_text`` and ``itm_logits`` (see
``ccrk.model``); image embeddings are computed once and shared by every language of a benchmark,
text embeddings once per language.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from ccrk.evaluation import metrics
from ccrk.evaluation.benchmarks import Benchmark, ImageRef, RetrievalSet

ItmFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
PairScores = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (image_idx, text_idx) -> (n,) float64


# --------------------------------------------------------------------------- re-ranking


@torch.no_grad()
def itm_pair_scores(itm_logits: ItmFn, image_idx: torch.Tensor, text_idx: torch.Tensor, image_embeds: torch.Tensor,
                    image_atts: torch.Tensor, text_embeds: torch.Tensor, text_atts: torch.Tensor,
                    batch_size: int = 128) -> torch.Tensor:
    """ITM "match" logit of each (image_idx[n], text_idx[n]) pair, in batches: shape (n,)."""
    device = image_embeds.device
    out = torch.empty(len(image_idx), dtype=torch.float64)
    for b0 in range(0, len(image_idx), batch_size):
        ii = image_idx[b0:b0 + batch_size].to(device)
        tt = text_idx[b0:b0 + batch_size].to(device)
        logits = itm_logits(image_embeds[ii], image_atts[ii], text_embeds[tt], text_atts[tt])
        out[b0:b0 + len(ii)] = logits[:, 1].double().cpu()
    return out


def pair_scorer(model, image_embeds: torch.Tensor, image_atts: torch.Tensor, text_embeds: torch.Tensor,
                text_atts: torch.Tensor, batch_size: int = 256) -> PairScores:
    """The ITM scores of (image, text) index pairs: ccrk's ``CCRKModel.itm_pair_scores`` (an image's
    cross-attention keys and values computed once for all its texts), else any model's
    ``itm_logits`` batch by batch."""
    if hasattr(model, "itm_pair_scores"):
        return lambda ii, tt: model.itm_pair_scores(image_embeds, text_embeds, text_atts, ii, tt, batch_size)
    return lambda ii, tt: itm_pair_scores(model.itm_logits, ii, tt, image_embeds, image_atts, text_embeds, text_atts,
                                          batch_size)


def topk_pairs(sim: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices (into an (I, T) matrix) of each image's top-k texts and each text's top-k images."""
    n_img, n_txt = sim.shape
    k_t, k_i = min(k, n_txt), min(k, n_img)
    top_t = sim.topk(k_t, dim=1).indices  # (I, k_t): texts per image
    top_i = sim.topk(k_i, dim=0).indices  # (k_i, T): images per text
    flat_i2t = (torch.arange(n_img)[:, None] * n_txt + top_t).reshape(-1)
    flat_t2i = (top_i * n_txt + torch.arange(n_txt)[None, :]).reshape(-1)
    return flat_i2t, flat_t2i


def rerank_scores(sim: torch.Tensor, k: int, score_pairs: PairScores) -> tuple[np.ndarray, np.ndarray]:
    """(scores_i2t (I, T), scores_t2i (T, I)) after re-ranking the top k by ITM (``score_pairs``,
    see :func:`pair_scorer`).

    Re-ranked candidates get their ITM logit; the others get their ITC similarity shifted below the
    lowest ITM logit, so they stay in ITC order after every re-ranked candidate. Each distinct pair
    is scored once even when it is in both an image's and a text's top k.
    """
    sim = sim.detach().double().cpu()
    n_img, n_txt = sim.shape
    flat_i2t, flat_t2i = topk_pairs(sim, k)
    pairs = torch.unique(torch.cat([flat_i2t, flat_t2i]))
    scores = score_pairs(pairs // n_txt, pairs % n_txt)
    floor = float(scores.min()) - float(sim.max()) - 1.0  # shifted ITC < every ITM logit
    itm = torch.full((n_img * n_txt,), float("nan"), dtype=torch.float64)
    itm[pairs] = scores

    def assemble(flat: torch.Tensor) -> np.ndarray:
        out = (sim + floor).reshape(-1).clone()
        out[flat] = itm[flat]
        return out.reshape(n_img, n_txt).numpy()

    return assemble(flat_i2t), assemble(flat_t2i).T.copy()


# --------------------------------------------------------------------------- encoding


def _model_device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


class Encoder:
    """Encodes images (cached by image key, shared across languages) and texts with one model."""

    def __init__(self, model, tokenizer, transform: Callable, max_tokens: int = 40, batch_size: int = 64):
        self.model, self.tokenizer, self.transform = model, tokenizer, transform
        self.max_tokens, self.batch_size = max_tokens, batch_size
        self.device = _model_device(model)
        self._image_rows: dict[str, int] = {}
        self._image_embeds: list[torch.Tensor] = []
        self._image_feats: list[torch.Tensor] = []
        self.images_encoded = 0  # distinct images through the vision encoder (the cache's effect)

    @torch.no_grad()
    def images(self, refs: Sequence[ImageRef]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(image_embeds [N, P, D], image_atts [N, P], image_feat [N, E]) in the order of ``refs``."""
        by_key = {r.key: r for r in refs}
        todo = [key for key in by_key if key not in self._image_rows]
        for b0 in range(0, len(todo), self.batch_size):
            keys = todo[b0:b0 + self.batch_size]
            pixels = torch.stack([self.transform(by_key[k].open()) for k in keys]).to(self.device)
            embeds, feats = self.model.encode_image(pixels)
            self.images_encoded += len(keys)
            for j, key in enumerate(keys):
                self._image_rows[key] = len(self._image_embeds)
                self._image_embeds.append(embeds[j])
                self._image_feats.append(feats[j].float())
        rows = [self._image_rows[r.key] for r in refs]
        embeds = torch.stack([self._image_embeds[i] for i in rows])
        feats = torch.stack([self._image_feats[i] for i in rows])
        atts = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        return embeds, atts, feats

    @torch.no_grad()
    def texts(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(text_embeds [T, L, D], text_atts [T, L], text_feat [T, E]); one padding length for all."""
        enc = self.tokenizer(list(texts), padding="longest", truncation=True, max_length=self.max_tokens,
                             return_tensors="pt")
        ids, atts = enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)
        embeds, feats = [], []
        for b0 in range(0, len(texts), self.batch_size):
            e, f = self.model.encode_text(ids[b0:b0 + self.batch_size], atts[b0:b0 + self.batch_size])
            embeds.append(e)
            feats.append(f.float())
        return torch.cat(embeds), atts, torch.cat(feats)


# --------------------------------------------------------------------------- evaluation


@dataclass
class SetResult:
    """Ranks of one language (or fold): TR per image, IR per text, with their alignment keys."""
    name: str
    lang: str
    tr_ranks: np.ndarray
    ir_ranks: np.ndarray
    image_keys: list[str]
    text_keys: list[str]
    tr_recall: dict[int, float] = field(default_factory=dict)
    ir_recall: dict[int, float] = field(default_factory=dict)
    distinct_text_frac: float = 1.0  # see distinct_text_frac(); near 0 flags a collapsed language


def distinct_text_frac(text_feat: np.ndarray, texts: Sequence[str]) -> float:
    """Distinct text feature vectors per distinct caption, at most 1.

    1 when every different caption has its own embedding; near 0 when the text encoder maps most
    captions of a language to one vector (e.g. a tokenizer turning a script into unknown tokens).
    Vectors are compared bit for bit: a collapse onto one input gives one vector per batch at most.
    """
    text_feat = np.ascontiguousarray(text_feat)
    rows = {row.tobytes() for row in text_feat.reshape(len(text_feat), -1)}  # hashing rows: O(T), unlike np.unique
    return min(1.0, len(rows) / max(1, len(set(texts))))


def evaluate_set(encoder: Encoder, rset: RetrievalSet, k_test: int = 128, itc_only: bool = False,
                 itm_batch_size: int = 256) -> SetResult:
    img_embeds, img_atts, img_feat = encoder.images(rset.images)
    txt_embeds, txt_atts, txt_feat = encoder.texts(rset.texts)
    sim = img_feat @ txt_feat.T
    if itc_only:
        tr, ir = metrics.retrieval_ranks(sim.double().cpu().numpy(), rset.text_image)
    else:
        s_i2t, s_t2i = rerank_scores(sim, k_test, pair_scorer(encoder.model, img_embeds, img_atts, txt_embeds,
                                                               txt_atts, itm_batch_size))
        tr = metrics.text_retrieval_ranks(s_i2t, rset.text_image)
        ir = metrics.image_retrieval_ranks(s_t2i, rset.text_image)
    prefix = "" if rset.fold is None else f"fold{rset.fold}/"
    return SetResult(rset.name, rset.lang, tr, ir, [prefix + k for k in rset.image_ids],
                     [prefix + k for k in rset.text_keys], metrics.recall_at_k(tr), metrics.recall_at_k(ir),
                     distinct_text_frac(txt_feat.cpu().numpy(), rset.texts))


@dataclass
class LangResult:
    """A language's recalls (averaged over folds) and its ranks (folds concatenated)."""
    lang: str
    tr_recall: dict[int, float]
    ir_recall: dict[int, float]
    folds: list[SetResult]

    @property
    def mean_recall(self) -> float:
        return metrics.mean_recall(self.tr_recall, self.ir_recall)

    @property
    def tr_ranks(self) -> np.ndarray:
        return np.concatenate([f.tr_ranks for f in self.folds])

    @property
    def ir_ranks(self) -> np.ndarray:
        return np.concatenate([f.ir_ranks for f in self.folds])

    @property
    def image_keys(self) -> list[str]:
        return [k for f in self.folds for k in f.image_keys]

    @property
    def text_keys(self) -> list[str]:
        return [k for f in self.folds for k in f.text_keys]


def _average(dicts: list[dict[int, float]]) -> dict[int, float]:
    return {k: float(np.mean([d[k] for d in dicts])) for k in dicts[0]}


def evaluate_benchmark(model, tokenizer, transform: Callable, bench: Benchmark, langs: Sequence[str] | None = None,
                       k_test: int = 128, itc_only: bool = False, max_tokens: int = 40, batch_size: int = 64,
                       progress: Callable[[str], None] | None = None) -> dict[str, LangResult]:
    """Evaluate every language (every fold) of ``bench``; images encoded once for all languages."""
    model.eval()
    encoder = Encoder(model, tokenizer, transform, max_tokens=max_tokens, batch_size=batch_size)
    out: dict[str, LangResult] = {}
    for lang in langs or bench.langs:
        folds = []
        for rset in bench.sets[lang]:
            if progress:
                progress(rset.name)
            folds.append(evaluate_set(encoder, rset, k_test, itc_only))
        out[lang] = LangResult(lang, _average([f.tr_recall for f in folds]), _average([f.ir_recall for f in folds]),
                               folds)
    return out


def aligned_ranks(results: dict[str, LangResult], langs: Sequence[str], direction: str) -> tuple[np.ndarray, list[str]]:
    """(ranks (K, N), keys): the instances present in every one of ``langs``, in the first one's order."""
    keyed = []
    for lang in langs:
        r = results[lang]
        ranks, keys = (r.tr_ranks, r.image_keys) if direction == "tr" else (r.ir_ranks, r.text_keys)
        keyed.append(dict(zip(keys, ranks.tolist())))
    common = [k for k in keyed[0] if all(k in d for d in keyed[1:])]
    return np.array([[d[k] for k in common] for d in keyed], dtype=np.int64).reshape(len(langs), len(common)), common
