"""Training objectives, chosen by the config's ``objective:`` key (``ccrk`` now; ``cl2cm`` later).

An objective is an ``nn.Module`` holding the model; ``forward(batch, seed)`` returns a dict of
scalar losses with ``loss`` the total to back-propagate. ``seed`` drives its sampling (hard
negatives, masking) so that a resumed run draws what the uninterrupted run would have drawn.
"""
from __future__ import annotations

import functools

import torch
from torch import nn

from ccrk import losses
from ccrk.model import CCRKModel
from ccrk.specs import LossSpec

# The objective's options (``loss:``) are ccrk.specs.LossSpec: where the paper and the authors' code
# disagree, the default is the code's and the other form is selectable (ccrk.losses has the
# definitions; README "Paper and code, where they differ"). LOSS_DEFAULTS: that spec's defaults, as a dict.
LOSS_DEFAULTS = LossSpec().to_config()


def loss_config(config: dict) -> dict:
    """The ``loss:`` section validated by :class:`ccrk.specs.LossSpec` (defaults filled, aliases
    resolved); a bad key or value is a one-line :class:`storage.spec.SpecError` (a ValueError)."""
    user = config.get("loss", {}) or {}
    return LossSpec.parse(user, section="loss").to_config()


class CCRKObjective(nn.Module):
    """1-to-K contrastive + hard-mined MITM + CMLM on the hard positive (weighted sum)."""

    def __init__(self, model: CCRKModel, config: dict, tokenizer):
        super().__init__()
        self.model = model
        self.cfg = loss_config(config)
        self.itc = losses.OneToKContrastiveLoss(self.cfg["kcl_norm"], self.cfg["gather_grad"])
        self.mask_id = tokenizer.mask_token_id
        self.vocab_size = len(tokenizer)
        self.vocab_high = self.mask_id if self.mask_id == len(tokenizer) - 1 else len(tokenizer)
        self.special_ids = list(tokenizer.all_special_ids)

    @property
    def uses_all_parameters(self) -> bool:
        w = self.cfg["weights"]
        return self.cfg["fusion"] and w["itm"] > 0 and w["mlm"] > 0

    def forward(self, batch: dict, seed: int) -> dict:
        m, cfg, w = self.model, self.cfg, self.cfg["weights"]
        if cfg["temp_clamp"]:
            m.clamp_temp()
        image_embeds, image_feat = m.encode_image(batch["pixel_values"])
        ids, atts, valid = batch["input_ids"], batch["attention_mask"], batch["text_valid"]
        b, k, length = ids.shape
        # The K captions of every image are encoded as one batch; missing ones are skipped. MITM
        # reads at most 2B of them: with more captions than that (or no MITM), their last text layer
        # runs at CLS only and MITM asks for the rows it uses (m.text_tokens); with fewer (K <= 2)
        # the full encoder costs less than running that layer twice.
        flat_valid = valid.reshape(-1)
        v_ids, v_atts = ids.reshape(-1, length)[flat_valid], atts.reshape(-1, length)[flat_valid]
        if v_ids.shape[0] > 2 * b or not (cfg["fusion"] and w["itm"] > 0):
            text_state, text_feat_v = m.encode_text_cls(v_ids, v_atts)
            text_tokens = functools.partial(m.text_tokens, text_state)
        else:
            text_embeds_v, text_feat_v = m.encode_text(v_ids, v_atts)
            text_tokens = text_embeds_v.__getitem__
        text_feat = text_feat_v.new_zeros(b * k, text_feat_v.shape[-1])
        text_feat[flat_valid] = text_feat_v  # image-major slots, zeros where missing
        out = {"itc": self.itc(image_feat, text_feat.reshape(b, k, -1), valid, m.temp)}
        total = w["itc"] * out["itc"]
        if cfg["fusion"] and (w["itm"] > 0 or w["mlm"] > 0):
            gen = torch.Generator(device=ids.device).manual_seed(seed)
            # Row of each valid caption in the compact encoded batch.
            row_of = torch.full((b * k,), -1, dtype=torch.long, device=ids.device)
            row_of[flat_valid] = torch.arange(int(flat_valid.sum()), device=ids.device)
            temp = m.temp.detach()
            with torch.no_grad():
                image_feat_d, text_feat_d = image_feat.detach(), text_feat.detach()
                sim = image_feat_d @ text_feat_d.t()  # [B, B*K]: the local batch, as the code's MITM
                pos_k = losses.sample(losses.positive_weights(sim, valid, temp, cfg["itm_positive"]), gen)
            pos_slots = torch.arange(b, device=ids.device) * k + pos_k
            if w["itm"] > 0:
                with torch.no_grad():
                    text_w, image_w = losses.matching_negative_weights(image_feat_d, text_feat_d, valid, pos_slots,
                                                                       temp, cfg["itm_negatives"] == "hard")
                    neg_slots, neg_image = losses.sample(text_w, gen), losses.sample(image_w, gen)
                out["itm"] = self._itm(image_embeds, text_tokens, v_atts, row_of[pos_slots], row_of[neg_slots],
                                       neg_image)
                total = total + w["itm"] * out["itm"]
            if w["mlm"] > 0:
                if cfg["mlm_caption"] == "uniform":
                    mlm_k = losses.sample(losses.positive_weights(sim, valid, temp, "uniform"), gen)
                    mlm_rows = row_of[torch.arange(b, device=ids.device) * k + mlm_k]
                else:
                    mlm_rows = row_of[pos_slots]
                out["mlm"] = self._mlm(image_embeds, v_ids[mlm_rows], v_atts[mlm_rows], gen)
                total = total + w["mlm"] * out["mlm"]
        out["loss"] = total
        return out

    def _itm(self, image_embeds, text_tokens, text_atts, pos_rows, neg_rows, neg_image):
        """Positive (image, hard-positive caption) pairs vs a hard negative caption per image and a hard
        negative image per positive caption: 2-way cross-entropy on the ITM head (rows: compact batch)."""
        b = image_embeds.shape[0]
        image_all = torch.cat([image_embeds, image_embeds, image_embeds[neg_image]])
        text_rows = torch.cat([pos_rows, neg_rows, pos_rows])
        used, where = torch.unique(text_rows, return_inverse=True)
        text_embeds = text_tokens(used)[where]
        logits = self.model.itm_logits(image_all, None, *_trim_padding(text_embeds, text_atts[text_rows]))
        labels = torch.cat([torch.ones(b), torch.zeros(2 * b)]).long().to(logits.device)
        return nn.functional.cross_entropy(logits, labels)

    def _mlm(self, image_embeds, ids, atts, gen):
        ids, atts = _trim_padding(ids, atts)
        cfg = self.cfg
        if cfg["mask_style"] == "span":
            masked, predict = losses.span_mask_tokens(ids, atts, self.mask_id, self.vocab_size, cfg["mask_prob"],
                                                      cfg["max_masks"], cfg["mask_span_prob"], cfg["mask_span_max"],
                                                      gen)
        else:
            masked, predict = losses.mask_tokens(ids, atts, self.mask_id, self.vocab_high, self.special_ids,
                                                 cfg["mask_prob"], gen)
        logits = self.model.mlm_logits(masked, atts, image_embeds, None, predict)
        return losses.mlm_loss(logits, ids[predict])


def _trim_padding(x: torch.Tensor, atts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the padding columns no selected row needs: the K captions were padded to the longest of
    all B*K, which grows with K, while MITM and CMLM see a few of them (padding is on the right)."""
    length = max(1, int(atts.sum(dim=1).max()))
    if length == atts.shape[1] or bool(atts[:, length:].any()):  # nothing to drop, or left padding
        return x, atts
    return x[:, :length], atts[:, :length]


from ccrk.cl2cm import CL2CMObjective  # noqa: E402  (issue 8: CL2CM beside CCRk)

OBJECTIVES = {"ccrk": CCRKObjective, "cl2cm": CL2CMObjective}


def build_objective(model: CCRKModel, config: dict, tokenizer) -> nn.Module:
    name = config.get("objective", "ccrk")
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; available: {', '.join(sorted(OBJECTIVES))}")
    return OBJECTIVES[name](model, config, tokenizer)
