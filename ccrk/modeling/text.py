"""The multilingual text encoder and the fusion encoder: XLM-R layers split in two halves.

The first ``text_layers`` are text-only (they give the contrastive text feature); the next
``fusion_layers`` add cross-attention to the image tokens. Layers are transformers
``XLMRobertaLayer`` modules, so an XLM-R checkpoint loads by name after selecting layers (the
paper takes XLM-R large's odd layers: 1, 3, ..., 23). Cross-attention weights are new.

The computation is the authors' (X-VLM's ``xbert``, which CCRk's code uses; checked against
their outputs in ``tests/test_parity_model.py``): BERT-style positions 0..L-1 for every row even
with XLM-R weights (no ``padding_idx + 1`` offset), and cross-attention keys and values projected
straight from the image tokens' width. Each layer's forward is written here on the HF modules'
weights, so that padding is skipped, the last layer can run at CLS alone and the image side of
cross-attention can be computed once per image (:meth:`TextFusionEncoder.image_keys_values`).
"""
from __future__ import annotations

import copy
import os

import torch
import torch.nn.functional as F
from torch import nn

from storage.errors import CCRKError

# XLM-R's released configs (and the authors' text encoder) use 1e-5, not transformers' 1e-12 default.
XLMR_LAYER_NORM_EPS = 1e-5


def xlmr_config(cfg: dict, vocab_size: int):
    from transformers import XLMRobertaConfig

    init = cfg.get("init", "random")
    if init != "random":
        config = XLMRobertaConfig.from_pretrained(init)
    else:
        config = XLMRobertaConfig(
            vocab_size=vocab_size, hidden_size=cfg["hidden_size"], num_attention_heads=cfg["num_heads"],
            intermediate_size=cfg["intermediate_size"], max_position_embeddings=cfg.get("max_position", 514),
            pad_token_id=1, bos_token_id=0, eos_token_id=2, type_vocab_size=1)
    config.layer_norm_eps = float(cfg.get("layer_norm_eps", XLMR_LAYER_NORM_EPS))
    if "dropout" in cfg:
        config.hidden_dropout_prob = config.attention_probs_dropout_prob = float(cfg["dropout"])
    if "init_std" in cfg:  # random init only: a tiny model learns faster from a wider start
        config.initializer_range = float(cfg["init_std"])
    config.num_hidden_layers = cfg["text_layers"] + cfg["fusion_layers"]
    config._attn_implementation = "sdpa"
    return config


def select_layers(spec, n_source: int, n_target: int) -> list[int]:
    """Which source layers feed our layers: ``odd`` (1, 3, ...), ``first`` or an explicit list."""
    if spec == "odd":
        layers = list(range(1, n_source, 2))
    elif spec == "first":
        layers = list(range(n_source))
    else:
        layers = [int(i) for i in spec]
    if len(layers) < n_target:
        raise ValueError(f"layer selection {spec!r} gives {len(layers)} layers, need {n_target}")
    return layers[:n_target]


def _bool_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    """[B, L] 0/1 -> [B, 1, 1, L] bool for SDPA (True = attend); None when nothing is masked."""
    if mask is None or bool(mask.all()):
        return None
    return mask[:, None, None, :].bool()


def _packed_layer(layer, x: torch.Tensor, real: torch.Tensor, n: int, length: int, mask: torch.Tensor) -> torch.Tensor:
    """One text-only ``XLMRobertaLayer`` on packed tokens ``x`` [T, D] (``real``: their positions in
    the padded [n * length] grid; ``mask``: [n, 1, 1, length] bool). The projections, feed-forward
    and layer norms -- nearly all of the work -- see the T real tokens only; attention alone runs
    padded. Same weights and the same result as ``layer(padded, attention_mask=mask)`` on real tokens."""
    sa = layer.attention.self
    heads, head = sa.num_attention_heads, sa.attention_head_size
    q, k, v = (_heads(proj(x), real, n, length, heads) for proj in (sa.query, sa.key, sa.value))
    attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=sa.dropout.p if sa.training else 0.0,
                                          scale=sa.scaling)
    attn = attn.transpose(1, 2).reshape(n * length, heads * head).index_select(0, real)
    x = layer.attention.output(attn, x)
    return layer.output(layer.intermediate(x), x)


def _unpack(x: torch.Tensor, real: torch.Tensor, n: int, length: int) -> torch.Tensor:
    """Packed tokens [T, D] back to the padded [n, length, D] grid (zeros at padding)."""
    return x.new_zeros(n * length, x.shape[-1]).index_copy(0, real, x).view(n, length, x.shape[-1])


def _heads(t: torch.Tensor, real: torch.Tensor, n: int, length: int, heads: int) -> torch.Tensor:
    """Packed [T, D] projections as padded attention heads [n, heads, length, D / heads]."""
    return _unpack(t, real, n, length).view(n, length, heads, -1).transpose(1, 2)


def _cls_layer(layer, x: torch.Tensor, real: torch.Tensor, n: int, length: int, mask, cls_rows: torch.Tensor) -> torch.Tensor:
    """One text-only layer's output at the CLS token of each of the ``n`` sequences: [n, D]. Keys and
    values come from every token (packed ``x``); the rest of the layer runs on the CLS rows only."""
    sa = layer.attention.self
    heads, head = sa.num_attention_heads, sa.attention_head_size
    cls = x.index_select(0, cls_rows)
    query = sa.query(cls).view(n, heads, 1, head)
    attn = F.scaled_dot_product_attention(query, _heads(sa.key(x), real, n, length, heads),
                                          _heads(sa.value(x), real, n, length, heads), attn_mask=mask,
                                          dropout_p=sa.dropout.p if sa.training else 0.0, scale=sa.scaling)
    cls = layer.attention.output(attn.reshape(n, heads * head), cls)
    return layer.output(layer.intermediate(cls), cls)


class TextState:
    """Packed text tokens between two text-only layers (see ``TextFusionEncoder.encode_cls``)."""

    def __init__(self, x: torch.Tensor, real: torch.Tensor, attention_mask: torch.Tensor, n: int, length: int):
        self.x, self.real, self.attention_mask, self.n, self.length = x, real, attention_mask, n, length
        # Where each sequence's first (CLS) token lies among the packed tokens.
        self.cls_rows = torch.searchsorted(real, torch.arange(n, device=real.device) * length)


class TextFusionEncoder(nn.Module):
    def __init__(self, cfg: dict, vocab_size: int, vision_width: int):
        super().__init__()
        from transformers.models.xlm_roberta.modeling_xlm_roberta import (
            XLMRobertaEmbeddings,
            XLMRobertaLayer,
            XLMRobertaLMHead,
        )

        self.config = xlmr_config(cfg, vocab_size)
        self.n_text = cfg["text_layers"]
        fusion_config = copy.deepcopy(self.config)
        fusion_config.is_decoder, fusion_config.add_cross_attention = True, True
        self.embeddings = XLMRobertaEmbeddings(self.config)
        self.text_layers = nn.ModuleList([XLMRobertaLayer(self.config) for _ in range(self.n_text)])
        self.fusion_layers = nn.ModuleList([XLMRobertaLayer(fusion_config) for _ in range(cfg["fusion_layers"])])
        for layer in self.fusion_layers:
            layer.attention.self.is_causal = False  # a decoder-flagged layer, but bidirectional self-attention
        self.lm_head = XLMRobertaLMHead(self.config)
        hidden = self.config.hidden_size
        # Cross-attention keys and values read the image tokens at their own width (X-VLM's
        # encoder_width): Swin-B and XLM-R large are both 1024, the CPU-sized models are not.
        for layer in self.fusion_layers:
            ca = layer.crossattention.self
            ca.key, ca.value = nn.Linear(vision_width, hidden), nn.Linear(vision_width, hidden)
        # Positions are 0..L-1 for every row, so row 1 of the table is a real position, not padding.
        self.embeddings.position_embeddings.padding_idx = None
        self.apply(self._init_weights)
        self._tie_lm_head()
        self.pretrained_names: set[str] = set()
        if cfg.get("init", "random") != "random":
            self.pretrained_names = self._load_xlmr(cfg["init"], cfg.get("layers", "odd"))

    def _tie_lm_head(self) -> None:
        """As in XLM-R, the MLM decoder's weight is the word embedding. Its bias is the decoder's own:
        transformers ties the head's separate ``bias`` to it only inside its PreTrainedModel, and this
        head is used on its own, so ``lm_head.bias`` is never read. It stays (checkpoints carry it,
        equal to the decoder's) but frozen: a trainable parameter without a gradient stopped DDP
        (no unused-parameter search) at step 2."""
        self.lm_head.decoder.weight = self.embeddings.word_embeddings.weight
        self.lm_head.bias.requires_grad_(False)

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def _load_xlmr(self, directory: str, layer_spec) -> set[str]:
        """Copy XLM-R weights (embeddings, the selected layers, the LM head); returns the loaded names."""
        path = os.path.join(directory, "model.safetensors")
        if os.path.exists(path):
            from safetensors.torch import load_file

            source = load_file(path)
        elif os.path.exists(os.path.join(directory, "pytorch_model.bin")):
            source = torch.load(os.path.join(directory, "pytorch_model.bin"), map_location="cpu", weights_only=True)
        else:
            raise CCRKError(f"{directory} has neither model.safetensors nor pytorch_model.bin")
        source = {k.removeprefix("roberta."): v for k, v in source.items()}
        n_source = 1 + max(int(k.split(".")[2]) for k in source if k.startswith("encoder.layer."))
        picked = select_layers(layer_spec, n_source, len(self.text_layers) + len(self.fusion_layers))
        mapped: dict[str, torch.Tensor] = {}
        for k, v in source.items():
            if k.startswith("embeddings.") or k.startswith("lm_head."):
                mapped[k] = v
                if k == "lm_head.bias" and "lm_head.decoder.bias" not in source:  # saved once, tied
                    mapped["lm_head.decoder.bias"] = v
            elif k.startswith("encoder.layer."):
                src = int(k.split(".")[2])
                rest = k.split(".", 3)[3]
                if src in picked:
                    ours = picked.index(src)
                    prefix = f"text_layers.{ours}" if ours < self.n_text else f"fusion_layers.{ours - self.n_text}"
                    mapped[f"{prefix}.{rest}"] = v
        own = self.state_dict()
        loaded = {k: v for k, v in mapped.items() if k in own and own[k].shape == v.shape}
        self.load_state_dict(loaded, strict=False)
        self._tie_lm_head()
        return set(loaded) | {"lm_head.decoder.weight"}

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings [B, L, D] with positions 0..L-1 in every row, as the authors' BERT
        embeddings give (HF's XLM-R would start at ``padding_idx + 1`` and skip padding)."""
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        return self.embeddings(input_ids=input_ids, position_ids=positions)

    def _pack(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> TextState:
        """The embeddings of the real tokens, packed [T, D], before any text layer."""
        h = self.embed(input_ids)
        n, length, width = h.shape
        real = torch.nonzero(attention_mask.reshape(-1)).squeeze(1)
        return TextState(h.reshape(n * length, width).index_select(0, real), real, attention_mask, n, length)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Text-only layers: [B, L, D] (zeros at padding positions).

        The layers run on the real tokens only (see :func:`_packed_layer`): the K captions of an
        image differ in length across languages, and padding all of them to the longest one would
        spend much of the text encoder's work on padding."""
        s = self._pack(input_ids, attention_mask)
        mask, x = _bool_mask(attention_mask), s.x
        for layer in self.text_layers:
            x = _packed_layer(layer, x, s.real, s.n, s.length, mask)
        return _unpack(x, s.real, s.n, s.length)

    def encode_cls(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, TextState]:
        """The text-only layers' CLS output [B, D] -- what the contrastive feature needs -- and the
        state from which :meth:`finish` gives chosen rows' every token.

        The last text layer computes its keys and values for every token but its query,
        feed-forward and layer norms for the CLS token alone: with K captions per image, most
        captions feed the contrastive loss only, and MITM reads a few rows (:meth:`finish`).
        ``encode_cls(...)[0] == encode(...)[:, 0]`` and ``finish(state, rows) == encode(...)[rows]``."""
        s = self._pack(input_ids, attention_mask)
        mask = _bool_mask(attention_mask)
        for layer in self.text_layers[:-1]:
            s.x = _packed_layer(layer, s.x, s.real, s.n, s.length, mask)
        return _cls_layer(self.text_layers[-1], s.x, s.real, s.n, s.length, mask, s.cls_rows), s

    def finish(self, state: TextState, rows: torch.Tensor) -> torch.Tensor:
        """Every token of the text-only layers' output for captions ``rows`` of ``state``: [R, L, D]."""
        grid = _unpack(state.x, state.real, state.n, state.length)[rows]
        atts = state.attention_mask[rows]
        r, length, width = grid.shape
        real = torch.nonzero(atts.reshape(-1)).squeeze(1)
        x = grid.reshape(r * length, width).index_select(0, real)
        x = _packed_layer(self.text_layers[-1], x, real, r, length, _bool_mask(atts))
        return _unpack(x, real, r, length)

    def image_keys_values(self, image_embeds: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each fusion layer's cross-attention keys and values of the image tokens, as heads
        [B, heads, P, D / heads]: they depend on the image alone, so re-ranking computes them once
        per image however many texts it is paired with."""
        out = []
        for layer in self.fusion_layers:
            ca = layer.crossattention.self
            heads = ca.num_attention_heads
            b, p, _ = image_embeds.shape
            out.append(tuple(proj(image_embeds).view(b, p, heads, -1).transpose(1, 2) for proj in (ca.key, ca.value)))
        return out

    def fuse(self, text_embeds, text_atts, image_embeds=None, image_atts=None, image_kv=None,
             cls_only: bool = False) -> torch.Tensor:
        """Fusion layers: text tokens attend to themselves and to the image tokens: [B, L, D].

        ``image_kv`` (from :meth:`image_keys_values`, rows matching the texts) replaces
        ``image_embeds``; ``cls_only`` runs the last layer's query side at CLS alone and returns
        [B, 1, D], all that matching needs."""
        h, mask = text_embeds, _bool_mask(text_atts)
        image_mask = _bool_mask(image_atts)
        if image_kv is None:
            image_kv = self.image_keys_values(image_embeds)
        last = len(self.fusion_layers) - 1
        for i, (layer, kv) in enumerate(zip(self.fusion_layers, image_kv)):
            h = _fusion_layer(layer, h, mask, kv, image_mask, cls_only and i == last)
        return h


def _attend(sa, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask) -> torch.Tensor:
    """Multi-head attention of ``query`` [B, Q, D] over head-shaped keys/values [B, heads, K, d]: [B, Q, D].
    Keys and values of one row ([1, heads, K, d], unmasked) serve all B rows as one query sequence."""
    b, q_len, width = query.shape
    if key.shape[0] == 1 < b and mask is None:  # one image's tokens for many texts: one large product
        return _attend(sa, query.reshape(1, b * q_len, width), key, value, None).view(b, q_len, width)
    q = query.view(b, q_len, sa.num_attention_heads, -1).transpose(1, 2)
    out = F.scaled_dot_product_attention(q, key, value, attn_mask=mask,
                                         dropout_p=sa.dropout.p if sa.training else 0.0, scale=sa.scaling)
    return out.transpose(1, 2).reshape(b, q_len, width)


def _fusion_layer(layer, h: torch.Tensor, mask, image_kv, image_mask, cls_only: bool) -> torch.Tensor:
    """One post-LN fusion layer: self-attention over the text, cross-attention to the image, FFN.
    ``cls_only``: keys and values from every token, the rest at the CLS token alone ([B, 1, D])."""
    sa = layer.attention.self
    b, length, _ = h.shape
    heads = sa.num_attention_heads
    key, value = (proj(h).view(b, length, heads, -1).transpose(1, 2) for proj in (sa.key, sa.value))
    if cls_only:
        h = h[:, :1]
    h = layer.attention.output(_attend(sa, sa.query(h), key, value, mask), h)
    ca = layer.crossattention.self
    h = layer.crossattention.output(_attend(ca, ca.query(h), *image_kv, image_mask), h)
    return layer.output(layer.intermediate(h), h)
