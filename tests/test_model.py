"""The model API evaluation consumes, checkpoints, initialisation from local HF dirs, transforms."""
from __future__ import annotations

import os
import random
import sys

import pytest
import torch
from PIL import Image

from ccrk.data import image_transform
from ccrk.model import build_model, load_pretrained, save_model
from ccrk.trainer import load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

torch.set_num_threads(1)
CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "tiny.yaml")


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    config = load_config(CONFIG)
    model, tok = build_model(config)
    return model.eval(), tok, config


def test_api_shapes_normalised_features_and_temperature(tiny):
    model, tok, config = tiny
    px = torch.randn(3, 3, 64, 64)
    image_embeds, image_feat = model.encode_image(px)
    assert image_embeds.shape[0] == 3 and image_embeds.ndim == 3
    assert image_feat.shape == (3, 256)
    assert torch.allclose(image_feat.norm(dim=-1), torch.ones(3), atol=1e-5)
    enc = tok(["a red circle", "una estrella verde pequeña", "маленький красный круг слева"], padding=True,
              return_tensors="pt")
    text_embeds, text_feat = model.encode_text(enc["input_ids"], enc["attention_mask"])
    assert text_embeds.shape[:2] == enc["input_ids"].shape and text_feat.shape == (3, 256)
    assert torch.allclose(text_feat.norm(dim=-1), torch.ones(3), atol=1e-5)
    image_atts = torch.ones(image_embeds.shape[:2], dtype=torch.long)
    logits = model.itm_logits(image_embeds, image_atts, text_embeds, enc["attention_mask"])
    assert logits.shape == (3, 2)
    assert model.temp.item() == pytest.approx(0.07)


def test_padding_does_not_change_text_features(tiny):
    model, tok, _ = tiny
    short = tok(["a red circle"], return_tensors="pt")
    padded = tok(["a red circle", "a small green star at the top and a blue heart"], padding=True, return_tensors="pt")
    _, a = model.encode_text(short["input_ids"], short["attention_mask"])
    _, b = model.encode_text(padded["input_ids"], padded["attention_mask"])
    assert torch.allclose(a[0], b[0], atol=1e-5)


def test_packed_text_layers_equal_the_padded_layers(tiny):
    """The text encoder runs its layers on real tokens only; on those it must equal the plain
    transformers layers run on the padded batch, forward and backward."""
    from ccrk.modeling.text import _bool_mask

    model, tok, _ = tiny
    enc = tok(["a red circle", "una estrella verde pequeña a la izquierda", "круг", "a"], padding=True,
              return_tensors="pt")
    ids, att = enc["input_ids"], enc["attention_mask"]
    assert not bool(att.all())  # the packed path is taken
    packed = model.text.encode(ids, att)
    h = model.text.embed(ids)
    for layer in model.text.text_layers:
        h = layer(h, attention_mask=_bool_mask(att))
    real = att.bool()
    assert torch.allclose(packed[real], h[real], atol=1e-5)
    assert bool((packed[~real] == 0).all())
    weight = model.text.text_layers[0].intermediate.dense.weight
    g_packed = torch.autograd.grad(packed[real].square().sum(), weight)[0]
    g_padded = torch.autograd.grad(h[real].square().sum(), weight)[0]
    assert torch.allclose(g_packed, g_padded, atol=1e-4, rtol=1e-4)


def test_cls_only_last_layer_gives_the_same_features_tokens_and_gradients(tiny):
    """Training encodes the K captions with the last text layer at CLS only, then asks for the rows
    MITM uses: the same features, token embeddings and gradients as the full encoder."""
    model, tok, _ = tiny
    enc = tok(["a red circle", "una estrella verde pequeña a la izquierda", "круг", "a small heart"], padding=True,
              return_tensors="pt")
    ids, att = enc["input_ids"], enc["attention_mask"]
    rows = torch.tensor([3, 1, 3])
    full_embeds, full_feat = model.encode_text(ids, att)
    state, feat = model.encode_text_cls(ids, att)
    tokens = model.text_tokens(state, rows)
    assert torch.allclose(feat, full_feat, atol=1e-6)
    assert torch.allclose(tokens, full_embeds[rows], atol=1e-5)
    params = [model.text.text_layers[-1].intermediate.dense.weight, model.text.text_layers[0].attention.self.key.weight,
              model.text_proj.weight]
    probe = torch.randn(3, *tokens.shape[1:])
    g_full = torch.autograd.grad(full_feat.square().sum() + (full_embeds[rows] * probe).sum(), params)
    g_cls = torch.autograd.grad(feat.square().sum() + (tokens * probe).sum(), params)
    for a, b in zip(g_full, g_cls):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)


def test_fusion_shortcuts_give_the_plain_fusion_numbers(tiny):
    """Matching runs the last fusion layer at CLS only and may take the image's cross-attention keys
    and values computed once per image: the same CLS as the full fusion of the image tokens."""
    model, tok, _ = tiny
    enc = tok(["a red circle", "una estrella verde pequeña a la izquierda", "круг"], padding=True, return_tensors="pt")
    ids, att = enc["input_ids"], enc["attention_mask"]
    with torch.no_grad():
        image_embeds, _ = model.encode_image(torch.randn(3, 3, 64, 64))
        text_embeds, _ = model.encode_text(ids, att)
        full = model.text.fuse(text_embeds, att, image_embeds)
        cls = model.text.fuse(text_embeds, att, image_embeds, cls_only=True)
        kv = model.text.image_keys_values(image_embeds)
        via_kv = model.itm_logits(None, None, text_embeds, att, image_kv=kv)
    assert cls.shape[1] == 1 and torch.allclose(cls[:, 0], full[:, 0], atol=1e-5)
    assert torch.allclose(via_kv, model.itm_head(full[:, 0]), atol=1e-5)


def test_itm_head_learns_an_image_text_interaction():
    """Every caption is a positive with its image and a negative with the next one, and every image
    the reverse: neither side alone predicts the label, so the loss falls only through the fusion
    encoder's cross-attention (a disconnected image path stays at ln 2)."""
    torch.manual_seed(0)
    model, tok = build_model(load_config(CONFIG))
    model.train()
    n = 8
    pixels = torch.randn(n, 3, 64, 64)
    ids = torch.randint(5, 200, (n, 10))
    ids[:, 0], ids[:, -1] = tok.cls_token_id, tok.sep_token_id
    att = torch.ones_like(ids)
    neg = torch.roll(torch.arange(n), 1)
    labels = torch.cat([torch.ones(n), torch.zeros(n)]).long()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(40):
        image_embeds, _ = model.encode_image(pixels)
        text_embeds, _ = model.encode_text(ids, att)
        logits = model.itm_logits(torch.cat([image_embeds, image_embeds]), None,
                                  torch.cat([text_embeds, text_embeds[neg]]), torch.cat([att, att[neg]]))
        loss = torch.nn.functional.cross_entropy(logits, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1, losses[::5]


def test_load_pretrained_round_trip(tiny, tmp_path):
    model, tok, config = tiny
    run_dir = tmp_path / "run"
    save_model(model, config, str(run_dir / "checkpoints" / "step-0000007"))
    tok.save_pretrained(str(run_dir / "tokenizer"))
    loaded, tok2, config2 = load_pretrained(str(run_dir))
    assert config2["model"] == config["model"] and len(tok2) == len(tok)
    px = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model.encode_image(px)[1], loaded.encode_image(px)[1])
    # The MLM decoder stays tied to the word embeddings after loading.
    assert loaded.text.lm_head.decoder.weight.data_ptr() == loaded.text.embeddings.word_embeddings.weight.data_ptr()


def test_init_from_local_hf_dirs_takes_odd_layers(tmp_path):
    from transformers import SwinConfig, SwinModel, XLMRobertaConfig, XLMRobertaForMaskedLM

    from ccrk.tokenizer import load_tokenizer

    tok = load_tokenizer("demo")
    torch.manual_seed(1)
    xlmr = XLMRobertaForMaskedLM(XLMRobertaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=4,
                                                  num_attention_heads=2, intermediate_size=64,
                                                  max_position_embeddings=40, pad_token_id=1))
    xlmr.save_pretrained(str(tmp_path / "xlmr"))
    swin = SwinModel(SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[1, 2],
                                window_size=4))
    swin.save_pretrained(str(tmp_path / "swin"))
    config = load_config(CONFIG)
    config["model"]["vision"] = {"init": str(tmp_path / "swin"), "drop_path": 0.0}
    config["model"]["text"] = {"init": str(tmp_path / "xlmr"), "tokenizer": "demo", "layers": "odd",
                               "text_layers": 1, "fusion_layers": 1}
    model, _ = build_model(config)
    src = xlmr.state_dict()
    ours = model.state_dict()
    assert torch.equal(ours["text.text_layers.0.attention.self.query.weight"],
                       src["roberta.encoder.layer.1.attention.self.query.weight"])
    assert torch.equal(ours["text.fusion_layers.0.output.dense.weight"], src["roberta.encoder.layer.3.output.dense.weight"])
    assert torch.equal(ours["text.embeddings.word_embeddings.weight"], src["roberta.embeddings.word_embeddings.weight"])
    assert torch.equal(ours["vision.swin.embeddings.patch_embeddings.projection.weight"],
                       swin.state_dict()["embeddings.patch_embeddings.projection.weight"])
    pretrained = model.pretrained_parameter_names()
    assert "text.text_layers.0.attention.self.query.weight" in pretrained
    new = {n for n, _ in model.named_parameters()} - pretrained
    assert "text.fusion_layers.0.crossattention.self.key.weight" in new and "itm_head.0.weight" in new
    assert "temp" in new and "vision_proj.weight" in new
    # The checkpoint records the architecture, so loading needs neither directory.
    assert config["model"]["text"]["hidden_size"] == 32 and config["model"]["vision"]["embed_dim"] == 16


def test_image_transforms():
    config = load_config(CONFIG)
    img = Image.new("RGB", (128, 96), (200, 30, 30))
    assert image_transform(config, train=False)(img).shape == (3, 64, 64)
    train = image_transform(config, train=True)
    a = train(img.copy(), random.Random(3))
    assert a.shape == (3, 64, 64)
    assert torch.equal(a, train(img.copy(), random.Random(3)))  # same generator, same augmentation


def test_demo_tokenizer_is_reproducible(tmp_path):
    from ccrk.tokenizer import DEMO_TOKENIZER_DIR, build_demo_tokenizer, load_tokenizer

    build_demo_tokenizer(str(tmp_path / "tok"))
    with open(tmp_path / "tok" / "tokenizer.json", "rb") as f, open(os.path.join(DEMO_TOKENIZER_DIR, "tokenizer.json"), "rb") as g:
        assert f.read() == g.read()
    tok = load_tokenizer("demo")
    assert tok.tokenize("solda büyük kırmızı bir daire") == ["▁solda", "▁büyük", "▁kırmızı", "▁bir", "▁daire"]
    assert tok.mask_token_id == len(tok) - 1 and tok.pad_token_id == 1


def test_extra_padding_changes_no_loss(tiny):
    """Captions padded further (as when a longer caption joins the batch) give the same losses:
    the text layers skip padding and MITM / CMLM trim it."""
    from ccrk.data import collate
    from ccrk.objectives import build_objective

    model, tok, config = tiny
    objective = build_objective(model, config, tok)
    slots = [["a red circle", "un círculo rojo", None, "красный круг", "kırmızı bir daire"],
             ["a small blue star on the left", "una estrella azul pequeña a la izquierda", "bintang biru kecil di kiri",
              None, "solda küçük mavi bir yıldız"],
             ["a green heart", "un corazón verde", "hati hijau", "зелёное сердце", "yeşil bir kalp"]]
    images = [torch.randn(3, 64, 64, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    batch = collate(images, slots, tok, 40)
    extra = 7
    padded = dict(batch)
    padded["input_ids"] = torch.cat([batch["input_ids"], torch.full((3, 5, extra), tok.pad_token_id)], dim=-1)
    padded["attention_mask"] = torch.cat([batch["attention_mask"], torch.zeros(3, 5, extra, dtype=torch.long)], dim=-1)
    a, b = objective(batch, seed=3), objective(padded, seed=3)
    for key in ("itc", "itm", "mlm", "loss"):
        assert a[key].item() == pytest.approx(b[key].item(), abs=1e-5), key


def test_a_tokenizer_directory_never_runs_its_own_code(tmp_path):
    """A crafted tokenizer_config.json naming a tokenizer class of its own (auto_map, a module in the
    directory): on a terminal, transformers would ask whether to run it. The loader pins
    trust_remote_code off: one line, no question, the module never runs (checked on a pty)."""
    import json
    import pty
    import select
    import shutil
    import time

    from ccrk.tokenizer import DEMO_TOKENIZER_DIR, load_tokenizer

    load_tokenizer("demo")  # builds the demo tokenizer if this checkout has none yet
    d = tmp_path / "tok"
    shutil.copytree(DEMO_TOKENIZER_DIR, d)
    config = json.loads((d / "tokenizer_config.json").read_text())
    config.update(tokenizer_class="CraftedTokenizer", auto_map={"AutoTokenizer": ["crafted.CraftedTokenizer", None]})
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    marker = tmp_path / "ran"
    (d / "crafted.py").write_text(f"open({str(marker)!r}, 'w').close()\n"
                                  "from transformers import PreTrainedTokenizerFast as CraftedTokenizer\n")
    code = ("from ccrk.tokenizer import load_tokenizer\nfrom storage.errors import CCRKError\n"
            f"try:\n    load_tokenizer({str(d)!r})\nexcept CCRKError as e:\n    print('ONE LINE:', e)\n")
    pid, fd = pty.fork()
    if pid == 0:  # a terminal on stdin and stdout, as a user's
        os.chdir(REPO)
        os.execv(sys.executable, [sys.executable, "-c", code])
    out, deadline = b"", time.time() + 120
    try:
        while time.time() < deadline and b"ONE LINE" not in out and b"[y/N]" not in out:
            if select.select([fd], [], [], 1)[0]:
                try:
                    out += os.read(fd, 4096)
                except OSError:
                    break
    finally:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
    text = out.decode(errors="replace")
    assert "asks to run its own code" in text and "[y/N]" not in text, text[-800:]
    assert not marker.exists()
