"""The translation stage's settings (``ccrk translate`` / ``translate_flow`` and the reproduce YAML's
``translate:`` section) and the quality thresholds that set each stored row's ``ok`` flag.

The thresholds live here (they were ``configs/translation.yaml``): they change every row's ok
flag, so they are a versioned field of :class:`TranslateSpec`. See :mod:`storage.spec` for the
conventions (versioned vs setting fields, one-line errors).
"""
from __future__ import annotations

from typing import Literal

from pydantic import field_validator, model_validator

from storage.languages import TRANSLATED
from storage.spec import Device, Lang, Name, Spec, setting, versioned
from storage.specs import Executor
from translation.engines.base import ENGINES


class QualityThresholds(Spec):
    """When a translation is ``ok`` (scores: :mod:`translation.scores`)."""

    max_uniformity: float = versioned(0.5, "1 - unique/total words: repetition loops", ge=0, le=1)
    max_copy_sim: float = versioned(0.9, "character similarity of target to source: copied-through English",
                                    ge=0, le=1)
    min_len_ratio: float = versioned(0.4, "target / source characters, at least", ge=0)
    max_len_ratio: float = versioned(2.5, "target / source characters, at most", ge=0)
    min_script_share: float = versioned(0.8, "share of letters in the expected script", ge=0, le=1)


class ThresholdOverrides(Spec):
    """One language's changes to the default thresholds (unset: the default's)."""

    max_uniformity: float | None = versioned(None, "see QualityThresholds", ge=0, le=1, omit_none=True)
    max_copy_sim: float | None = versioned(None, "see QualityThresholds", ge=0, le=1, omit_none=True)
    min_len_ratio: float | None = versioned(None, "see QualityThresholds", ge=0, omit_none=True)
    max_len_ratio: float | None = versioned(None, "see QualityThresholds", ge=0, omit_none=True)
    min_script_share: float | None = versioned(None, "see QualityThresholds", ge=0, le=1, omit_none=True)


# Built-in per-language changes; a ``by_lang`` entry for a language replaces its entry here, the
# other languages keep theirs.
BUILTIN_OVERRIDES = {"ru": {"max_len_ratio": 3.0}}  # Russian runs longer than its English source


class Thresholds(Spec):
    """``thresholds: {default: {...}, by_lang: {ru: {max_len_ratio: 3.0}}}``."""

    default: QualityThresholds = versioned(default_factory=QualityThresholds, description="every language's")
    by_lang: dict[Lang, ThresholdOverrides] = versioned(
        default_factory=lambda: {k: ThresholdOverrides(**v) for k, v in BUILTIN_OVERRIDES.items()},
        description="per-language changes to the default")

    @field_validator("by_lang", mode="before")
    @classmethod
    def _over_builtin(cls, value):
        if isinstance(value, dict):
            return {**BUILTIN_OVERRIDES, **value}
        return value

    def for_lang(self, lang: str) -> dict:
        """The thresholds of ``lang``: the default with its overrides."""
        own = self.by_lang.get(lang)
        return {**self.default.to_config(), **(own.to_config() if own else {})}


class ImportSpec(Spec):
    """Existing translations imported as model_id ``import:NAME`` (e.g. CCLM's de/fr/cs/ja/zh).

    ``source``: the sources the file translates (``cc3m``, or ``[sbu, vg, coco]``): its rows are matched
    to their English captions whatever case, spacing or punctuation the release changed, and the match
    rate per source is reported (:mod:`translation.imports`)."""

    name: Name = versioned(description="the import's name (model_id import:NAME)")
    path: str = versioned(description="JSON lines or parquet file, or a folder of them (read in name order)")
    langs: list[Lang] | None = versioned(None, "import only these languages", shown="every language in the file")
    source: list[str] | None = versioned(None, "the sources it translates (names): rows matched to their captions "
                                               "by a loose key, stored under the captions' own text_sha",
                                         shown="none: rows keyed by their own normalised English", omit_none=True)
    min_match_rate: float = setting(0.95, "warn when a covered source's unique captions find an import row less "
                                          "often than this", ge=0, le=1)

    @field_validator("source", mode="before")
    @classmethod
    def _one_source(cls, value):
        return [value] if isinstance(value, str) else value


class TranslateSpec(Spec):
    """``ccrk translate`` / ``translate_flow`` / the reproduce YAML's ``translate:`` section.

    The versioned fields are the store's identity today (model, decoding settings, languages,
    sources) plus the thresholds and imports; ``engine`` and ``compute_type`` are settings, as in
    the translation's version today (int8 vs float16 can still change a few outputs)."""

    langs: list[Lang] = versioned(default_factory=lambda: list(TRANSLATED), description="target languages (none: "
                                 "the imports alone, no model loaded)")
    model: str = versioned("demo", "a local M2M-100 directory, or demo: the committed demo translator")
    sources: list[str] | None = versioned(None, "sources: name, name@version or version",
                                          shown="the latest of each")
    engine: Literal[ENGINES] = setting("ctranslate2", "translation engine")
    device: Device = setting("auto", "cpu | cuda | cuda:N | auto (every visible GPU, else cpu)")
    compute_type: str = setting("auto", "ctranslate2: int8 on cpu, float16 on cuda; transformers: float32 / "
                                        "float16; or a type by name")
    beam_size: int = versioned(1, "beam size (1 = greedy)", ge=1)
    max_len_a: float = versioned(1.5, "output cap = max_len_a * source tokens + max_len_b", gt=0)
    max_len_b: int = versioned(10, "see max_len_a", ge=0)
    max_input_tokens: int | None = versioned(None, "truncate longer sources (tokens)", ge=1,
                                             shown="the model's limit")
    part_size: int = setting(20_000, "unique texts per stored part (= one Prefect task)", ge=1)
    token_budget: int = setting(4096, "padded source tokens per batch", ge=1)
    max_batch_size: int = setting(256, "texts per batch, at most", ge=1)
    threads: int = setting(0, "CPU threads for the engine (0 = library default)", ge=0)
    executor: Executor = setting("local", "local: one worker per device of this machine; ray: one Ray task per "
                                          "part (one GPU each)")
    ray_address: str | None = setting(None, "with executor ray: a running cluster (HOST:PORT, ray://HOST:10001 or "
                                            "auto)", shown="a local cluster for this run")
    imports: list[ImportSpec] = versioned(default_factory=list, description="existing translations to import "
                                          "first ([{name, path, langs, source}])")
    thresholds: Thresholds = versioned(default_factory=Thresholds, description="quality thresholds of the ok flag")

    @model_validator(mode="after")
    def _ray_address_needs_ray(self):
        if self.ray_address and self.executor != "ray":
            raise ValueError("ray_address needs executor: ray")
        if not self.langs and not self.imports:
            raise ValueError("langs is empty and there are no imports: nothing to translate")
        return self

    def decode_params(self) -> dict:
        """``translation.pipeline.decode_settings``'s keyword arguments (the store's decode_id)."""
        return {k: getattr(self, k) for k in ("beam_size", "max_len_a", "max_len_b", "max_input_tokens")}
