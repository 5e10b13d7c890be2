"""The translation stage as library functions (the Prefect flow in flows/translate.py only calls these).

plan: for each target language, the unique texts not yet in the store for (model_id, decode_id,
lang), cut into parts of ``part_size`` -> :class:`PartJob`; run: :func:`translate_part` translates
one part, scores every row and writes the part atomically. Devices: an :class:`EnginePool` holds
one engine per device; workers take an engine for a part and give it back (one worker per GPU).
"""
from __future__ import annotations

import hashlib
import queue
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

from translation import m2m, store
from translation.engines.base import DecodeSettings, Engine, make_engine, resolve_devices
from storage.versioning import canonical_json
from translation.scores import score
from translation.spec import Thresholds


@dataclass
class PartJob:
    lang: str
    index: int
    directory: str
    shas: list[str]
    texts: list[str]
    thresholds: Thresholds | None = None  # the ok flag's (None: the defaults)


@dataclass
class PartResult:
    lang: str
    index: int
    path: str
    translated: int
    flagged: int
    truncated: int
    seconds: float
    samples: list[dict] = field(default_factory=list)


def plan_parts(root: str, texts: dict[str, str], langs, model_id: str, decode_id: str,
               part_size: int, thresholds: Thresholds | None = None) -> tuple[list[PartJob], dict[str, int]]:
    """Parts to translate (missing texts only, sorted by sha for a stable order) and per-language
    counts of texts already stored."""
    jobs: list[PartJob] = []
    cached: dict[str, int] = {}
    for lang in langs:
        directory = store.lang_dir(root, model_id, decode_id, lang)
        have = store.stored_shas(directory)
        missing = sorted(sha for sha in texts if sha not in have)
        cached[lang] = len(texts) - len(missing)
        first = store.next_part_index(directory)
        for k, start in enumerate(range(0, len(missing), part_size)):
            shas = missing[start:start + part_size]
            jobs.append(PartJob(lang, first + k, directory, shas, [texts[s] for s in shas], thresholds))
    return jobs, cached


def translate_part(engine: Engine, job: PartJob, model_id: str, decode_id: str, n_samples: int = 3) -> PartResult:
    """Translate, score and atomically write one part."""
    t0 = time.perf_counter()
    outputs = engine.translate(job.texts, job.lang)
    rows = []
    for sha, src, out in zip(job.shas, job.texts, outputs):
        rows.append({"text_sha": sha, "tgt_lang": job.lang, "src_text": src, "tgt_text": out.text,
                     "model_id": model_id, "decode_id": decode_id,
                     **score(src, out.text, job.lang, truncated=out.truncated, config=job.thresholds)})
    path = store.write_part(job.directory, job.index, rows)
    return PartResult(job.lang, job.index, path, len(rows), sum(not r["ok"] for r in rows),
                      sum(r["truncated"] for r in rows), time.perf_counter() - t0, rows[:n_samples])


class EnginePool:
    """One engine per device; :meth:`take` lends one to a worker until the part is done."""

    def __init__(self, engine: str, model_dir: str, device: str = "cpu", **kwargs):
        self.devices = resolve_devices(device)
        self.engines = [make_engine(engine, model_dir, device=d, **kwargs) for d in self.devices]
        self._free: queue.Queue[Engine] = queue.Queue()
        for e in self.engines:
            self._free.put(e)

    def __len__(self) -> int:
        return len(self.engines)

    @contextmanager
    def take(self):
        engine = self._free.get()
        try:
            yield engine
        finally:
            self._free.put(engine)


_ENGINES: dict[tuple, Engine] = {}


def cached_engine(engine: str, model_dir: str, device: str = "cpu", **kwargs) -> Engine:
    """The engine for these settings, built once per process: a Ray worker that runs many parts keeps
    its model loaded (one model at a time: a new setting replaces the old engine)."""
    key = (engine, model_dir, device, repr(sorted(kwargs.items())))
    if key not in _ENGINES:
        _ENGINES.clear()
        _ENGINES[key] = make_engine(engine, model_dir, device=device, **kwargs)
    return _ENGINES[key]


def decode_settings(beam_size: int = 1, max_len_a: float = 1.5, max_len_b: int = 10,
                    max_input_tokens: int | None = None) -> DecodeSettings:
    return DecodeSettings(beam_size=beam_size, max_len_a=max_len_a, max_len_b=max_len_b,
                          max_input_tokens=max_input_tokens)


def ids_for(model_dir: str, settings: DecodeSettings, thresholds: Thresholds | None = None) -> tuple[str, str]:
    """(model_id, decode_id) of a model directory and decoding settings. Quality thresholds other than
    the defaults set other ok flags, so they are part of the decode id (a store of their own)."""
    decode_id = settings.decode_id()
    if thresholds is not None and thresholds != Thresholds():
        decode_id += "-q" + hashlib.sha256(canonical_json(thresholds.version_params()).encode()).hexdigest()[:8]
    return m2m.model_id(model_dir), decode_id
