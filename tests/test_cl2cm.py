"""CL2CM objective: relational distillation, OT word alignment, target-language choice, config
checks, and the demo config training the tiny model with falling loss through the real trainer."""
from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F

from ccrk.cl2cm import CL2CMObjective, cl2cm_config, info_nce, relational_distillation, word_alignment_scores
from ccrk.data import collate
from ccrk.model import build_model
from ccrk.trainer import load_config, train
from kshards import make_klingual_dataset
from storage.errors import CCRKError

torch.set_num_threads(2)
CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "cl2cm-demo.yaml")


def _feats(n, d=8, seed=0):
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=-1)


# ---------------------------------------------------------------------- relational distillation


def test_distillation_is_zero_when_the_similarity_structures_agree():
    image, target = _feats(6, seed=1), _feats(6, seed=2)
    source = image.clone()  # the cross-lingual side sees the targets exactly as the images do
    loss = relational_distillation(image @ target.t(), source @ target.t(), temp=0.1)
    assert float(loss) == pytest.approx(0.0, abs=1e-7)


def test_distillation_is_positive_when_the_structures_differ():
    image, source, target = _feats(6, seed=1), _feats(6, seed=3), _feats(6, seed=2)
    assert float(relational_distillation(image @ target.t(), source @ target.t(), temp=0.1)) > 1e-3
    # A permuted teacher (the same similarities, matched to the wrong images) is a different structure.
    sim = image @ target.t()
    assert float(relational_distillation(sim, sim[torch.randperm(6, generator=torch.Generator().manual_seed(0))],
                                         temp=0.1)) > 1e-3


def test_distillation_moves_the_student_only():
    student = (_feats(5, seed=1) @ _feats(5, seed=2).t()).requires_grad_()
    teacher = (_feats(5, seed=3) @ _feats(5, seed=2).t()).requires_grad_()
    relational_distillation(student, teacher, temp=0.1).backward()
    assert teacher.grad is None and float(student.grad.abs().sum()) > 0


def test_info_nce_prefers_aligned_pairs():
    x = _feats(4, seed=5)
    assert float(info_nce(x, x, 0.05)) < float(info_nce(x, x.roll(1, dims=0), 0.05))


# ---------------------------------------------------------------------- word-level OT alignment


def test_ot_word_alignment_tolerates_reordering_and_separates_unrelated_sentences():
    words = _feats(5, d=16, seed=7)
    src = words[None]
    reordered = words[[3, 0, 4, 1, 2]][None]  # the same words in a translation's order
    unrelated = _feats(5, d=16, seed=8)[None]
    mask = torch.ones(1, 5, dtype=torch.bool)

    def score(tgt):
        return float(word_alignment_scores(src, mask, tgt, mask, eps=0.01, iters=200, all_pairs=False)[0])

    assert score(reordered) == pytest.approx(1.0, abs=1e-3)  # OT finds the permutation
    assert score(unrelated) < score(reordered) - 0.3


def test_ot_word_scores_ignore_padding_and_rank_true_pairs_first():
    gen = torch.Generator().manual_seed(0)
    src = torch.randn(3, 6, 16, generator=gen)
    # Each target: its source's words shuffled, slightly perturbed (a noisy translation).
    tgt = src[:, torch.randperm(6, generator=gen)] + 0.05 * torch.randn(3, 6, 16, generator=gen)
    src_mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    tgt_mask = torch.ones(3, 6, dtype=torch.bool)
    scores = word_alignment_scores(src, src_mask, tgt, tgt_mask, eps=0.02, iters=100)
    assert scores.shape == (3, 3)
    off_diagonal = scores.masked_fill(torch.eye(3, dtype=torch.bool), float("-inf"))
    assert bool((scores.diagonal() > off_diagonal.max(dim=1).values).all())
    garbage = src.clone()
    garbage[~src_mask] = 100.0  # padding content must not matter
    torch.testing.assert_close(word_alignment_scores(garbage, src_mask, tgt, tgt_mask, eps=0.02, iters=100), scores)
    paired = word_alignment_scores(src, src_mask, tgt, tgt_mask, eps=0.02, iters=100, all_pairs=False)
    torch.testing.assert_close(paired, scores.diagonal())


# ---------------------------------------------------------------------- the objective on a real batch


def _objective(**cl2cm):
    config = load_config(CONFIG)
    config["cl2cm"].update(cl2cm)
    torch.manual_seed(0)
    model, tok = build_model(config)
    return CL2CMObjective(model, config, tok), tok, config


def _batch(tok, slots):
    gen = torch.Generator().manual_seed(0)
    return collate([torch.randn(3, 64, 64, generator=gen) for _ in slots], slots, tok, 16)


# Five images x [en, es, id, ru, tr]; None = that translation is missing.
SLOTS = [["a red circle", "un circulo rojo", "lingkaran merah", None, None],
         ["a blue square", None, "persegi biru", "sinij kvadrat", None],
         ["a green star", None, None, None, None],
         [None, "una estrella", None, None, "bir yildiz"],
         ["a small heart", "un corazon", None, None, "kucuk bir kalp"]]


def test_a_fixed_target_language_uses_only_images_having_source_and_target():
    objective, tok, _ = _objective(target_lang="es")
    batch = _batch(tok, SLOTS)
    slot, used = objective.target_slots(batch["text_valid"], torch.Generator().manual_seed(0))
    assert slot.tolist() == [1] * 5 and used.tolist() == [True, False, False, False, True]
    assert float(objective(batch, seed=0)["pairs"]) == 2


def test_target_any_draws_one_present_non_english_language_per_image_reproducibly():
    objective, tok, _ = _objective(target_lang="any")
    valid = _batch(tok, SLOTS)["text_valid"]
    draws = [objective.target_slots(valid, torch.Generator().manual_seed(s)) for s in range(20)]
    for slot, used in draws:
        assert used.tolist() == [True, True, False, False, True]  # image 2 has no translation, 3 no English
        assert all(bool(valid[i, slot[i]]) and int(slot[i]) != 0 for i in range(5) if used[i])
    assert {int(slot[1]) for slot, _ in draws} == {2, 3}  # both of image 1's translations get drawn
    again = objective.target_slots(valid, torch.Generator().manual_seed(3))
    assert torch.equal(again[0], draws[3][0])


@pytest.mark.parametrize("word_loss", ["contrastive", "distance"])
def test_objective_is_the_weighted_sum_and_trains_only_the_dual_encoder(word_loss):
    objective, tok, config = _objective(word_loss=word_loss, weights={"kd": 0.5})
    out = objective(_batch(tok, SLOTS), seed=1)
    w = objective.cfg["weights"]
    expected = sum(w[k] * out[k] for k in ("itc", "cl_sentence", "cl_word", "kd"))
    torch.testing.assert_close(out["loss"], expected)
    assert all(torch.isfinite(out[k]) for k in out) and float(out["pairs"]) == 3
    out["loss"].backward()
    grads = {n: p.grad for n, p in objective.model.named_parameters()}
    assert grads["vision_proj.weight"] is not None and grads["text_proj.weight"] is not None
    assert grads["temp"] is not None
    assert all(g is None for n, g in grads.items() if n.startswith(("text.fusion_layers", "itm_head")))


def test_a_batch_without_any_pair_gives_zero_loss_not_nan():
    objective, tok, _ = _objective(target_lang="ru")
    out = objective(_batch(tok, [SLOTS[0], SLOTS[2]]), seed=0)
    assert float(out["loss"].detach()) == 0.0 and float(out["pairs"]) == 0
    out["loss"].backward()  # still a graph: DDP ranks stay in step


@pytest.mark.parametrize("change,message", [
    ({"cl2cm": {"target_lang": "de"}}, "target_lang"),
    ({"cl2cm": {"target_lang": "en"}}, "target_lang"),
    ({"cl2cm": {"word_loss": "l2"}}, "word_loss"),
    ({"cl2cm": {"weights": {"mlm": 1.0}}}, "unknown key 'mlm'"),
    ({"cl2cm": {"sinkhorn": {"eps": 0.0}}}, "sinkhorn"),
    ({"loss": {"kcl": False}}, "kcl"),
])
def test_bad_cl2cm_settings_are_clear_errors(change, message):
    config = load_config(CONFIG)
    for section, values in change.items():
        config.setdefault(section, {}).update(values)
    with pytest.raises(CCRKError, match=message):
        cl2cm_config(config)


# ---------------------------------------------------------------------- the demo config really trains


def test_demo_config_trains_the_tiny_model_with_falling_loss(tmp_path, root):
    from ccrk.model import load_pretrained

    data = make_klingual_dataset(str(tmp_path / "ds"), n_images=40, seed=4, drop_prob=0.3)
    config = load_config(CONFIG)
    assert config["objective"] == "cl2cm"
    config["train"].update({"batch_size": 8, "steps": 16, "epochs": None, "log_every": 4, "eval_every": 1000,
                            "checkpoint_every": 1000, "heldout": 8})
    summary = train(config, data, str(tmp_path / "run"), root=root)
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        rows = [r for r in map(json.loads, f) if "loss" in r]  # each row: the mean of 4 steps
    assert [r["step"] for r in rows] == [4, 8, 12, 16]
    assert {"itc", "cl_sentence", "cl_word", "kd", "pairs"} <= set(rows[0])
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.3
    for term in ("cl_sentence", "cl_word"):  # the cross-lingual network learns too
        assert rows[-1][term] < rows[0][term], term
    assert summary["steps"] == 16
    # A CL2CM run is an ordinary checkpoint: evaluation loads it as any CCRk run.
    model, _, saved = load_pretrained(str(tmp_path / "run"))
    assert saved["objective"] == "cl2cm" and model.encode_text is not None


@pytest.mark.parametrize("lang", ["de", "fr", "cs"])
def test_multi30k_configs_pair_english_with_one_target_language(lang):
    config = load_config(os.path.join(os.path.dirname(CONFIG), f"cl2cm-multi30k-{lang}.yaml"))
    cfg = cl2cm_config(config)
    assert config["objective"] == "cl2cm" and config["langs"] == ["en", lang]
    assert (cfg["source_lang"], cfg["target_lang"]) == ("en", lang)


def test_demo_config_is_the_tiny_ccrk_config_with_the_cl2cm_objective():
    tiny = load_config(os.path.join(os.path.dirname(CONFIG), "tiny.yaml"))
    demo = load_config(CONFIG)
    for section in ("seed", "langs", "model", "data", "train"):
        assert demo[section] == tiny[section], section  # the comparison changes the objective only
