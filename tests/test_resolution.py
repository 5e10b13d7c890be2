"""Fine-tuning at a higher resolution than pre-training: Swin bias tables resized as the authors do.

The fixture ``fixtures/relpos_interpolation.safetensors`` holds the authors' numbers: a throwaway
venv outside the repo (Python 3.11, scipy 1.13.1 -- the last with ``interp2d`` -- numpy 1.26.4,
torch 2.13 CPU) ran ``interpolate_relative_pos_embed`` read at run time from
BUAADreamer/CCRK ``models/swin_transformer.py`` (git show HEAD, executed unmodified) on seeded
``torch.randn`` tables ``<case>.input`` (torch.Generator seeds 0..3 for w7->w12 with 4 heads,
w3->w5 with 2, w4->w6 with 2, w7->w7 with 3) and saved its results as ``<case>.output``.
"""
from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file

from ccrk.data import image_transform
from ccrk.model import build_model, load_pretrained, save_model
from ccrk.modeling.vision import check_window_fits, interpolate_relative_position_bias
from ccrk.trainer import load_config
from storage.errors import CCRKError

torch.set_num_threads(1)
HERE = os.path.dirname(__file__)
CONFIG = os.path.join(HERE, "..", "configs", "tiny.yaml")
FIXTURE = os.path.join(HERE, "fixtures", "relpos_interpolation.safetensors")
# tiny.yaml: 64 px, patch 8, window 4 (maps 8 and 4); 96 px, window 6 (maps 12 and 6) is its 224 -> 384.
WIDER = {"image_size": 96, "window_size": 6}


def _bias_tables(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("relative_position_bias_table")}


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """A tiny random model with random (not zero-initialised) bias tables, saved as a run."""
    torch.manual_seed(0)
    config = load_config(CONFIG)
    model, tok = build_model(config)
    with torch.no_grad():
        for table in _bias_tables(model):
            model.get_parameter(table).normal_()
    run_dir = tmp_path_factory.mktemp("run")
    save_model(model, config, str(run_dir / "checkpoints" / "step-0000001"))
    tok.save_pretrained(str(run_dir / "tokenizer"))
    return str(run_dir), model.eval(), config


@pytest.mark.parametrize("case", ["w7_to_w12", "w3_to_w5", "w4_to_w6", "w7_to_w7"])
def test_interpolation_matches_the_authors_interp2d(case):
    fixture = load_file(FIXTURE)
    dst_window = int(case.split("_to_w")[1])
    out = interpolate_relative_position_bias(fixture[f"{case}.input"], dst_window)
    ref = fixture[f"{case}.output"]
    assert out.shape == ref.shape == ((2 * dst_window - 1) ** 2, ref.shape[1])
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_interpolation_keeps_values_at_the_grid_centre_and_is_identity_at_the_same_window():
    table = torch.randn(13 * 13, 2)
    assert interpolate_relative_position_bias(table, 7) is table
    out = interpolate_relative_position_bias(table, 12).reshape(23, 23, 2)
    # The source grid's offsets -1, 0, 1 sit at the integer offsets: the spline interpolates them.
    torch.testing.assert_close(out[10:13, 10:13], table.reshape(13, 13, 2)[5:8, 5:8], atol=1e-5, rtol=0)


def test_a_larger_resolution_loads_with_interpolated_tables_and_runs(saved_run):
    run_dir, saved, config = saved_run
    model, _, config2 = load_pretrained(run_dir, vision=WIDER)
    assert config2["model"]["vision"] == {**config["model"]["vision"], **WIDER}
    assert image_transform(config2, train=False).size == 96
    before, after = _bias_tables(saved), _bias_tables(model)
    assert before.keys() == after.keys() and len(after) == 4
    for name, table in after.items():
        assert table.shape == (11 * 11, before[name].shape[1])
        torch.testing.assert_close(table, interpolate_relative_position_bias(before[name], 6), atol=0, rtol=0)
    for name, index in model.named_buffers():
        if name.endswith("relative_position_index"):
            assert index.shape == (36 * 36,) and int(index.max()) == 11 * 11 - 1
    for name, weight in model.state_dict().items():
        if "relative_position_bias_table" not in name:
            assert torch.equal(weight, saved.state_dict()[name]), name
    with torch.no_grad():
        embeds, feat = model.encode_image(torch.randn(2, 3, 96, 96))
    assert embeds.shape == (2, 1 + 12 * 12 // 4, model.vision.width) and feat.shape == (2, 256)
    assert model.text.lm_head.decoder.weight.data_ptr() == model.text.embeddings.word_embeddings.weight.data_ptr()


def test_a_fine_tune_saved_at_the_new_resolution_loads_without_overrides(saved_run, tmp_path):
    run_dir, _, _ = saved_run
    model, tok, config = load_pretrained(run_dir, vision=WIDER)
    save_model(model, config, str(tmp_path / "checkpoints" / "step-0000002"))
    tok.save_pretrained(str(tmp_path / "tokenizer"))
    again, _, config2 = load_pretrained(str(tmp_path))
    assert config2 == config
    px = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        assert torch.equal(model.encode_image(px)[1], again.encode_image(px)[1])


def test_no_overrides_leave_config_and_weights_identical(saved_run):
    run_dir, saved, config = saved_run
    for vision in (None, {}):
        model, _, config2 = load_pretrained(run_dir, vision=vision)
        assert config2 == config
        reference = saved.state_dict()
        assert all(torch.equal(w, reference[n]) for n, w in model.state_dict().items())
        px = torch.randn(2, 3, 64, 64)
        with torch.no_grad():
            assert torch.equal(model.encode_image(px)[0], saved.encode_image(px)[0])


def test_overrides_that_change_weight_shapes_or_break_windows_are_refused(saved_run):
    run_dir, _, _ = saved_run
    with pytest.raises(CCRKError, match="embed_dim"):
        load_pretrained(run_dir, vision={"embed_dim": 64})
    with pytest.raises(CCRKError, match="window_size 12"):
        load_pretrained(run_dir, vision={"image_size": 96, "window_size": 12})  # second stage: 6 x 6 patches
    with pytest.raises(CCRKError, match="multiple"):
        check_window_fits({"image_size": 80, "patch_size": 8, "depths": [2, 2], "window_size": 4})
    # The authors' Swin-B settings: 224 px / window 7 and 384 px / window 12 both fit.
    for side, window in ((224, 7), (384, 12)):
        check_window_fits({"image_size": side, "patch_size": 4, "depths": [2, 2, 18, 2], "window_size": window})
