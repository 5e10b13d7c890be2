"""The committed demo translator: exact-match accuracy on held-out grammar captions, per language."""
from __future__ import annotations

import pytest

from translation import m2m
from translation.engines.base import make_engine
from translation.train_demo_model import TARGET_LANGS, split_captions


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return make_engine("ctranslate2", m2m.DEMO_MODEL_DIR, compute_type="float32", threads=1,
                       cache_dir=str(tmp_path_factory.mktemp("ct2")))


def test_heldout_captions_are_never_in_training():
    train, heldout = split_captions()
    assert len(heldout) > 150 and not {r["en"] for r in train} & {r["en"] for r in heldout}


@pytest.mark.parametrize("lang", TARGET_LANGS)
def test_demo_translator_exact_match_on_heldout_captions_is_at_least_95_percent(engine, lang):
    _, heldout = split_captions()
    outputs = engine.translate([r["en"] for r in heldout], lang)
    accuracy = sum(o.text == r[lang] for o, r in zip(outputs, heldout)) / len(heldout)
    assert accuracy >= 0.95, f"{lang}: {accuracy:.3f}"
