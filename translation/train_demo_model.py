"""Train the demo translator: a small M2M-100 (en -> es, id, ru, tr) on the demo caption grammar.

No model hub is reachable here, so the demo pipeline needs its own checkpoint. This script builds
one from scratch, deterministically (seeded, fixed thread count), and saves it in the published
``facebook/m2m100_418M`` layout so that it loads through :mod:`translation.m2m` exactly like a
real checkpoint:

1. every distinct English caption of the grammar (about 2,300) is rendered in all languages;
   a fixed 10% (by text hash) is held out for the accuracy test;
2. a SentencePiece BPE model is trained on all languages' text (plus capitalised variants);
3. ``vocab.json`` is the fairseq dictionary (``<s> <pad> </s> <unk>`` then the pieces); the 100
   ``__xx__`` language tokens and 8 made-up words follow, as in M2M-100;
4. an ``M2M100ForConditionalGeneration`` (d_model 128, 2+2 layers) is trained with teacher
   forcing on ``[__en__ x </s>] -> [</s> __xx__ y]``, the target-language token being the
   forced first decoder token, as in M2M-100.

Usage: ``python -m translation.train_demo_model [--out translation/demo_model] [--epochs N]``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import shutil
import tempfile
import time

from storage.demo import grammar
from translation import m2m

TARGET_LANGS = ("es", "id", "ru", "tr")
HELDOUT_PERCENT = 10
SEED = 0


def all_captions() -> list[dict[str, str]]:
    """Every distinct English caption of the grammar, rendered in every language (sorted by English)."""
    phrases: list[grammar.Phrase] = []
    for shape in grammar.SHAPES:
        for color in grammar.COLORS:
            for size in grammar.SIZES:
                phrases.append(grammar.Phrase("size", (grammar.Obj(shape, color, size, "left"),)))
                for pos in grammar.POSITIONS:
                    phrases.append(grammar.Phrase("size_position", (grammar.Obj(shape, color, size, pos),)))
            for pos in grammar.POSITIONS:
                phrases.append(grammar.Phrase("position", (grammar.Obj(shape, color, "small", pos),)))
            for shape2 in grammar.SHAPES:
                for color2 in grammar.COLORS:
                    a = grammar.Obj(shape, color, "small", "left")
                    b = grammar.Obj(shape2, color2, "small", "right")
                    phrases.append(grammar.Phrase("pair", (a, b)))
    by_en: dict[str, dict[str, str]] = {}
    for p in phrases:
        rendered = grammar.render_all(p)
        by_en.setdefault(rendered["en"], rendered)
    return [by_en[k] for k in sorted(by_en)]


def is_heldout(en: str) -> bool:
    return int(hashlib.sha256(en.encode()).hexdigest()[:8], 16) % 100 < HELDOUT_PERCENT


def split_captions() -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """(train, heldout): the held-out captions are never seen in training."""
    rows = all_captions()
    return [r for r in rows if not is_heldout(r["en"])], [r for r in rows if is_heldout(r["en"])]


def augment(text: str, capitalise: bool, period: bool) -> str:
    if capitalise:
        text = text[:1].upper() + text[1:]
    if period:
        text += "."
    return text


def build_tokenizer_files(out: str, rows: list[dict[str, str]], vocab_size: int = 560) -> None:
    """sentencepiece.bpe.model, vocab.json, tokenizer_config.json, special_tokens_map.json."""
    import sentencepiece as spm

    lines = []
    for r in rows:
        for lang in grammar.LANGS:
            lines += [r[lang], augment(r[lang], True, True)]
    with tempfile.TemporaryDirectory() as tmp:
        corpus = os.path.join(tmp, "corpus.txt")
        with open(corpus, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
        spm.SentencePieceTrainer.train(
            input=corpus, model_prefix=os.path.join(tmp, "spm"), vocab_size=vocab_size, model_type="bpe",
            character_coverage=1.0, hard_vocab_limit=False, num_threads=1, minloglevel=2,
            shuffle_input_sentence=False)
        shutil.copy(os.path.join(tmp, "spm.model"), os.path.join(out, "sentencepiece.bpe.model"))
    strip_training_paths(os.path.join(out, "sentencepiece.bpe.model"))
    sp = spm.SentencePieceProcessor(model_file=os.path.join(out, "sentencepiece.bpe.model"))
    # The fairseq dictionary: specials first, then every ordinary piece.
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for i in range(sp.get_piece_size()):
        if not (sp.is_control(i) or sp.is_unknown(i)):
            vocab.setdefault(sp.id_to_piece(i), len(vocab))
    lang_tokens = [m2m.lang_token(c) for c in m2m.m2m_language_codes()]
    specials = {"bos_token": "<s>", "eos_token": "</s>", "sep_token": "</s>", "pad_token": "<pad>",
                "unk_token": "<unk>"}
    _write_json(os.path.join(out, "vocab.json"), vocab)
    _write_json(os.path.join(out, "special_tokens_map.json"),
                {**specials, "additional_special_tokens": lang_tokens})
    _write_json(os.path.join(out, "tokenizer_config.json"),
                {**specials, "tokenizer_class": "M2M100Tokenizer", "language_codes": "m2m100",
                 "num_madeup_words": 8, "model_max_length": 128, "src_lang": "en", "tgt_lang": None,
                 "sp_model_kwargs": {}, "additional_special_tokens": lang_tokens})


def strip_training_paths(spm_path: str) -> None:
    """Drop the temporary paths SentencePiece records in the model, so that runs are byte-identical."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    with open(spm_path, "rb") as f:
        proto.ParseFromString(f.read())
    proto.trainer_spec.model_prefix = "sentencepiece.bpe"
    del proto.trainer_spec.input[:]
    proto.trainer_spec.input.append("corpus.txt")
    with open(spm_path, "wb") as f:
        f.write(proto.SerializeToString())


def _write_json(path: str, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=2)
        f.write("\n")


def model_config(vocab_size: int):
    from transformers import M2M100Config

    return M2M100Config(
        vocab_size=vocab_size, max_position_embeddings=128, d_model=128,
        encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=384, decoder_ffn_dim=384, encoder_layerdrop=0.0, decoder_layerdrop=0.0,
        dropout=0.1, attention_dropout=0.0, activation_dropout=0.0, scale_embedding=True,
        pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2,
        tie_word_embeddings=True)


def greedy_translate(model, tok, texts: list[str], lang: str, batch_size: int = 128) -> list[str]:
    import torch

    out: list[str] = []
    tok.src_lang = "en"
    for i in range(0, len(texts), batch_size):
        enc = tok(texts[i:i + batch_size], return_tensors="pt", padding=True)
        with torch.no_grad():
            gen = model.generate(**enc, forced_bos_token_id=tok.get_lang_id(lang), num_beams=1,
                                 do_sample=False, max_length=2 * enc["input_ids"].shape[1] + 12)
        out += tok.batch_decode(gen, skip_special_tokens=True)
    return out


def heldout_accuracy(model, tok, heldout: list[dict[str, str]]) -> dict[str, float]:
    model.eval()
    acc = {}
    for lang in TARGET_LANGS:
        hyps = greedy_translate(model, tok, [r["en"] for r in heldout], lang)
        acc[lang] = sum(h == r[lang] for h, r in zip(hyps, heldout)) / len(heldout)
    return acc


def train(out: str, epochs: int = 8, batch_size: int = 64, lr: float = 2e-3, seed: int = SEED,
          threads: int = 1) -> dict[str, float]:
    import torch
    import torch.nn.functional as F
    from transformers import M2M100ForConditionalGeneration, GenerationConfig

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    rng = random.Random(seed)
    os.makedirs(out, exist_ok=True)
    train_rows, heldout = split_captions()
    build_tokenizer_files(out, train_rows + heldout)  # the vocabulary covers every word; pairs do not
    from transformers import M2M100Tokenizer

    tok = M2M100Tokenizer.from_pretrained(out, src_lang="en", additional_special_tokens=[
        m2m.lang_token(c) for c in m2m.m2m_language_codes()])
    vocab_size = len(tok.encoder) + len(m2m.m2m_language_codes()) + tok.num_madeup_words
    model = M2M100ForConditionalGeneration(model_config(vocab_size))
    model.generation_config = GenerationConfig(
        decoder_start_token_id=2, bos_token_id=0, eos_token_id=2, pad_token_id=1, num_beams=1,
        max_length=128)

    src_cache: dict[str, list[int]] = {}
    tgt_cache: dict[tuple[str, str], list[int]] = {}

    def src_ids(text: str) -> list[int]:
        if text not in src_cache:
            src_cache[text] = tok(text)["input_ids"]
        return src_cache[text]

    def tgt_ids(text: str, lang: str) -> list[int]:
        key = (text, lang)
        if key not in tgt_cache:
            pieces = tok.sp_model.encode(text, out_type=str)
            tgt_cache[key] = ([tok.get_lang_id(lang)] + [tok.encoder.get(p, 3) for p in pieces]
                              + [tok.eos_token_id])
        return tgt_cache[key]

    pairs = [(r["en"], lang, r[lang]) for r in train_rows for lang in TARGET_LANGS]
    steps_per_epoch = math.ceil(len(pairs) / batch_size)
    total = epochs * steps_per_epoch
    warmup = min(300, total // 10)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / total))))
    step, t0 = 0, time.time()
    for epoch in range(epochs):
        model.train()
        rng.shuffle(pairs)
        running = 0.0
        for b in range(0, len(pairs), batch_size):
            srcs, tgts = [], []
            for en, lang, tgt in pairs[b:b + batch_size]:
                cap, per = rng.random() < 0.15, rng.random() < 0.15
                srcs.append(src_ids(augment(en, cap, per)))
                tgts.append(tgt_ids(augment(tgt, cap, per), lang))
            ls, lt = max(map(len, srcs)), max(map(len, tgts))
            input_ids = torch.tensor([s + [1] * (ls - len(s)) for s in srcs])
            labels = torch.tensor([t + [-100] * (lt - len(t)) for t in tgts])
            logits = model(input_ids=input_ids, attention_mask=(input_ids != 1).long(), labels=labels).logits
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                   ignore_index=-100, label_smoothing=0.1)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            step += 1
            running += loss.item()
        msg = f"epoch {epoch + 1}/{epochs} step {step} loss {running / steps_per_epoch:.4f} {time.time() - t0:.0f}s"
        if (epoch + 1) % 4 == 0 or epoch + 1 == epochs:
            msg += f" heldout exact-match {heldout_accuracy(model, tok, heldout)}"
        print(msg, flush=True)
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    acc = heldout_accuracy(m2m.load_model(out), m2m.load_tokenizer(out), heldout)
    print(f"saved {out}; held-out exact-match per language (reloaded): {acc}", flush=True)
    return acc


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=m2m.DEMO_MODEL_DIR)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--seed", type=int, default=SEED)
    # One thread: on a shared, loaded machine two OpenMP threads ran 10x slower than one.
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    train(args.out, epochs=args.epochs, seed=args.seed, threads=args.threads)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


def save_random_model(out: str, tokenizer_dir: str = m2m.DEMO_MODEL_DIR, d_model: int = 512, layers: int = 6,
                      ffn_dim: int = 2048, heads: int = 8, seed: int = 0) -> str:
    """An untrained M2M-100 of the given size with the demo tokenizer (benchmarks and engine tests)."""
    import torch
    from transformers import GenerationConfig, M2M100Config, M2M100ForConditionalGeneration

    os.makedirs(out, exist_ok=True)
    for name in m2m.TOKENIZER_FILES:
        shutil.copy(os.path.join(tokenizer_dir, name), os.path.join(out, name))
    with open(os.path.join(tokenizer_dir, "config.json"), encoding="utf-8") as f:
        vocab_size = json.load(f)["vocab_size"]
    torch.manual_seed(seed)
    config = M2M100Config(
        vocab_size=vocab_size, max_position_embeddings=256, d_model=d_model, encoder_layers=layers,
        decoder_layers=layers, encoder_attention_heads=heads, decoder_attention_heads=heads,
        encoder_ffn_dim=ffn_dim, decoder_ffn_dim=ffn_dim, encoder_layerdrop=0.0, decoder_layerdrop=0.0,
        pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2)
    model = M2M100ForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(decoder_start_token_id=2, bos_token_id=0, eos_token_id=2,
                                               pad_token_id=1, num_beams=1, max_length=256)
    model.save_pretrained(out, safe_serialization=True)
    return out
