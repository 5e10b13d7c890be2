"""The reference engine: transformers ``generate`` on the M2M-100 checkpoint (CPU or CUDA).

Same tokenisation, batching and length caps as every engine (:mod:`translation.engines.base`);
greedy outputs equal the CTranslate2 engine's on the same model (tested).
"""
from __future__ import annotations

from storage.errors import CCRKError
from translation import m2m
from translation.engines.base import Engine

_DTYPES = {"auto": None, "default": None, "float32": "float32", "float16": "float16", "bfloat16": "bfloat16"}


class TransformersEngine(Engine):
    name = "transformers"

    def __init__(self, model_dir: str, device: str = "cpu", compute_type: str = "auto", threads: int = 0,
                 **kwargs):
        import torch

        if threads:
            torch.set_num_threads(threads)
        super().__init__(model_dir, device=device, compute_type=compute_type, **kwargs)
        self.model = m2m.load_model(self.model_dir, device=device, dtype=getattr(torch, self.compute_type))
        self.pad_id = self.tokenizer.pad_token_id
        self.eos_id = self.tokenizer.eos_token_id

    def _resolve_compute_type(self, compute_type: str) -> str:
        if compute_type not in _DTYPES:
            raise CCRKError(f"compute type {compute_type!r} is not available to the transformers engine; "
                            f"choose one of: {', '.join(_DTYPES)}")
        if _DTYPES[compute_type] is None:
            return "float32" if self.device == "cpu" else "float16"
        return _DTYPES[compute_type]

    def _generate(self, sources, tgt_lang, max_output):
        import torch
        from transformers import GenerationConfig

        ids = [self.tokenizer.convert_tokens_to_ids(s) for s in sources]
        width = max(map(len, ids))
        input_ids = torch.tensor([s + [self.pad_id] * (width - len(s)) for s in ids], device=self.device)
        config = GenerationConfig(
            decoder_start_token_id=self.model.config.decoder_start_token_id, bos_token_id=self.tokenizer.bos_token_id,
            eos_token_id=self.eos_id, pad_token_id=self.pad_id, forced_bos_token_id=self.tokenizer.get_lang_id(tgt_lang),
            num_beams=self.settings.beam_size, do_sample=False, max_length=max_output + 2)  # + start and language tokens
        with torch.inference_mode():
            out = self.model.generate(input_ids=input_ids, attention_mask=(input_ids != self.pad_id).long(),
                                      generation_config=config)
        results = []
        for row in out.tolist():
            row = row[2:]  # decoder start (</s>) and the forced language token
            if self.eos_id in row:
                row = row[:row.index(self.eos_id)]
            results.append(self.tokenizer.convert_ids_to_tokens(row))
        return results
