"""Where the reference-parity fixture lives, and the stand-ins its tests share.

The fixture (numbers produced by the authors' code, ``../shared/reference-parity`` beside the
checkout, or ``$CCRK_PARITY_FIXTURE``) is optional: without it the parity tests skip, saying where
they looked. Kept out of conftest.py so the GPU host can run these tests with ``--noconftest``.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

FIXTURE = Path(os.environ.get("CCRK_PARITY_FIXTURE")
               or Path(__file__).resolve().parents[2] / "shared" / "reference-parity")


def require(name: str) -> Path:
    """The fixture file ``name``, or skip the test that needs it."""
    path = FIXTURE / name
    if not path.exists():
        pytest.skip(f"no reference-parity fixture file {path} (set CCRK_PARITY_FIXTURE to its folder)")
    return path


def argmax(weights: torch.Tensor, generator=None) -> torch.Tensor:
    """The fixture's stand-in for the reference's torch.multinomial: each row's first maximum."""
    return weights.argmax(dim=1)


class StubTokenizer:
    """What the objective reads of a tokenizer: its size, <mask> and the special ids."""

    def __init__(self, vocab: int, mask_id: int, special: list[int]):
        self.vocab, self.mask_token_id, self.all_special_ids = vocab, mask_id, sorted(special)

    def __len__(self) -> int:
        return self.vocab
