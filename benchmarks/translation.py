"""Translation throughput: naive transformers vs our engines, same model, same captions, one process.

- naive: ``generate`` on fixed batches of 32 in input order, float32, the way the reference
  scripts (CCRk m2m script, EasyNMT) do it; its output cap is the same relative cap as ours,
  applied per batch (a fixed ``max_length=200`` would only make it slower on an untrained model);
  on a GPU also in float16 (``--naive-dtypes``), for reference;
- ours/transformers: the transformers engine (token-budget batches over length-sorted texts);
- ours/ctranslate2 float32 and int8 (int8 is the default engine on CPU; float16 on CUDA).

Greedy outputs of naive and ours/transformers are compared token for token (each text cut to its
own cap). Prints captions/s for each and, last, ``speedup_vs_naive=X.XX`` of the default engine
against naive float32.

Default model (``--size d512``): an untrained mid-size M2M-100 (d_model 512, 6+6 layers, FFN 2048)
with the demo tokenizer, built locally. ``--size 418m``: an untrained model of
``facebook/m2m100_418M``'s architecture (its config.json: d_model 1024, 12+12 layers, 16 heads,
FFN 4096, 1,024 positions, scaled embeddings) and its vocabulary size, 128,112: the demo
tokenizer's vocab.json padded with unused pieces to the real one's 128,004 entries, so that the
language tokens have the real ids (``__en__`` 128022) and every decoder step scores 128,112
logits. About 484M parameters, 1.9 GB in float32.

Random weights seldom emit ``</s>``, and each engine would stop at its own cap; ``--fixed-tokens
N`` (the default for 418m: 32) makes every contender generate exactly N target tokens per caption
(EOS suppressed: transformers ``min_length = max_length``, CTranslate2 ``min_decoding_length =
max_decoding_length``, the language token counted in both), checks that they did, and skips ours/transformers.
Token agreement with naive float32 is printed, but with random weights the logits are nearly tied,
so float16 (or int8) and float32 greedy paths part early: there it is no correctness check.
Captions: English captions from the demo grammar, 1-3 clauses each (so lengths vary as real
captions do); 2,000 by default, 512 at 418m.

  python benchmarks/translation.py [--captions 2000] [--threads 1]
  python benchmarks/translation.py --size 418m --device cuda          # the GPU check
  python benchmarks/translation.py --model /models/m2m100_418M --device cuda
"""
from __future__ import annotations

import argparse
import atexit
import gc
import json
import os
import random
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# facebook/m2m100_418M's config.json: its architecture (generation defaults set below: greedy).
M2M100_418M = dict(
    vocab_size=128112, max_position_embeddings=1024, d_model=1024, encoder_layers=12, decoder_layers=12,
    encoder_attention_heads=16, decoder_attention_heads=16, encoder_ffn_dim=4096, decoder_ffn_dim=4096,
    activation_function="relu", dropout=0.1, attention_dropout=0.1, activation_dropout=0.0,
    encoder_layerdrop=0.05, decoder_layerdrop=0.05, init_std=0.02, scale_embedding=True, use_cache=True,
    pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2)
M2M100_418M_VOCAB_JSON = 128004  # vocab.json entries; then 100 language tokens and 8 made-up words


def bench_captions(n: int, seed: int = 0) -> list[str]:
    from storage.demo.grammar import random_phrase, render

    rng = random.Random(seed)
    return [", ".join(render(random_phrase(rng), "en") for _ in range(rng.choice((1, 2, 3)))) for _ in range(n)]


def save_random_418m(out: str, seed: int = 0, device: str = "cpu") -> str:
    """An untrained M2M-100 of facebook/m2m100_418M's size and vocabulary size (see the module doc)."""
    import torch
    from transformers import GenerationConfig, M2M100Config, M2M100ForConditionalGeneration

    from translation import m2m

    os.makedirs(out, exist_ok=True)
    for name in m2m.TOKENIZER_FILES:
        shutil.copy(os.path.join(m2m.DEMO_MODEL_DIR, name), os.path.join(out, name))
    with open(os.path.join(out, "vocab.json"), encoding="utf-8") as f:
        vocab = json.load(f)
    for i in range(M2M100_418M_VOCAB_JSON - len(vocab)):  # pieces the SentencePiece model never produces
        vocab[f"<unused{i}>"] = len(vocab)
    with open(os.path.join(out, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(out, "tokenizer_config.json"), encoding="utf-8") as f:
        tok_config = json.load(f)
    tok_config["model_max_length"] = M2M100_418M["max_position_embeddings"]
    with open(os.path.join(out, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(tok_config, f, ensure_ascii=False, indent=2)
    n_tokens = len(vocab) + len(m2m.m2m_language_codes()) + tok_config["num_madeup_words"]
    assert n_tokens == M2M100_418M["vocab_size"], n_tokens
    torch.manual_seed(seed)
    with torch.device(device):  # initialising 484M weights is quicker on a GPU
        model = M2M100ForConditionalGeneration(M2M100Config(**M2M100_418M)).eval()
    model.generation_config = GenerationConfig(decoder_start_token_id=2, bos_token_id=0, eos_token_id=2,
                                               pad_token_id=1, num_beams=1, max_length=200)
    model.save_pretrained(out, safe_serialization=True)
    del model
    return out


def naive_translate(model_dir: str, texts: list[str], lang: str, device: str, settings, batch_size: int = 32,
                    dtype: str = "float32", fixed_tokens: int | None = None):
    """Reference-script style: fixed batches in input order, tokenizer + generate (float32 by default).

    Returns (target tokens per text, seconds): neither the model's loading nor a first warm-up
    batch is timed (CUDA start-up, cuBLAS handles, the weights' first touch), as for our engines.
    """
    import torch

    from translation import m2m

    tok = m2m.load_tokenizer(model_dir, src_lang="en")
    model = m2m.load_model(model_dir, device=device, dtype=getattr(torch, dtype))

    def run(batch_texts):
        outs = []
        for i in range(0, len(batch_texts), batch_size):
            enc = tok(batch_texts[i:i + batch_size], return_tensors="pt", padding=True).to(device)
            if fixed_tokens:  # decoder start, language token, then exactly fixed_tokens: EOS cannot end it early
                length = dict(min_length=fixed_tokens + 2, max_length=fixed_tokens + 2)
            else:
                length = dict(max_length=settings.max_output_tokens(enc["input_ids"].shape[1]) + 2)
            with torch.inference_mode():
                gen = model.generate(**enc, forced_bos_token_id=tok.get_lang_id(lang), num_beams=1,
                                     do_sample=False, **length)
            for row, n_src in zip(gen.tolist(), enc["attention_mask"].sum(1).tolist()):
                row = row[2:]
                if tok.eos_token_id in row:
                    row = row[:row.index(tok.eos_token_id)]
                row = tok.convert_ids_to_tokens(row)
                outs.append(row if fixed_tokens else row[:settings.max_output_tokens(n_src)])
        return outs

    run(texts[:batch_size])
    outs, seconds = timed(lambda: run(texts))
    model = None  # frees the weights (a del would leave run() a name it cannot see)
    _free()
    return outs, seconds


def fixed_length_ctranslate2(fixed_tokens: int):
    """Our CTranslate2 engine, made to emit exactly ``fixed_tokens`` per text (EOS suppressed)."""
    from translation import m2m
    from translation.engines.ctranslate2_engine import CTranslate2Engine

    class FixedLength(CTranslate2Engine):
        def _generate(self, sources, tgt_lang, max_output):
            steps = fixed_tokens + 1  # the language token (target prefix) counts as a decoding step
            results = self.translator.translate_batch(
                sources, target_prefix=[[m2m.lang_token(tgt_lang)]] * len(sources), beam_size=1,
                max_decoding_length=steps, min_decoding_length=steps, max_input_length=0, max_batch_size=0,
                num_hypotheses=1)
            return [r.hypotheses[0][1:] for r in results]

    return FixedLength


def _free() -> None:
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001
        pass


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="M2M-100 directory (default: a random model of --size)")
    p.add_argument("--size", choices=("d512", "418m"), default="d512",
                   help="the random model: d512 (6+6 layers, demo vocabulary) or 418m (facebook/m2m100_418M's "
                        "architecture and vocabulary size)")
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("--captions", type=int, default=None, help="default 2000; 512 at --size 418m")
    p.add_argument("--fixed-tokens", type=int, default=None,
                   help="every contender generates exactly N target tokens (default: off; 32 at --size 418m; "
                        "0: off)")
    p.add_argument("--naive-dtypes", default=None,
                   help="naive contenders' dtypes, comma-separated (default: float32; float32,float16 on cuda); "
                        "the speedup is against the first")
    p.add_argument("--compute-types", default=None,
                   help="CTranslate2 compute types, comma-separated (default: float32,int8 on cpu; "
                        "float16,int8_float16 on cuda, float16 at --size 418m); the speedup is the first "
                        "of int8 (cpu) / float16 (cuda) found")
    p.add_argument("--lang", default="es")
    p.add_argument("--threads", type=int, default=1, help="CPU threads for every contender (1: on a shared 2-core machine two OpenMP threads were 10x slower)")
    p.add_argument("--token-budget", type=int, default=4096)
    args = p.parse_args(argv)

    import torch

    from translation.engines.base import DecodeSettings, make_engine
    from translation.train_demo_model import save_random_model

    big = args.size == "418m"
    gpu = args.device.startswith("cuda")
    device = "cuda:0" if args.device == "cuda" else args.device
    n_captions = args.captions or (512 if big else 2000)
    fixed = (32 if big and args.model is None else 0) if args.fixed_tokens is None else args.fixed_tokens
    naive_dtypes = (args.naive_dtypes or ("float32,float16" if gpu else "float32")).split(",")
    compute_types = (args.compute_types or ("float16" if gpu and big else "float16,int8_float16" if gpu
                                            else "float32,int8")).split(",")
    default_ct = "float16" if gpu else "int8"

    torch.set_num_threads(args.threads)
    tmp = tempfile.mkdtemp(prefix="ccrk-bench-")  # the random model and the converted cache, removed at exit
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    if args.model:
        model_dir = args.model
    elif big:
        t0 = time.perf_counter()
        model_dir = save_random_418m(os.path.join(tmp, "m2m100-random-418m"),
                                     device=device if gpu else "cpu")
        print(f"built and saved the random 418M-sized model in {time.perf_counter() - t0:.1f} s", flush=True)
    else:
        model_dir = save_random_model(os.path.join(tmp, "m2m100-random-d512-6x6"))
    texts = bench_captions(n_captions)
    settings = DecodeSettings(max_len_a=0, max_len_b=fixed) if fixed else DecodeSettings()
    print(f"model {model_dir}\ndevice {device}, {len(texts)} captions en->{args.lang}, threads {args.threads}"
          + (f", greedy, exactly {fixed} target tokens per caption for every contender (EOS suppressed)"
             if fixed else ", greedy"), flush=True)

    results = []  # (name, seconds)
    failures = []
    naive = None
    for dtype in naive_dtypes:
        out, t = naive_translate(model_dir, texts, args.lang, device, settings, dtype=dtype,
                                 fixed_tokens=fixed or None)
        naive = naive or out
        results.append((f"naive transformers (batches of 32, input order, {dtype})", t))
        line = f"  naive {dtype}: {len(texts) / t:.1f} captions/s"
        if fixed:
            short = sum(len(o) != fixed for o in out)
            line += f"; captions without exactly {fixed} tokens: {short}"
            if short:
                failures.append(f"naive {dtype}: {short} captions without {fixed} tokens")
        print(line, flush=True)

    same = len(texts)
    if not fixed:
        ours = make_engine("transformers", model_dir, device=device, compute_type="float32", settings=settings,
                           token_budget=args.token_budget, threads=args.threads)
        out, t = timed(lambda: ours.translate(texts, args.lang))
        results.append(("ours: transformers engine (token budget, length-sorted, float32)", t))
        same = sum(a == b.tokens for a, b in zip(naive, out))
        print(f"  ours/transformers: {len(texts) / t:.1f} captions/s; greedy outputs identical to naive: "
              f"{same}/{len(texts)}", flush=True)
        del ours
        _free()

    cache = os.path.join(tmp, "cache")
    kwargs = dict(device=device, settings=settings, token_budget=args.token_budget, threads=args.threads,
                  cache_dir=cache)
    for ct in compute_types:
        t0 = time.perf_counter()
        if fixed:
            engine = fixed_length_ctranslate2(fixed)(model_dir, compute_type=ct, **kwargs)
        else:
            engine = make_engine("ctranslate2", model_dir, compute_type=ct, **kwargs)
        load = time.perf_counter() - t0
        _, warm = timed(lambda: engine.translate(texts[:64], args.lang))  # warm-up (conversion is cached, not timed)
        out, t = timed(lambda: engine.translate(texts, args.lang))
        agree = sum(a == b.tokens for a, b in zip(naive, out))
        results.append((f"ours: ctranslate2 {ct}" + (" (default)" if ct == default_ct else ""), t))
        line = (f"  ctranslate2 {ct}: {len(texts) / t:.1f} captions/s; same tokens as naive {naive_dtypes[0]} "
                f"{agree}/{len(texts)} (conversion + load {load:.1f} s, warm-up {warm:.1f} s)")
        if fixed:
            short = sum(len(o.tokens) != fixed for o in out)
            line += f"; captions without exactly {fixed} tokens: {short}"
            if short:
                failures.append(f"ctranslate2 {ct}: {short} captions without {fixed} tokens")
        print(line, flush=True)
        engine = None  # frees it before the next compute type
        _free()

    base = results[0][1]
    from ccrk.app.console import print_table

    print_table("translation throughput", ["contender", "seconds", "captions/s", "speedup vs naive"],
                [(name, round(t, 2), round(len(texts) / t, 1), f"{base / t:.2f}x") for name, t in results])
    if same != len(texts):
        print(f"WARNING: naive and ours/transformers differ on {len(texts) - same} captions", flush=True)
    for failure in failures:
        print(f"WARNING: {failure}", flush=True)
    default = next((t for name, t in results if "(default)" in name), results[-1][1])
    if len(naive_dtypes) > 1:
        print(f"speedup_vs_naive_{naive_dtypes[1]}={results[1][1] / default:.2f}")
    print(f"speedup_vs_naive={base / default:.2f}")
    return 0 if same == len(texts) and not failures else 1


if __name__ == "__main__":
    raise SystemExit(main())
