"""A local M2M-100 model directory: check it, load it, name it (one loading path for every checkpoint).

The published layout (``facebook/m2m100_418M``) is ``config.json``, ``generation_config.json``,
``model.safetensors`` (or ``pytorch_model.bin``), ``sentencepiece.bpe.model``, ``vocab.json``,
``tokenizer_config.json`` and ``special_tokens_map.json``. The demo translator uses the same files
and is loaded by exactly these functions.

The language-token trap: ``M2M100Tokenizer`` does not register the ``__xx__`` language tokens as
special tokens by itself, so ``decode(skip_special_tokens=True)`` leaks ``__es__`` and the
CTranslate2 converter rejects the vocabulary. :func:`load_tokenizer` always passes them as
``additional_special_tokens``.
"""
from __future__ import annotations

import hashlib
import json
import os
import re

from storage.errors import CCRKError

TOKENIZER_FILES = ("sentencepiece.bpe.model", "vocab.json", "tokenizer_config.json", "special_tokens_map.json")
CONFIG_FILES = ("config.json", "generation_config.json")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# The files that make a model's content (its hash, hence its model_id and conversion cache key).
CONTENT_FILES = CONFIG_FILES + WEIGHT_FILES + TOKENIZER_FILES

DEMO_MODEL_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo_model")


def m2m_language_codes() -> list[str]:
    """The 100 language codes of the published M2M-100 vocabulary, in vocabulary order."""
    from transformers.models.m2m_100.tokenization_m2m_100 import FAIRSEQ_LANGUAGE_CODES

    return list(FAIRSEQ_LANGUAGE_CODES["m2m100"])


def lang_token(lang: str) -> str:
    return f"__{lang}__"


def check_model_dir(path: str) -> str:
    """The absolute model directory, or a CCRKError naming the first missing file."""
    path = os.path.abspath(os.path.expanduser(str(path)))
    if not os.path.isdir(path):
        raise CCRKError(f"M2M-100 model directory {path} does not exist")
    for name in CONFIG_FILES + TOKENIZER_FILES:
        if not os.path.isfile(os.path.join(path, name)):
            raise CCRKError(f"M2M-100 model directory {path} is missing {name}")
    if not any(os.path.isfile(os.path.join(path, n)) for n in WEIGHT_FILES):
        raise CCRKError(f"M2M-100 model directory {path} is missing model.safetensors (or pytorch_model.bin)")
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        model_type = json.load(f).get("model_type")
    if model_type != "m2m_100":
        raise CCRKError(f"{os.path.join(path, 'config.json')} has model_type {model_type!r}, expected 'm2m_100'")
    return path


def load_tokenizer(path: str, src_lang: str = "en"):
    """The model's M2M100Tokenizer with the language tokens registered as special tokens."""
    from transformers import M2M100Tokenizer

    path = check_model_dir(path)
    with open(os.path.join(path, "tokenizer_config.json"), encoding="utf-8") as f:
        codes_name = json.load(f).get("language_codes", "m2m100")
    from transformers.models.m2m_100.tokenization_m2m_100 import FAIRSEQ_LANGUAGE_CODES

    specials = [lang_token(c) for c in FAIRSEQ_LANGUAGE_CODES[codes_name]]
    return M2M100Tokenizer.from_pretrained(path, src_lang=src_lang, additional_special_tokens=specials)


def load_model(path: str, device: str = "cpu", dtype=None):
    """M2M100ForConditionalGeneration from the directory, in eval mode, on ``device``."""
    import torch
    from transformers import M2M100ForConditionalGeneration
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    path = check_model_dir(path)
    model = M2M100ForConditionalGeneration.from_pretrained(path, dtype=dtype or torch.float32)
    return model.to(device).eval()


def supported_langs(tokenizer) -> tuple[str, ...]:
    return tuple(sorted(tokenizer.lang_code_to_id))


def check_langs(langs, tokenizer) -> None:
    """A CCRKError listing the supported languages when one of ``langs`` is not one."""
    supported = supported_langs(tokenizer)
    bad = [lang for lang in langs if lang not in supported]
    if bad:
        raise CCRKError(f"unsupported target language(s) {', '.join(bad)}; the model supports: "
                        f"{', '.join(supported)}")


def content_hash(path: str) -> str:
    """sha256 over the model's content files (name + bytes), stable across copies and mtimes."""
    path = check_model_dir(path)
    h = hashlib.sha256()
    for name in CONTENT_FILES:
        full = os.path.join(path, name)
        if not os.path.isfile(full):
            continue
        h.update(name.encode() + b"\0")
        with open(full, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def model_id(path: str) -> str:
    """A readable store id: the directory name (slug) + 10 hex digits of the content hash."""
    path = check_model_dir(path)
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", os.path.basename(path.rstrip("/"))).strip("-.") or "model"
    return f"{name}-{content_hash(path)[:10]}"


def max_source_tokens(path: str) -> int:
    """The longest source the model accepts (positions), language and eos tokens included."""
    with open(os.path.join(check_model_dir(path), "config.json"), encoding="utf-8") as f:
        return int(json.load(f).get("max_position_embeddings", 1024))
