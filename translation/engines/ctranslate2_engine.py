"""The default engine: CTranslate2 (CPU float32/int8, GPU float16/bfloat16/int8_float16).

The M2M-100 directory is converted once, through the same model and tokenizer loading path as
every engine (:mod:`translation.m2m`, language tokens registered), and the conversion is cached
by the model's content hash: ``<cache_dir>/ct2-<hash>/``, written to a temporary directory and
renamed into place so that a killed conversion never leaves a half-written cache.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile

from storage.errors import CCRKError
from translation import m2m
from translation.engines.base import Engine

log = logging.getLogger(__name__)

DEFAULT_CACHE_ENV = "CCRK_CACHE_DIR"


def default_cache_dir() -> str:
    return os.environ.get(DEFAULT_CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "ccrk")


def converted_model_dir(model_dir: str, cache_dir: str | None = None) -> str:
    """The CTranslate2 conversion of ``model_dir`` (float32 weights), converting it if not cached."""
    import ctranslate2.converters

    model_dir = m2m.check_model_dir(model_dir)
    cache_dir = os.path.join(cache_dir or default_cache_dir(), "ctranslate2")
    target = os.path.join(cache_dir, "ct2-" + m2m.content_hash(model_dir)[:16])
    if os.path.isfile(os.path.join(target, "model.bin")):
        return target

    class _Converter(ctranslate2.converters.TransformersConverter):
        # Load exactly as the engines do: the language tokens must be special tokens.
        def load_model(self, model_class, model_name_or_path, **kwargs):
            return m2m.load_model(model_name_or_path)

        def load_tokenizer(self, tokenizer_class, model_name_or_path, **kwargs):
            return m2m.load_tokenizer(model_name_or_path)

    os.makedirs(cache_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-ct2-", dir=cache_dir)
    try:
        log.info("converting %s to CTranslate2 in %s", model_dir, target)
        _Converter(model_dir).convert(os.path.join(tmp, "model"), force=True)
        try:
            os.replace(os.path.join(tmp, "model"), target)
        except OSError:
            if not os.path.isfile(os.path.join(target, "model.bin")):  # not a concurrent winner: real error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


class CTranslate2Engine(Engine):
    name = "ctranslate2"

    def __init__(self, model_dir: str, device: str = "cpu", compute_type: str = "auto", threads: int = 0,
                 cache_dir: str | None = None, **kwargs):
        import ctranslate2

        super().__init__(model_dir, device=device, compute_type=compute_type, **kwargs)
        self.converted_dir = converted_model_dir(self.model_dir, cache_dir)
        kind, _, index = device.partition(":")
        self.translator = ctranslate2.Translator(
            self.converted_dir, device=kind, device_index=int(index or 0), compute_type=self.compute_type,
            inter_threads=1, intra_threads=threads)

    def _resolve_compute_type(self, compute_type: str) -> str:
        import ctranslate2

        kind = self.device.partition(":")[0]
        if compute_type in ("auto", None):
            # int8 is CTranslate2's fast CPU path; float16 the usual GPU one.
            return "int8" if kind == "cpu" else "float16"
        supported = sorted(ctranslate2.get_supported_compute_types(kind))
        if compute_type not in supported and compute_type != "default":
            raise CCRKError(f"compute type {compute_type!r} is not supported on {kind}; "
                            f"choose one of: {', '.join(supported)}")
        return compute_type

    def _generate(self, sources, tgt_lang, max_output):
        prefix = [m2m.lang_token(tgt_lang)]
        results = self.translator.translate_batch(
            sources, target_prefix=[prefix] * len(sources), beam_size=self.settings.beam_size,
            max_decoding_length=max_output + 1, max_input_length=0, max_batch_size=0, num_hypotheses=1)
        return [r.hypotheses[0][1:] for r in results]
