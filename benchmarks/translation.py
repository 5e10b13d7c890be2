"""Translation throughput: naive transformers vs our engines, same model, same captions, one process.

- naive: ``generate`` on fixed batches of 32 in input order, float32, the way the reference
  scripts (CCRk m2m script, EasyNMT) do it; its output cap is the same relative cap as ours,
  applied per batch (a fixed ``max_length=200`` would only make it slower on an untrained model);
- ours/transformers: the transformers engine (token-budget batches over length-sorted texts);
- ours/ctranslate2 float32 and int8 (int8 is the default engine on CPU; float16 on CUDA).

Greedy outputs of naive and ours/transformers are compared token for token (each text cut to its
own cap). Prints captions/s for each and, last, ``speedup_vs_naive=X.XX`` of the default engine.

Default model: an untrained mid-size M2M-100 (d_model 512, 6+6 layers, FFN 2048) with the demo
tokenizer, built locally. Captions: 2,000 English captions from the demo grammar, 1-3 clauses
each (so lengths vary as real captions do).

  python benchmarks/translation.py [--captions 2000] [--threads 1]
  python benchmarks/translation.py --model /models/m2m100_418M --device cuda
"""
from __future__ import annotations

import argparse
import atexit
import os
import random
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def bench_captions(n: int, seed: int = 0) -> list[str]:
    from storage.demo.grammar import random_phrase, render

    rng = random.Random(seed)
    return [", ".join(render(random_phrase(rng), "en") for _ in range(rng.choice((1, 2, 3)))) for _ in range(n)]


def naive_translate(model_dir: str, texts: list[str], lang: str, device: str, settings, batch_size: int = 32):
    """Reference-script style: fixed batches in input order, tokenizer + generate, float32."""
    import torch

    from translation import m2m

    tok = m2m.load_tokenizer(model_dir, src_lang="en")
    model = m2m.load_model(model_dir, device=device)
    outs = []
    for i in range(0, len(texts), batch_size):
        enc = tok(texts[i:i + batch_size], return_tensors="pt", padding=True).to(device)
        cap = settings.max_output_tokens(enc["input_ids"].shape[1])
        with torch.inference_mode():
            gen = model.generate(**enc, forced_bos_token_id=tok.get_lang_id(lang), num_beams=1, do_sample=False,
                                 max_length=cap + 2)
        for row, n_src in zip(gen.tolist(), enc["attention_mask"].sum(1).tolist()):
            row = row[2:]
            if tok.eos_token_id in row:
                row = row[:row.index(tok.eos_token_id)]
            outs.append(tok.convert_ids_to_tokens(row)[:settings.max_output_tokens(n_src)])
    return outs


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="M2M-100 directory (default: a random d512 6+6 model)")
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("--captions", type=int, default=2000)
    p.add_argument("--lang", default="es")
    p.add_argument("--threads", type=int, default=1, help="CPU threads for every contender (1: on a shared 2-core machine two OpenMP threads were 10x slower)")
    p.add_argument("--token-budget", type=int, default=4096)
    args = p.parse_args(argv)

    import torch

    from translation.engines.base import DecodeSettings, make_engine
    from translation.train_demo_model import save_random_model

    torch.set_num_threads(args.threads)
    tmp = tempfile.mkdtemp(prefix="ccrk-bench-")  # the random model and the converted cache, removed at exit
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    model_dir = args.model or save_random_model(os.path.join(tmp, "m2m100-random-d512-6x6"))
    texts = bench_captions(args.captions)
    settings = DecodeSettings()
    gpu = args.device.startswith("cuda")
    device = "cuda:0" if args.device == "cuda" else args.device
    print(f"model {model_dir}\ndevice {device}, {len(texts)} captions en->{args.lang}, threads {args.threads}",
          flush=True)

    results = []  # (name, seconds, tokens)
    naive, t = timed(lambda: naive_translate(model_dir, texts, args.lang, device, settings))
    results.append(("naive transformers (batches of 32, input order, float32)", t))
    print(f"  naive: {len(texts) / t:.1f} captions/s", flush=True)

    ours = make_engine("transformers", model_dir, device=device, compute_type="float32", settings=settings,
                       token_budget=args.token_budget, threads=args.threads)
    out, t = timed(lambda: ours.translate(texts, args.lang))
    results.append(("ours: transformers engine (token budget, length-sorted, float32)", t))
    same = sum(a == b.tokens for a, b in zip(naive, out))
    print(f"  ours/transformers: {len(texts) / t:.1f} captions/s; greedy outputs identical to naive: "
          f"{same}/{len(texts)}", flush=True)
    del ours

    compute_types = ["float16", "int8_float16"] if gpu else ["float32", "int8"]
    default_ct = "float16" if gpu else "int8"
    cache = os.path.join(tmp, "cache")
    for ct in compute_types:
        engine = make_engine("ctranslate2", model_dir, device=device, compute_type=ct, settings=settings,
                             token_budget=args.token_budget, threads=args.threads, cache_dir=cache)
        engine.translate(texts[:64], args.lang)  # warm-up (conversion is cached and not timed)
        out, t = timed(lambda: engine.translate(texts, args.lang))
        agree = sum(a == b.tokens for a, b in zip(naive, out))
        results.append((f"ours: ctranslate2 {ct}" + (" (default)" if ct == default_ct else ""), t))
        print(f"  ctranslate2 {ct}: {len(texts) / t:.1f} captions/s; same tokens as naive {agree}/{len(texts)}",
              flush=True)
        del engine

    base = results[0][1]
    from ccrk.console import print_table

    print_table("translation throughput", ["contender", "seconds", "captions/s", "speedup vs naive"],
                [(name, round(t, 2), round(len(texts) / t, 1), f"{base / t:.2f}x") for name, t in results])
    if same != len(texts):
        print(f"WARNING: naive and ours/transformers differ on {len(texts) - same} captions", flush=True)
    default = next(t for name, t in results if "(default)" in name)
    print(f"speedup_vs_naive={base / default:.2f}")
    return 0 if same == len(texts) else 1


if __name__ == "__main__":
    raise SystemExit(main())
