"""Model parity with the authors' CCRk (github.com/BUAADreamer/CCRK @ 06449d2).

The fixture (``CCRK_PARITY_FIXTURE``, default ``../shared/reference-parity``) holds the authors'
models' weights with their exact key names, inputs, and the outputs their code computed. Loaded
through ccrk's checkpoint import, ccrk's model must give the same numbers. Every size is read from
the fixture, so any fixture made the same way (other sizes, seeds, B, K, L) passes.

``CCRK_PARITY_DEVICE`` (default cpu) and ``CCRK_PARITY_AUTOCAST`` (``bf16`` or empty) run the same
checks on a GPU and under bf16 autocast. Tolerances are the fixture README's for a float32 port
(a tensor: 1e-4 of its largest magnitude, at least 1; a loss: 1e-5 relative) and 5e-2 under bf16
(8 mantissa bits through a dozen layers of random weights; measured on CPU autocast: under 2e-2).
"""
from __future__ import annotations

import contextlib
import json
import os

import pytest
import torch

from ccrk import reference
from ccrk.model import CCRKModel, load_pretrained
from parity_fixture import FIXTURE, StubTokenizer, argmax
from storage.errors import CCRKError

DEVICE = torch.device(os.environ.get("CCRK_PARITY_DEVICE") or "cpu")
AUTOCAST = (os.environ.get("CCRK_PARITY_AUTOCAST") or "").lower()
TOLERANCE = 5e-2 if AUTOCAST == "bf16" else 1e-4
LOSS_TOLERANCE = 5e-2 if AUTOCAST == "bf16" else 1e-5  # relative to max(1, |loss|), the README's for losses

pytestmark = pytest.mark.skipif(not (FIXTURE / "model.safetensors").exists(),
                                reason=f"no reference-parity fixture at {FIXTURE} (set CCRK_PARITY_FIXTURE)")


def _close(name: str, ours: torch.Tensor, ref: torch.Tensor) -> None:
    ours, ref = ours.detach().float().cpu(), ref.float()
    assert ours.shape == ref.shape, f"{name}: shape {tuple(ours.shape)} vs reference {tuple(ref.shape)}"
    err, bound = (ours - ref).abs().max().item(), TOLERANCE * max(1.0, ref.abs().max().item())
    assert err <= bound, f"{name}: max |ours - reference| = {err:.3g} > {bound:.3g}"


def _autocast():
    if AUTOCAST == "bf16":
        return torch.autocast(device_type=DEVICE.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@pytest.fixture(scope="module")
def fx():
    from safetensors.torch import load_file

    cfg = json.loads((FIXTURE / "config.json").read_text())
    return {"cfg": cfg, "spec": cfg["spec"], "weights": load_file(FIXTURE / "model.safetensors"),
            "inputs": {k: v.to(DEVICE) for k, v in load_file(FIXTURE / "inputs.safetensors").items()},
            "outputs": load_file(FIXTURE / "outputs.safetensors"),
            "pretrain_extra": load_file(FIXTURE / "pretrain_model.safetensors")}


def _pretrain_layout(fx) -> dict:
    """The pre-training model's state dict: the text encoder under ``text_encoder.bert.`` plus the MLM head."""
    sd = {("text_encoder.bert." + k.removeprefix("text_encoder.") if k.startswith("text_encoder.") else k): v
          for k, v in fx["weights"].items()}
    return {**sd, **fx["pretrain_extra"]}


def _model(fx, sd: dict) -> CCRKModel:
    heads = fx["spec"]["text"]["num_attention_heads"]
    cfg = reference.infer_model_config({k: tuple(v.shape) for k, v in sd.items()}, text_heads=heads)
    vocab = cfg.pop("vocab_size")
    model = CCRKModel(cfg, vocab_size=vocab)
    reference.import_state_dict(sd, model)
    return model.to(DEVICE).eval()


def _matched(fx):
    """Image index of each text row: rows are image-major (caption k of image b is row b*K + k)."""
    spec = fx["spec"]
    return torch.arange(spec["B"], device=DEVICE).repeat_interleave(spec["K"])


def test_architecture_is_read_off_the_reference_shapes(fx):
    spec, eff = fx["spec"], fx["cfg"]["text_config_effective"]
    cfg = reference.infer_model_config({k: tuple(v.shape) for k, v in fx["weights"].items()},
                                       text_heads=spec["text"]["num_attention_heads"])
    assert cfg["vision"]["embed_dim"] == spec["vision"]["embed_dim"]
    assert cfg["vision"]["depths"] == spec["vision"]["depths"] and cfg["vision"]["num_heads"] == spec["vision"]["num_heads"]
    assert cfg["vision"]["window_size"] == spec["vision"]["window_size"]
    assert cfg["vision"]["image_size"] == spec["vision"]["image_res"]
    assert cfg["text"]["text_layers"] == eff["fusion_layer"]
    assert cfg["text"]["text_layers"] + cfg["text"]["fusion_layers"] == eff["num_hidden_layers"]
    assert (cfg["text"]["hidden_size"], cfg["vocab_size"]) == (eff["hidden_size"], eff["vocab_size"])
    assert cfg["embed_dim"] == spec["embed_dim"]


def test_retrieval_model_reproduces_the_authors_outputs(fx):
    """Image and text embeddings and features, similarities, the fusion output and CLS for every
    pair, and ITM logits: the retrieval checkpoint through ccrk's packed, CLS-only paths."""
    model, inp, ref = _model(fx, fx["weights"]), fx["inputs"], fx["outputs"]
    ids, atts = inp["text_ids"], inp["text_atts"]
    real = atts.bool().cpu()[..., None]  # ccrk does not compute padded positions (zeros there)
    with torch.no_grad(), _autocast():
        image_embeds, image_feat = model.encode_image(inp["images"])
        text_embeds, text_feat = model.encode_text(ids, atts)
        _close("image_embeds", image_embeds, ref["image_embeds"])
        _close("image_feat", image_feat, ref["image_feat"])
        _close("text_embeds", text_embeds.float().cpu() * real, ref["text_embeds"] * real)
        _close("text_feat", text_feat, ref["text_feat"])
        _close("text_embedding_output", model.text.embed(ids).float().cpu() * real, ref["text_hidden_states"][0] * real)
        _close("sims_i2t", image_feat @ text_feat.t(), ref["sims_i2t"])
        _close("temp", model.temp, ref["temp"])
        matched = _matched(fx)
        cross = model.text.fuse(text_embeds, atts, image_embeds[matched])
        _close("cross_embeds_matched", cross.float().cpu() * real, ref["cross_embeds_matched"] * real)
        _close("itm_logits_matched", model.itm_logits(image_embeds[matched], None, text_embeds, atts),
               ref["itm_logits_matched"])
        n = ids.shape[0]
        kv = model.text.image_keys_values(image_embeds)
        cls_all, itm_all = [], []
        for b in range(image_embeds.shape[0]):  # every (image b, text) pair, the image side computed once
            kv_b = [tuple(t[b:b + 1].expand(n, *t.shape[1:]) for t in pair) for pair in kv]
            cls_all.append(model.text.fuse(text_embeds, atts, image_kv=kv_b, cls_only=True)[:, 0])
            itm_all.append(model.itm_logits(None, None, text_embeds, atts, image_kv=kv_b))
        _close("cross_cls_all", torch.stack(cls_all), ref["cross_cls_all"])
        _close("itm_logits_all", torch.stack(itm_all), ref["itm_logits_all"])


def test_pretraining_model_reproduces_mlm_logits_and_features(fx):
    """The pre-training layout (``text_encoder.bert.*`` + ``text_encoder.cls.*``): MLM logits at
    the masked positions of every row, its image repeated for its K rows, and the features."""
    model, inp, ref = _model(fx, _pretrain_layout(fx)), fx["inputs"], fx["outputs"]
    pos, ids = inp["masked_pos"], inp["masked_ids"]
    keep = ids != -100
    rows = torch.arange(pos.shape[0], device=DEVICE)[:, None].expand_as(pos)
    predict = torch.zeros_like(inp["text_ids"], dtype=torch.bool)
    predict[rows[keep], pos[keep]] = True
    with torch.no_grad(), _autocast():
        image_embeds, image_feat = model.encode_image(inp["images"])
        logits = model.mlm_logits(inp["text_ids_masked"], inp["text_atts"], image_embeds[_matched(fx)], None, predict)
        _, text_feat = model.encode_text(inp["text_ids"], inp["text_atts"])
    # ccrk returns the predicted positions row-major; the reference in masked_pos order.
    order = [(int(r), int(p), j) for r, p, j in zip(rows[keep].tolist(), pos[keep].tolist(),
                                                     torch.nonzero(keep)[:, 1].tolist())]
    expected = torch.stack([ref["mlm_logits"][r, j] for r, p, j in sorted(order)])
    _close("mlm_logits", logits, expected)
    _close("pre_text_feat", text_feat, ref["pre_text_feat"])
    _close("pre_image_feat", image_feat, ref["pre_image_feat"])
    assert model.text.lm_head.decoder.weight.data_ptr() == model.text.embeddings.word_embeddings.weight.data_ptr()


def _full_size_model_cfg() -> dict:
    """ccrk's paper model (configs/ccr*.yaml): Swin-B 224 and XLM-R large's width, 6 + 6 layers."""
    return {"embed_dim": 256, "temp": 0.07,
            "vision": {"init": "random", "image_size": 224, "patch_size": 4, "embed_dim": 128,
                       "depths": [2, 2, 18, 2], "num_heads": [4, 8, 16, 32], "window_size": 7},
            "text": {"init": "random", "hidden_size": 1024, "num_heads": 16, "intermediate_size": 4096,
                     "max_position": 514, "text_layers": 6, "fusion_layers": 6}}


@pytest.mark.parametrize("which", ["retrieval", "pretrain"])
def test_full_size_released_keys_map_onto_ccrks_model(which):
    """Every key and shape of the full-size released models maps onto ccrk's full-size model built
    on the meta device, and every ccrk weight is covered (a retrieval checkpoint has no MLM head)."""
    keys = json.loads((FIXTURE / "keys_full.json").read_text())[which]
    shapes = {e["key"]: tuple(e["shape"]) for e in keys["state_dict"]}
    assert len(shapes) == keys["n_keys"]
    cfg = _full_size_model_cfg()
    inferred = reference.infer_model_config(shapes)
    assert inferred.pop("vocab_size") == 250002
    assert inferred["vision"] == cfg["vision"] and {k: inferred["text"][k] for k in cfg["text"]} == cfg["text"]
    with torch.device("meta"):
        own = {k: tuple(v.shape) for k, v in CCRKModel(cfg, vocab_size=250002).state_dict().items()}
    plan, dropped = reference.key_plan(shapes)
    mapped = {k: tuple(shapes[s.key]) if s.part is None else (shapes[s.key][0] // 3, *shapes[s.key][1:])
              for k, s in plan.items()}
    assert set(mapped) - set(own) == set()
    assert {k: v for k, v in mapped.items() if own[k] != v} == {}
    tied = {"text.lm_head.decoder.weight", "text.lm_head.decoder.bias"}  # the word embedding, the head's bias
    uncovered = set(own) - set(mapped) - tied
    assert uncovered == (set() if which == "pretrain" else {k for k in own if k.startswith("text.lm_head.")} - tied)
    assert all(reference._REBUILT.search(k) for k in dropped)
    assert {s.key for s in plan.values()} | set(dropped) == set(shapes)  # nothing left over


def test_a_key_with_no_place_is_one_error_listing_every_such_key(fx):
    sd = {**fx["weights"], "text_encoder.pooler.dense.weight": torch.zeros(2, 2), "box_head.0.bias": torch.zeros(2)}
    with pytest.raises(CCRKError, match=r"2 checkpoint key\(s\) have no place.*text_encoder.pooler.dense.weight"):
        reference.key_plan({k: tuple(v.shape) for k, v in sd.items()})


def test_imported_checkpoint_is_a_catalogued_run_with_the_same_outputs(fx, tmp_path):
    """``ccrk import-checkpoint`` on a ``{"model": state_dict}`` .pth writes a run that
    ``load_pretrained`` reads and the catalog lists; a second import is a no-op."""
    from ccrk.app.cli import main
    from storage.catalog import Catalog

    src = tmp_path / "ccrk_epoch_29.th"
    torch.save({"model": fx["weights"], "epoch": 29}, src)
    root = tmp_path / "root"
    heads = str(fx["spec"]["text"]["num_attention_heads"])
    assert main(["import-checkpoint", str(src), "--root", str(root), "--text-heads", heads]) == 0
    runs = Catalog(str(root)).list("run")
    assert len(runs) == 1 and runs[0].params["config"]["imported_from"]["sha256"]
    model, tok, config = load_pretrained(runs[0].path)
    assert len(tok) <= fx["weights"]["text_encoder.embeddings.word_embeddings.weight"].shape[0]
    with torch.no_grad():
        _, feat = model.encode_text(fx["inputs"]["text_ids"].cpu(), fx["inputs"]["text_atts"].cpu())
    assert torch.allclose(feat, fx["outputs"]["text_feat"], atol=1e-5)
    again = reference.import_checkpoint(str(src), root=str(root), text_heads=int(heads))
    assert again["skipped"] and again["run_id"] == runs[0].version


def test_a_garbage_checkpoint_is_a_one_line_error(tmp_path):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CCRKError, match="not a readable checkpoint"):
        reference.read_state_dict(str(bad))


# ---------------------------------------------------------------------- losses through the ported model


def _tokenizer(cfg: dict) -> StubTokenizer:
    ids = cfg["special_token_ids"]
    mask = next(v for k, v in ids.items() if k.startswith("mask"))
    return StubTokenizer(cfg["spec"]["text"]["vocab_size"], mask, list(ids.values()))


def test_pretraining_objective_reproduces_the_authors_losses(fx, monkeypatch):
    """ccrk's default objective on the fixture batch, with the reference's sampling replaced by argmax
    and its masking by the fixture's masked ids: 1-to-K contrastive, hard-mined matching and MLM on
    the hard positives equal UniAlignLM.forward's loss_mitc, loss_hitm and loss_hmlm."""
    from ccrk import losses
    from ccrk.objectives import CCRKObjective

    model, inp, ref = _model(fx, _pretrain_layout(fx)), fx["inputs"], json.loads((FIXTURE / "losses.json").read_text())
    b, k = fx["spec"]["B"], fx["spec"]["K"]
    rows = ref["unialign_text_pos_idx_ls"]

    def fixture_masking(ids, atts, *args, **kwargs):
        return inp["text_ids_masked"][rows][:, :ids.shape[1]], _masked_positions(inp, rows, ids.shape[1])

    monkeypatch.setattr(losses, "sample", argmax)
    monkeypatch.setattr(losses, "span_mask_tokens", fixture_masking)
    objective = CCRKObjective(model, {"loss": {}}, _tokenizer(fx["cfg"]))
    batch = {"pixel_values": inp["images"], "input_ids": inp["text_ids"].reshape(b, k, -1),
             "attention_mask": inp["text_atts"].reshape(b, k, -1), "text_valid": torch.ones(b, k, dtype=torch.bool)}
    with torch.no_grad(), _autocast():
        out = objective(batch, seed=0)
    for ours, name in ((out["itc"], "pretrain_forward_loss_mitc"), (out["itm"], "pretrain_forward_loss_hitm"),
                       (out["mlm"], "pretrain_forward_loss_hmlm")):
        assert abs(float(ours) - ref[name]) <= LOSS_TOLERANCE * max(1.0, abs(ref[name])), (name, float(ours), ref[name])


def _masked_positions(inp: dict, rows: list[int], length: int) -> torch.Tensor:
    """[len(rows), length] bool: the fixture's masked positions (some keep their token: 80/10/10)."""
    out = torch.zeros(len(rows), length, dtype=torch.bool, device=DEVICE)
    for r, row in enumerate(rows):
        pos = inp["masked_pos"][row][inp["masked_ids"][row] != -100]
        out[r, pos] = True
    return out


def test_finetuning_matching_loss_reproduces_the_authors(fx, monkeypatch):
    """Fine-tuning's ITC with image ids and its hard-negative ITM on the first caption of each image
    (RetrievalModel.forward), the reference's multinomial draws replaced by argmax."""
    from ccrk import losses
    from ccrk.evaluation.protocols import finetune_loss

    model, inp, ref = _model(fx, fx["weights"]), fx["inputs"], json.loads((FIXTURE / "losses.json").read_text())
    k = fx["spec"]["K"]
    monkeypatch.setattr(losses, "sample", argmax)
    with torch.no_grad(), _autocast():
        out = finetune_loss(model, inp["images"], inp["text_ids"][0::k], inp["text_atts"][0::k], inp["image_ids"])
    for ours, name in ((out["itc"], "ft_forward_loss_itc"), (out["itm"], "ft_forward_loss_itm_argmax")):
        assert abs(float(ours) - ref[name]) <= LOSS_TOLERANCE * max(1.0, abs(ref[name])), (name, float(ours), ref[name])


def test_imported_reference_model_evaluates_on_the_demo_benchmark(fx, tmp_path):
    """The path a reproduction starts with: import the authors' checkpoint, then ``ccrk evaluate``
    (its flow, with ITM re-ranking) on the demo benchmark; random weights, so only the path counts."""
    from ccrk.evaluation.demo_benchmark import write_demo_benchmark
    from flows.evaluate import evaluate_flow
    from storage.demo.corpus import generate_demo_corpus

    generate_demo_corpus(str(tmp_path / "corpus"), n_train=6, n_heldout=6, image_px=32)
    write_demo_benchmark(str(tmp_path / "corpus"), str(tmp_path / "bench"))
    root = str(tmp_path / "root")
    run = reference.import_checkpoint(str(FIXTURE / "model.safetensors"), root=root,
                                      text_heads=fx["spec"]["text"]["num_attention_heads"])
    report = evaluate_flow({"checkpoint": run["run_id"], "benchmark": "demo", "data": str(tmp_path / "bench"),
                            "k_test": 4, "device": "cpu"}, root=root)
    m = report["metrics"]
    assert set(m["langs"]) == {"en", "es", "id", "ru", "tr"} and "tr_std" in m["mrv"]
    assert os.path.exists(os.path.join(report["dir"], "report.md"))
