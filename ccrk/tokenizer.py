"""Tokenizers: the demo's tiny XLM-R-style SentencePiece tokenizer, and loading any local HF tokenizer dir.

The demo tokenizer is a SentencePiece BPE vocabulary trained on the demo grammar's captions in all five
languages, laid out like XLM-R (``<s> <pad> </s> <unk>`` first, ``<mask>`` last) and saved as a local
Hugging Face tokenizer directory. It is committed under ``ccrk/assets/demo-tokenizer``;
:func:`build_demo_tokenizer` rebuilds it deterministically.
"""
from __future__ import annotations

import os
import tempfile

from storage.demo import grammar
from storage.errors import CCRKError

DEMO_TOKENIZER_DIR = os.path.join(os.path.dirname(__file__), "assets", "demo-tokenizer")
# XLM-R's special-token layout: these ids come first, so random MLM replacements start after them.
N_LEADING_SPECIALS = 4


def demo_corpus_lines(n: int = 3000, seed: int = 0) -> list[str]:
    """Captions of the demo grammar in every language (the tokenizer's training text)."""
    return [text for row in grammar.parallel_corpus(n, seed=seed) for text in row.values()]


def build_demo_tokenizer(out_dir: str = DEMO_TOKENIZER_DIR, vocab_size: int = 600) -> str:
    """Train the demo SentencePiece vocabulary and save it as an XLM-R tokenizer dir; returns out_dir."""
    import sentencepiece as spm
    from transformers import XLMRobertaTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        prefix = os.path.join(tmp, "sp")
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(demo_corpus_lines()), model_prefix=prefix, vocab_size=vocab_size,
            model_type="bpe", character_coverage=1.0, hard_vocab_limit=False, num_threads=1,
            bos_id=-1, eos_id=-1, pad_id=-1, unk_id=0, minloglevel=2, max_sentencepiece_length=24,
            shuffle_input_sentence=False)
        sp = spm.SentencePieceProcessor(model_file=prefix + ".model")
        # Equal piece scores make the unigram decoder pick the fewest pieces, which reproduces the BPE
        # segmentation on this corpus (whole words), keeping demo captions <= 9 tokens.
        pieces = [(sp.id_to_piece(i), -1.0 - 1e-4 * i) for i in range(sp.get_piece_size()) if not sp.is_unknown(i)]
    vocab = [("<s>", 0.0), ("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + pieces + [("<mask>", 0.0)]
    tok = XLMRobertaTokenizer(vocab=vocab, model_max_length=64)
    tok.save_pretrained(out_dir)
    return out_dir


def load_tokenizer(name_or_dir: str):
    """``demo`` (the committed demo tokenizer) or a local HF tokenizer directory (e.g. xlm-roberta-large)."""
    from transformers import AutoTokenizer

    path = DEMO_TOKENIZER_DIR if name_or_dir == "demo" else name_or_dir
    if name_or_dir == "demo" and not os.path.exists(os.path.join(path, "tokenizer.json")):
        build_demo_tokenizer(path)
    if not os.path.isdir(path):
        raise CCRKError(f"tokenizer directory {path} does not exist")
    # A local directory only, and never its own code: a crafted tokenizer_config.json (auto_map) cannot
    # make transformers run a module it names, nor ask on a terminal whether to.
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=False, local_files_only=True)
    except ValueError as exc:
        if "trust_remote_code" not in str(exc):
            raise
        raise CCRKError(f"tokenizer directory {path} asks to run its own code (auto_map in "
                        f"tokenizer_config.json); ccrk never runs a checkpoint's code") from None
