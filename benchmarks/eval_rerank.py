"""Benchmark: ccrk's ITM re-ranking against a loop shaped like the authors' ``evaluation()``.

Both re-score the same ITC top-k of the same model. The reference-style loop takes each query
in turn (every image's top-k texts, then every text's top-k images) and sends its k candidates
through the fusion encoder as one batch: texts padded to ``max_tokens`` as the authors' tokenizer
call pads them, the image tokens' cross-attention keys and values recomputed for every pair, every
token through the last fusion layer. ccrk's ``rerank_scores`` scores each distinct pair once, in
image order so that an image's keys and values serve all its texts, cuts each batch to its longest
caption and runs the last fusion layer at CLS only. The two must give the same rankings (asserted).

The model is the demo's architecture (``configs/tiny.yaml``, random weights, or ``--checkpoint``),
the captions the demo grammar's, the images random pixels. The last line is
``speedup_vs_reference=X.XX`` (reference seconds over ccrk seconds, best of ``--repeat``).
Usage: .venv/bin/python benchmarks/eval_rerank.py [--images 200] [--captions 2] [--k-test 128]
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from ccrk.evaluation import metrics  # noqa: E402
from ccrk.evaluation.retrieval import pair_scorer, rerank_scores  # noqa: E402
from ccrk.model import build_model, load_pretrained  # noqa: E402
from ccrk.trainer import load_config  # noqa: E402
from storage.demo import grammar  # noqa: E402


@torch.no_grad()
def reference_rerank(model, sim: torch.Tensor, k: int, image_embeds, text_embeds, text_atts) -> tuple[np.ndarray, np.ndarray]:
    """(scores_i2t, scores_t2i) the authors' way: one fusion batch per query, -100 outside its top k."""
    n_img, n_txt = sim.shape
    s_i2t = torch.full((n_img, n_txt), -100.0, dtype=torch.float64)
    s_t2i = torch.full((n_txt, n_img), -100.0, dtype=torch.float64)

    def score(images, texts, atts):
        return model.itm_head(model.text.fuse(texts, atts, images)[:, 0])[:, 1].double()

    for i in range(n_img):
        top = sim[i].topk(min(k, n_txt)).indices
        s_i2t[i, top] = score(image_embeds[i].repeat(len(top), 1, 1), text_embeds[top], text_atts[top])
    for t in range(n_txt):
        top = sim[:, t].topk(min(k, n_img)).indices
        s_t2i[t, top] = score(image_embeds[top], text_embeds[t].repeat(len(top), 1, 1), text_atts[t].repeat(len(top), 1))
    return s_i2t.numpy(), s_t2i.numpy()


def _check_same_rankings(ours: np.ndarray, ref: np.ndarray, k: int, tol: float = 1e-5) -> int:
    """Assert that ccrk re-ranks each query's top k as the reference did: the reference's re-ranked
    candidates get the same scores within ``tol`` and, best first, stay in that order in ours, except
    between candidates closer than ``tol`` (float noise: ccrk's batches are cut to other lengths).
    Returns how many adjacent candidates are such near-ties."""
    order = np.argsort(-ref, axis=1, kind="stable")[:, :min(k, ref.shape[1])]  # the reference's re-ranked, best first
    along, theirs = np.take_along_axis(ours, order, axis=1), np.take_along_axis(ref, order, axis=1)
    assert np.abs(along - theirs).max() <= tol, f"re-ranked scores differ by {np.abs(along - theirs).max():.3g}"
    steps = along[:, :-1] - along[:, 1:]  # >= 0 where ours agrees with the reference's order
    assert steps.min() >= -tol, "the re-ranked orders differ beyond float noise"
    return int(np.count_nonzero(steps < 0))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--captions", type=int, default=2, help="captions per image")
    ap.add_argument("--k-test", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=None, help="reference padding (default the config's)")
    ap.add_argument("--checkpoint", default=None, help="a ccrk run or checkpoint dir (default: tiny.yaml, random)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.checkpoint:
        model, tok, config = load_pretrained(args.checkpoint)
    else:
        config = load_config(os.path.join(os.path.dirname(__file__), "..", "configs", "tiny.yaml"))
        model, tok = build_model(config)
    model.eval()
    max_tokens = args.max_tokens or int(config.get("data", {}).get("max_tokens", 40))
    size = config["model"]["vision"]["image_size"]
    rng = random.Random(0)
    captions = [grammar.render(grammar.random_phrase(rng), "en") for _ in range(args.images * args.captions)]

    with torch.no_grad():
        image_embeds, image_feat = model.encode_image(torch.rand(args.images, 3, size, size))
        # ccrk pads to the longest caption; the authors' tokenizer call pads to max_tokens.
        enc = tok(captions, padding="longest", truncation=True, max_length=max_tokens, return_tensors="pt")
        text_embeds, text_feat = model.encode_text(enc["input_ids"], enc["attention_mask"])
        ref_enc = tok(captions, padding="max_length", truncation=True, max_length=max_tokens, return_tensors="pt")
        ref_embeds, _ = model.encode_text(ref_enc["input_ids"], ref_enc["attention_mask"])
    sim = (image_feat @ text_feat.t()).double()
    text_image = np.repeat(np.arange(args.images), args.captions)

    def timed(fn):
        best, out = float("inf"), None
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            out = fn()
            best = min(best, time.perf_counter() - t0)
        return best, out

    t_ref, (ref_i2t, ref_t2i) = timed(lambda: reference_rerank(model, sim, args.k_test, image_embeds, ref_embeds,
                                                               ref_enc["attention_mask"]))
    scorer = pair_scorer(model, image_embeds, None, text_embeds, enc["attention_mask"])
    t_ccrk, (our_i2t, our_t2i) = timed(lambda: rerank_scores(sim, args.k_test, scorer))
    near_ties = _check_same_rankings(our_i2t, ref_i2t, args.k_test) + _check_same_rankings(our_t2i, ref_t2i, args.k_test)
    # Recall@1 on the reference's scores and on ours (the ranks differ only at near-ties).
    r1 = [metrics.recall_at_k(metrics.text_retrieval_ranks(x, text_image), (1,))[1] for x in (ref_i2t, our_i2t)]
    k = min(args.k_test, args.images)
    print(f"{args.images} images x {len(captions)} captions, k_test {args.k_test}, "
          f"max_tokens {max_tokens} (ccrk's longest: {enc['input_ids'].shape[1]}), {args.threads} threads")
    print(f"pairs scored: reference {args.images * min(args.k_test, len(captions)) + len(captions) * k:,}")
    print(f"{'path':<22}{'seconds':>10}")
    print(f"{'reference-style loop':<22}{t_ref:>10.2f}")
    print(f"{'ccrk rerank_scores':<22}{t_ccrk:>10.2f}")
    print(f"rankings equal: True ({near_ties} adjacent candidates closer than 1e-5 in either order); "
          f"TR R@1 reference {r1[0]:.2f}, ccrk {r1[1]:.2f}")
    print(f"speedup_vs_reference={t_ref / t_ccrk:.2f}")


if __name__ == "__main__":
    main()
