"""CL2CM (Wang, Wang, Dong, Luo, AAAI'24): cross-lingual to cross-modal knowledge transfer, as a
training objective beside CCRk's (``objective: cl2cm``; same model, trainer, data and checkpoints).

Per image, one (source caption, target-language caption) pair is used: the source is the English
pivot caption, the target its machine translation (``cl2cm.target_lang``, or ``any``: one present
non-source language drawn per image per step). Three parts, weighted (``cl2cm.weights``):

- cross-lingual network, sentence level (``cl_sentence``): symmetric InfoNCE between source and
  target sentence features, temperature ``cl_temp``;
- cross-lingual network, word level (``cl_word``): an entropic optimal-transport plan between the
  source's and the target's token embeddings (cost = 1 - cosine, Sinkhorn with ``sinkhorn.eps`` and
  ``sinkhorn.iters``, uniform mass on the non-special tokens) is the soft word alignment;
- cross-modal network (``itc``): symmetric InfoNCE between image and target features with the
  model's learnable temperature (what retrieval uses);
- relational distillation (``kd``): within the (gathered) batch, softmax(source.target^T / kd_temp)
  is the teacher for softmax(image.target^T / kd_temp), KL(teacher || student), averaged over the
  rows (each image / source over the targets) and the columns (each target over images / sources).

Where the paper is silent, we assume:
- One model: the cross-lingual and cross-modal networks share the multilingual text encoder and
  its 256-d projection (the CCRk model's ``encode_text``); the image side is its ``encode_image``.
  So a CL2CM checkpoint is a CCRk checkpoint and evaluation is unchanged (use ``--itc-only``: the
  fusion encoder and ITM head are not trained by this objective).
- The teacher is detached: distillation moves the cross-modal structure only, never the
  cross-lingual one (with a shared encoder, the noisier cross-modal side would otherwise pull the
  teacher towards itself). Teacher and student share one temperature, ``kd_temp``.
- Word level: the plan is computed on the detached cost (it is the self-supervised target, not a
  path for gradients); ``word_loss: contrastive`` (default) scores every (source i, target j) pair
  of the local batch by sum(P_ij * cos_ij) = 1 - <P_ij, C_ij> and applies symmetric InfoNCE with
  ``word_temp`` (translation noise only lowers a pair's score; negatives stop token collapse);
  ``word_loss: distance`` minimises <P_ii, C_ii> of the true pairs only (the OT distance).
  Token embeddings are the text encoder's last text-only layer; special tokens carry no mass.
- The word-level loss is computed per rank (token embeddings are not gathered); the sentence,
  cross-modal and distillation terms use the batch gathered across ranks.
- Images whose caption lacks the source or the target language are left out of every term
  (``pairs`` in the log counts those used). ``weights.itc_source`` (default 0) optionally adds
  image vs source-caption InfoNCE, which the paper's setting does not use.
- Defaults (ours, not the paper's; ccrk.specs.CL2CMSpec): cl_temp 0.05, word_temp 0.05, kd_temp 0.1,
  eps 0.05, 50 Sinkhorn iterations, all weights 1 (itc_source 0).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ccrk.losses import gather_features
from ccrk.optimal_transport import sinkhorn, uniform_marginal
from ccrk.specs import CL2CMSpec


def cl2cm_config(config: dict) -> dict:
    """The ``cl2cm`` section validated by :class:`ccrk.specs.CL2CMSpec` (defaults filled) and
    checked against ``langs`` and ``loss.kcl``; errors are one-line :class:`storage.spec.SpecError`."""
    user = config.get("cl2cm", {}) or {}
    spec = CL2CMSpec.parse(user, section="cl2cm")
    spec.check_langs(config.get("langs", []), (config.get("loss", {}) or {}).get("kcl", True))
    return spec.to_config()


# ---------------------------------------------------------------------- the loss terms


def info_nce(x: torch.Tensor, y: torch.Tensor, temp: float | torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE between row-aligned features ``x`` [N, E] and ``y`` [N, E]: pair i is i's positive."""
    logits = x @ y.t() / temp
    labels = torch.arange(x.shape[0], device=x.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2


def relational_distillation(student_sim: torch.Tensor, teacher_sim: torch.Tensor, temp: float) -> torch.Tensor:
    """KL(softmax(teacher / temp) || softmax(student / temp)) over the rows and over the columns of
    two [N, M] similarity matrices, averaged; the teacher is detached. Zero iff the structures agree."""
    teacher = teacher_sim.detach().float() / temp
    student = student_sim.float() / temp

    def kl(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return F.kl_div(F.log_softmax(s, dim=1), F.log_softmax(t, dim=1), log_target=True, reduction="batchmean")

    return (kl(student, teacher) + kl(student.t(), teacher.t())) / 2


def word_alignment_scores(src_tokens: torch.Tensor, src_mask: torch.Tensor, tgt_tokens: torch.Tensor,
                          tgt_mask: torch.Tensor, eps: float, iters: int, all_pairs: bool = True) -> torch.Tensor:
    """OT word-alignment similarity between source and target sentences.

    Tokens [N, L, D] with masks [N, L] (True = a word token). With ``all_pairs``, [N, N]: entry (i, j)
    = sum(P_ij * cos_ij) where P_ij is the Sinkhorn plan between source i's and target j's tokens on
    the detached cost 1 - cos; else [N]: the diagonal (true pairs) only. Gradients reach the tokens
    through cos, not through the plan.
    """
    s = F.normalize(src_tokens.float(), dim=-1)
    t = F.normalize(tgt_tokens.float(), dim=-1)
    n, length_s, length_t = s.shape[0], s.shape[1], t.shape[1]
    with torch.autocast(device_type=s.device.type, enabled=False):  # cosines in float32, also under bf16
        if all_pairs:
            cos = torch.einsum("ild,jmd->ijlm", s, t).reshape(n * n, length_s, length_t)
            ms = src_mask[:, None, :].expand(n, n, length_s).reshape(n * n, length_s)
            mt = tgt_mask[None, :, :].expand(n, n, length_t).reshape(n * n, length_t)
        else:
            cos, ms, mt = s @ t.transpose(1, 2), src_mask, tgt_mask
    with torch.no_grad():
        plan = sinkhorn(1.0 - cos.detach(), uniform_marginal(ms), uniform_marginal(mt), eps, iters)
    score = (plan * cos).sum(dim=(1, 2))
    return score.reshape(n, n) if all_pairs else score


# ---------------------------------------------------------------------- the objective


class CL2CMObjective(nn.Module):
    """Cross-lingual (sentence + OT word alignment) and cross-modal contrastive learning, with the
    cross-lingual similarity structure distilled into the cross-modal one (weighted sum)."""

    def __init__(self, model, config: dict, tokenizer):
        super().__init__()
        self.model = model
        self.cfg = cl2cm_config(config)
        self.langs = list(config["langs"])
        self.src_slot = self.langs.index(self.cfg["source_lang"])
        self.tgt_slot = None if self.cfg["target_lang"] == "any" else self.langs.index(self.cfg["target_lang"])
        self.register_buffer("special_ids", torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long),
                             persistent=False)

    # Fusion encoder, ITM and MLM heads get no gradient from this objective (DDP must know).
    uses_all_parameters = False

    def target_slots(self, valid: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(slot [B] of each image's target caption, used [B]: the image has source and target)."""
        b = valid.shape[0]
        if self.tgt_slot is not None:
            slot = torch.full((b,), self.tgt_slot, dtype=torch.long, device=valid.device)
            return slot, valid[:, self.src_slot] & valid[:, self.tgt_slot]
        candidates = valid.clone()
        candidates[:, self.src_slot] = False
        used = valid[:, self.src_slot] & candidates.any(dim=1)
        weights = torch.where(used[:, None], candidates.float(), torch.ones_like(candidates, dtype=torch.float))
        return torch.multinomial(weights, 1, generator=generator).squeeze(1), used

    def forward(self, batch: dict, seed: int) -> dict:
        m, cfg, w = self.model, self.cfg, self.cfg["weights"]
        m.clamp_temp()
        ids, atts, valid = batch["input_ids"], batch["attention_mask"], batch["text_valid"]
        b, k, length = ids.shape
        if k != len(self.langs):
            raise ValueError(f"cl2cm needs one caption slot per language of {self.langs}, the batch has {k}")
        gen = torch.Generator(device=ids.device).manual_seed(seed)
        slot, used = self.target_slots(valid, gen)
        _, image_feat = m.encode_image(batch["pixel_values"])
        rows = torch.nonzero(used).squeeze(1)
        n = rows.numel()
        # Zeros tied to the graph: under DDP every rank then gathers with gradients (same collectives).
        src_feat = tgt_feat = image_feat * 0.0
        word = image_feat.sum() * 0.0  # keeps the graph connected when this rank has no pair
        if n:
            # Source and target captions of the used images, encoded as one batch.
            pair_ids = torch.cat([ids[rows, self.src_slot], ids[rows, slot[rows]]])
            pair_atts = torch.cat([atts[rows, self.src_slot], atts[rows, slot[rows]]])
            tokens, feats = m.encode_text(pair_ids, pair_atts)
            src_feat, tgt_feat = src_feat.index_put((rows,), feats[:n]), tgt_feat.index_put((rows,), feats[n:])
            word_mask = pair_atts.bool() & ~torch.isin(pair_ids, self.special_ids)
            word = self._word_loss(tokens[:n], word_mask[:n], tokens[n:], word_mask[n:])
        img, src, tgt, ok = (gather_features(x) for x in (image_feat, src_feat, tgt_feat, used))
        img, src, tgt = img[ok], src[ok], tgt[ok]
        zero = image_feat.sum() * 0.0
        out = {"itc": zero, "cl_sentence": zero, "cl_word": word, "kd": zero}
        if img.shape[0]:
            out["itc"] = info_nce(img, tgt, m.temp)
            out["cl_sentence"] = info_nce(src, tgt, cfg["cl_temp"])
            out["kd"] = relational_distillation(img @ tgt.t(), src @ tgt.t(), cfg["kd_temp"])
            if w["itc_source"] > 0:
                out["itc_source"] = info_nce(img, src, m.temp)
        if w["itc_source"] > 0:
            out.setdefault("itc_source", zero)
        out["loss"] = sum(w[key] * out[key] for key in list(out))
        out["pairs"] = torch.tensor(float(ok.sum()), device=image_feat.device)
        return out

    def _word_loss(self, src_tokens, src_mask, tgt_tokens, tgt_mask) -> torch.Tensor:
        eps, iters = float(self.cfg["sinkhorn"]["eps"]), int(self.cfg["sinkhorn"]["iters"])
        if self.cfg["word_loss"] == "distance":
            return (1.0 - word_alignment_scores(src_tokens, src_mask, tgt_tokens, tgt_mask, eps, iters,
                                                all_pairs=False)).mean()
        scores = word_alignment_scores(src_tokens, src_mask, tgt_tokens, tgt_mask, eps, iters, all_pairs=True)
        labels = torch.arange(scores.shape[0], device=scores.device)
        logits = scores / self.cfg["word_temp"]
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
