"""Cost of K captions per image: training-step time and peak memory at K = 1, 6, 10 on the same images.

A step is the trainer's: the objective's forward, backward, gradient clipping and the trainer's
optimizer (its parameter groups, fused AdamW), with bf16 autocast on a GPU.

The model keeps the full CCRk model's proportions (a 4-stage Swin image tower, a text + fusion
stack of XLM-R layers, text width = image width) scaled to a CPU; on a GPU ``--full`` uses the
paper's Swin-B 224 + XLM-R-large-sized layers (random weights). Captions come from the demo
grammar. Prints a table and, last, ``overhead_k6=X.XX overhead_k10=Y.YY``: the median over timed
rounds of each round's K-step time over its K = 1 step time, minus one. Before it,
``flop_overhead_k6=... flop_overhead_k10=...``: the same ratio for the step's matrix arithmetic
(counted once by torch's FLOP counter), the part of the overhead no kernel speed-up removes.
"""
from __future__ import annotations

import argparse
import random
import resource
import statistics
import sys
import time

import torch

sys.path.insert(0, ".")


def bench_config(full: bool) -> dict:
    if full:
        vision = {"init": "random", "image_size": 224, "patch_size": 4, "embed_dim": 128, "depths": [2, 2, 18, 2],
                  "num_heads": [4, 8, 16, 32], "window_size": 7, "drop_path": 0.0}
        text = {"init": "random", "tokenizer": "demo", "hidden_size": 1024, "num_heads": 16,
                "intermediate_size": 4096, "text_layers": 6, "fusion_layers": 6, "max_position": 64, "dropout": 0.0}
    else:
        # 112 px: three Swin stages (28, 14, 7 tokens a side) end at window 7, as Swin-B's four do at 224.
        vision = {"init": "random", "image_size": 112, "patch_size": 4, "embed_dim": 32, "depths": [2, 2, 6],
                  "num_heads": [1, 2, 4], "window_size": 7, "drop_path": 0.0}
        text = {"init": "random", "tokenizer": "demo", "hidden_size": 128, "num_heads": 4,
                "intermediate_size": 512, "text_layers": 3, "fusion_layers": 3, "max_position": 64, "dropout": 0.0}
    return {"name": "kcl-bench", "seed": 0, "langs": ["en", "es", "id", "ru", "tr"],
            "model": {"embed_dim": 256, "temp": 0.07, "vision": vision, "text": text},
            "loss": {"kcl": True, "fusion": True}, "train": {"batch_size": 8}}


def make_batch(config, tok, k: int, b: int, device, phrases: int = 1) -> dict:
    """``b`` images with ``k`` captions each; a caption is ``phrases`` demo-grammar phrases (one is
    about 7 tokens; web captions such as CC3M's run to about 13-18)."""
    from ccrk.data import collate
    from storage.demo import grammar

    rng = random.Random(0)
    size = config["model"]["vision"]["image_size"]
    images = [torch.randn(3, size, size, generator=torch.Generator().manual_seed(i)) for i in range(b)]

    def draw() -> list:
        return [grammar.random_phrase(rng) for _ in range(phrases)]

    def render(parts, lang) -> str:
        return " ".join(grammar.render(p, lang) for p in parts)

    slots = []
    for _ in range(b):
        parts = draw()
        # K languages: the demo grammar has 5; longer K repeats them with other captions of the image.
        slots.append([render(draw() if j >= 5 else parts, grammar.LANGS[j % 5]) for j in range(k)])
    batch = collate(images, slots, tok, min(62, 40 * phrases))  # the configs hold 64 positions (2 reserved)
    return {key: v.to(device) for key, v in batch.items()}


def main() -> None:
    from ccrk.app.console import print_table
    from ccrk.model import build_model
    from ccrk.objectives import build_objective
    from ccrk.trainer import make_optimizer, normalise_config

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="the paper-sized model (use on a GPU)")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--steps", type=int, default=30, help="timed rounds (each times every K once)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--phrases", type=int, default=1,
                    help="demo-grammar phrases per caption (1: about 7 tokens; 2: about 13 and 3: about 18, as web captions run)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = normalise_config(bench_config(args.full))
    b = args.batch or (64 if device.type == "cuda" else 8)
    torch.manual_seed(0)
    model, tok = build_model(config)
    model.to(device).train()
    objective = build_objective(model, config, tok).to(device)
    opt = make_optimizer(model, config["train"])  # the trainer's: its parameter groups, fused AdamW
    clip = config["train"]["clip"]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step(batch, i) -> float:
        sync()
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = objective(batch, i)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        sync()
        return time.perf_counter() - t0

    def step_flops(batch) -> int:
        """The step's matrix arithmetic (forward and backward; torch's FLOP counter: matmuls,
        convolutions, attention), counted once -- not timed, and the same on every machine."""
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        with counter, torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            objective(batch, 0)["loss"].backward()
        opt.zero_grad(set_to_none=True)
        return counter.get_total_flops()

    ks = (1, 6, 10)
    batches = {k: make_batch(config, tok, k, b, device, args.phrases) for k in ks}
    # Pass 1, K ascending: warm-up and peak memory (the process's peak RSS only grows, so each K's
    # peak is read after its own steps, before any larger K runs).
    peaks = {}
    for k in ks:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        step(batches[k], 0)
        peaks[k] = (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda"
                    else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    # Pass 2: timed rounds, each one step of every K back to back, so that a slow spell of a shared
    # machine hits the K values of a round alike. The order rotates from round to round (each K
    # comes first, second and last equally often): a step runs faster right after a larger one,
    # whose memory the allocator still holds. A K's overhead is the median over rounds of its step
    # time over that round's K = 1 step -- steadier on a noisy machine than a ratio of the fastest
    # steps, which pairs two steps that may be far apart in time (both are printed).
    step_times: dict[int, list[float]] = {k: [] for k in ks}
    for i in range(1, args.steps + 1):
        shift = i % len(ks)
        for k in ks[shift:] + ks[:shift]:
            step_times[k].append(step(batches[k], i))
    flops = {k: step_flops(batches[k]) for k in ks}
    best = {k: min(v) for k, v in step_times.items()}
    overhead = {k: statistics.median(t / t1 for t, t1 in zip(step_times[k], step_times[1])) - 1 for k in ks}
    rows = [(k, b, batches[k]["input_ids"].shape[-1], f"{best[k] * 1000:.0f}",
             f"{statistics.median(step_times[k]) * 1000:.0f}", f"{b / best[k]:.1f}", f"{peaks[k]:.0f}",
             f"{best[k] / best[1] - 1:+.2f}", f"{overhead[k]:+.2f}", f"{flops[k] / 1e9:.1f}",
             f"{flops[k] / flops[1] - 1:+.2f}") for k in ks]
    print_table(f"1-to-K step cost ({'full' if args.full else 'CPU-scaled'} model, {device}, {args.steps} rounds)",
                ["K", "images", "tokens", "best step ms", "median ms", "samples/s", "peak MiB",
                 "best vs best", "overhead", "GFLOP", "FLOP overhead"], rows)
    # The arithmetic floor of the overhead: what the K captions add to the step's matrix work. Time
    # can fall below it where the image tower runs less efficiently than the text layers (small
    # matrices on a CPU), not far below it where both run near peak (the full model on a GPU).
    print(f"flop_overhead_k6={flops[6] / flops[1] - 1:.2f} flop_overhead_k10={flops[10] / flops[1] - 1:.2f}")
    print(f"overhead_k6={overhead[6]:.2f} overhead_k10={overhead[10]:.2f}")


if __name__ == "__main__":
    main()
