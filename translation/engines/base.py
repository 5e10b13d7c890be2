"""The engine interface: English texts in, target-language texts out, for a local M2M-100 directory.

Everything engines share lives here: SentencePiece tokenisation with the M2M-100 framing
(``__en__ x </s>`` in, ``__xx__`` forced as the first target token), truncation of over-long
sources, per-text maximum output length relative to the input, token-budget batching over
length-sorted texts and the out-of-memory split-and-retry. An engine implements only
:meth:`Engine._generate` (token strings in, token strings out, one batch).
"""
from __future__ import annotations

import hashlib
import logging
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from typing import Sequence

from storage.errors import CCRKError
from storage.versioning import canonical_json
from translation import m2m

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DecodeSettings:
    """What decides the output text (the store's ``decode_id`` is a hash of these)."""

    beam_size: int = 1
    # Output cap per text: max_len_a * source tokens + max_len_b target tokens.
    max_len_a: float = 1.5
    max_len_b: int = 10
    # Source cap (tokens, framing included); None = the model's max_position_embeddings.
    max_input_tokens: int | None = None

    def decode_id(self) -> str:
        return "d" + hashlib.sha256(canonical_json(asdict(self)).encode()).hexdigest()[:10]

    def max_output_tokens(self, n_source_tokens: int) -> int:
        return int(self.max_len_a * n_source_tokens + self.max_len_b)


@dataclass
class Translation:
    text: str
    tokens: list[str]
    truncated: bool  # the source was cut to the model's limit, or the output hit its length cap


class OutOfMemory(RuntimeError):
    """A batch did not fit on the device (raised by engines, handled by splitting the batch)."""


def is_out_of_memory(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, OutOfMemory) or "out of memory" in text or type(exc).__name__ == "OutOfMemoryError"


def token_budget_batches(lengths: Sequence[int], token_budget: int, max_batch_size: int) -> list[list[int]]:
    """Indices grouped into batches over length-sorted texts: padded tokens per batch <= budget.

    Sorting by length keeps padding (and the decode length, set by a batch's longest text) small.
    A single text longer than the budget still forms its own batch.
    """
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i in order:
        new_longest = max(longest, lengths[i])
        if current and (new_longest * (len(current) + 1) > token_budget or len(current) >= max_batch_size):
            batches.append(current)
            current, new_longest = [], lengths[i]
        current.append(i)
        longest = new_longest
    if current:
        batches.append(current)
    return batches


class Engine(ABC):
    """Translate English texts with one M2M-100 model on one device."""

    name = "base"

    def __init__(self, model_dir: str, device: str = "cpu", compute_type: str = "auto",
                 settings: DecodeSettings | None = None, token_budget: int = 4096, max_batch_size: int = 256):
        self.model_dir = m2m.check_model_dir(model_dir)
        self.device = device
        self.settings = settings or DecodeSettings()
        self.token_budget = token_budget
        self.max_batch_size = max_batch_size
        self.tokenizer = m2m.load_tokenizer(self.model_dir, src_lang="en")
        self.sp = self.tokenizer.sp_model
        limit = m2m.max_source_tokens(self.model_dir)
        self.max_input_tokens = min(self.settings.max_input_tokens or limit, limit)
        self.compute_type = self._resolve_compute_type(compute_type)

    # -- what an engine implements -------------------------------------------------------------
    @abstractmethod
    def _generate(self, sources: list[list[str]], tgt_lang: str, max_output: int) -> list[list[str]]:
        """Target token strings (language token and eos excluded), at most ``max_output`` each."""

    def _resolve_compute_type(self, compute_type: str) -> str:
        return compute_type

    # -- shared ---------------------------------------------------------------------------------
    def supported_langs(self) -> tuple[str, ...]:
        return m2m.supported_langs(self.tokenizer)

    def encode(self, text: str) -> tuple[list[str], bool]:
        """``[__en__, pieces..., </s>]`` cut to the model's limit, and whether it was cut."""
        pieces = self.sp.encode(text, out_type=str)
        room = self.max_input_tokens - 2
        truncated = len(pieces) > room
        return [m2m.lang_token("en")] + pieces[:room] + [self.tokenizer.eos_token], truncated

    def decode(self, tokens: list[str]) -> str:
        specials = set(self.tokenizer.all_special_tokens)
        return self.sp.decode([t for t in tokens if t not in specials]).strip()

    def translate(self, texts: Sequence[str], tgt_lang: str) -> list[Translation]:
        """One :class:`Translation` per text, in input order."""
        m2m.check_langs([tgt_lang], self.tokenizer)
        encoded = [self.encode(t) for t in texts]
        lengths = [len(src) for src, _ in encoded]
        results: list[Translation | None] = [None] * len(texts)
        for batch in token_budget_batches(lengths, self.token_budget, self.max_batch_size):
            outputs = self._generate_splitting([encoded[i][0] for i in batch], tgt_lang)
            for i, out in zip(batch, outputs):
                cap = self.settings.max_output_tokens(lengths[i])
                out = out[:cap]  # the batch cap is its longest text's; each text keeps its own
                results[i] = Translation(self.decode(out), out, encoded[i][1] or len(out) >= cap)
        return results  # type: ignore[return-value]

    def _generate_splitting(self, sources: list[list[str]], tgt_lang: str) -> list[list[str]]:
        """Generate a batch; on out-of-memory split it in two and retry each half."""
        max_output = max(self.settings.max_output_tokens(len(s)) for s in sources)
        try:
            return self._generate(sources, tgt_lang, max_output)
        except Exception as exc:  # noqa: BLE001 - only out-of-memory is handled
            if not is_out_of_memory(exc) or len(sources) == 1:
                raise
            self._after_out_of_memory()
            half = len(sources) // 2
            log.warning("out of memory on a batch of %d texts; retrying as %d + %d", len(sources), half,
                        len(sources) - half)
            return self._generate_splitting(sources[:half], tgt_lang) + \
                self._generate_splitting(sources[half:], tgt_lang)

    def _after_out_of_memory(self) -> None:
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except Exception:  # noqa: BLE001
            pass

    def describe(self) -> dict:
        return {"engine": self.name, "device": self.device, "compute_type": self.compute_type,
                "token_budget": self.token_budget, "max_batch_size": self.max_batch_size}


def cuda_device_count() -> int:
    try:
        import ctranslate2

        n = ctranslate2.get_cuda_device_count()
        if n:
            return n
    except Exception:  # noqa: BLE001
        pass
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001
        return 0


def resolve_devices(device: str) -> list[str]:
    """``cpu`` -> [cpu]; ``cuda`` -> [cuda:0]; ``cuda:1`` -> [cuda:1]; ``auto`` -> every visible GPU, else cpu."""
    if device == "auto":
        n = cuda_device_count()
        return [f"cuda:{i}" for i in range(n)] if n else ["cpu"]
    if device == "cpu":
        return ["cpu"]
    if device.startswith("cuda"):
        if cuda_device_count() == 0:
            raise CCRKError(f"--device {device} asked for a GPU but none is visible; use --device cpu or auto")
        return [device if ":" in device else "cuda:0"]
    raise CCRKError(f"unknown device {device!r}; use cpu, cuda, cuda:N or auto")


ENGINES = ("ctranslate2", "transformers")


def make_engine(name: str, model_dir: str, device: str = "cpu", **kwargs) -> Engine:
    """The engine called ``name`` (ctranslate2 | transformers)."""
    if name == "ctranslate2":
        from translation.engines.ctranslate2_engine import CTranslate2Engine

        return CTranslate2Engine(model_dir, device=device, **kwargs)
    if name == "transformers":
        from translation.engines.transformers_engine import TransformersEngine

        kwargs.pop("cache_dir", None)  # nothing to convert
        return TransformersEngine(model_dir, device=device, **kwargs)
    raise CCRKError(f"unknown engine {name!r}; choose one of: {', '.join(ENGINES)}")
