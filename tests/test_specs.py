"""The stage specs (issue 23 item 1): every shipped config validates, a misspelt key or a bad value
is one line naming it (and the nearest valid key), the defaults are today's values, and the
command-line derivation round-trips."""
from __future__ import annotations

import argparse
import copy
import glob
import os
import typing

import pytest
import yaml

from ccrk.specs import (FINETUNE_PRESETS, AugmentSpec, CL2CMSpec, DataSpec, EvaluateSpec, FinetuneHyperparameters, FinetuneSpec,
                        LossSpec, ModelSpec, PretrainSpec, ReproduceSpec, RunSpec, TextSpec, TrainSpec, VisionSpec)
from storage.errors import CCRKError
from storage.spec import Spec, SpecError, add_arguments, from_arguments, nearest
from storage.specs import AcquireChainSpec, AcquireSettings, AcquireSpec, BuildSpec, CorpusSpec
from translation.spec import ImportSpec, QualityThresholds, Thresholds, ThresholdOverrides, TranslateSpec

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(p for p in glob.glob(os.path.join(REPO, "configs", "*.yaml")) if not p.endswith("sources.yaml"))


def _yaml(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


def _config(name: str) -> dict:
    return _yaml(os.path.join(REPO, "configs", name))


def _error(cls, data, **kwargs) -> str:
    with pytest.raises(SpecError) as info:
        cls.parse(data, **kwargs)
    message = str(info.value)
    assert "\n" not in message and isinstance(info.value, CCRKError) and isinstance(info.value, ValueError)
    return message


def _all_specs() -> list[type[Spec]]:
    import ccrk.specs
    import storage.specs
    import translation.spec

    out = []
    for module in (storage.specs, translation.spec, ccrk.specs):
        out += [v for v in vars(module).values()
                if isinstance(v, type) and issubclass(v, Spec) and v is not Spec and v not in out]
    return out


# ---------------------------------------------------------------------------- shipped configs


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_every_shipped_config_validates_against_its_spec(path):
    data = _yaml(path)
    checked = []
    if "model" in data:  # a run config (the paper ones also carry the chain)
        spec = PretrainSpec.load(path)
        assert spec.langs == data["langs"] and spec.train.batch_size == data["train"]["batch_size"]
        checked.append("run")
    if "acquire" in data:  # a reproduce config
        chain = ReproduceSpec.load(path)
        assert chain.name == data.get("name")
        assert chain.pretrain.runs or os.path.basename(path) == "demo-small.yaml"  # a data-only chain
        for name, run in chain.run_configs().items():
            assert isinstance(run, PretrainSpec), name
        checked.append("chain")
    assert checked, f"{path} is neither a run config nor a reproduce config"


def test_demo_chain_runs_and_their_overrides():
    chain = ReproduceSpec.load(os.path.join(REPO, "configs", "demo.yaml"))
    runs = chain.run_configs()
    assert list(runs) == ["ccrk-1toK", "ccrk-1to1", "cl2cm"]
    assert runs["ccrk-1toK"].loss.kcl and not runs["ccrk-1to1"].loss.kcl
    assert runs["cl2cm"].objective == "cl2cm"
    assert chain.itc_only("cl2cm") and not chain.itc_only("ccrk-1toK")  # the run's own; evaluate's default off
    [protocol] = chain.protocol
    assert protocol.itc_only and protocol.few_shot.langs == ["es", "id", "ru", "tr"]  # the demo scores by ITC
    assert chain.corpus == CorpusSpec(seed=0, n_train=400, n_heldout=100, port=18765)


def test_a_bad_override_names_the_run_and_the_key(tmp_path):
    demo = _config("demo.yaml")
    demo["pretrain"]["runs"][1]["overrides"] = {"loss": {"kcll": False}}
    path = tmp_path / "configs" / "chain.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump(demo))
    chain = ReproduceSpec.load(str(path))
    tiny = os.path.join(REPO, "configs", "tiny.yaml")
    chain.pretrain.runs[1].config = tiny
    with pytest.raises(SpecError) as info:
        chain.run_configs()
    assert str(info.value) == f"{path}: pretrain.runs[1] ({tiny} + overrides): loss: unknown key 'kcll' " \
                              "(did you mean 'kcl'?)"


def test_a_paper_config_is_its_own_single_run_and_carries_the_chain():
    path = os.path.join(REPO, "configs", "ccr10-e.yaml")
    chain = ReproduceSpec.load(path)
    assert [(r.name, r.config) for r in chain.pretrain.runs] == [("ccr10-e", path)]
    assert chain.translate.imports[0] == ImportSpec(name="ccrk-cc3m", path="pretrained/ccrk-data/cc3m-mm-data-all",
                                                    source=["cc3m"], langs=["de", "fr", "cs", "ja", "zh"])
    assert chain.translate.device == "auto" and chain.translate.compute_type == "float16"
    run = PretrainSpec.load(path)
    assert run.acquire.thread_count == 64
    assert [p.benchmark for p in run.protocol] == ["xflickrco", "wit", "multi30k", "coco"]  # every Table 1 block
    assert all(p.paper_model == "CCR10-E" for p in run.protocol) and run.protocol[0].few_shot.shots == 100
    assert set(run.run_spec().to_config(defaults=False)) == {"name", "objective", "seed", "langs", "model", "data", "loss", "train"}


def test_reproduce_passes_the_chain_settings_to_each_stage():
    demo = _config("demo.yaml")
    chain = ReproduceSpec.parse({**demo, "executor": "ray", "ray_address": "auto"})
    spec = chain.acquire_spec("coco", ["captions.json"])
    assert isinstance(spec, AcquireSpec)
    assert (spec.source, spec.metadata, spec.image_size, spec.executor, spec.ray_address) == \
        ("coco", ["captions.json"], 64, "ray", "auto")
    assert chain.translate_spec().executor == "ray"
    own = ReproduceSpec.parse({**demo, "executor": "ray", "translate": {**demo["translate"], "executor": "local"}})
    assert own.translate_spec().executor == "local"  # a section's own executor wins
    build = chain.build_spec()
    assert (build.name, build.sources, build.shard_size) == ("demo", ["cc3m", "sbu", "vg", "coco"], 100)
    assert ReproduceSpec.parse(demo).executor == "local"


# ---------------------------------------------------------------------------- one-line errors


@pytest.mark.parametrize("section,bad,where,key,guess", [
    ("train", {"lrr": 1}, "train", "lrr", "lr"),
    ("loss", {"kcl_nrom": "code"}, "loss", "kcl_nrom", "kcl_norm"),
    ("model", {"vision": {"patch_szie": 4}}, "model.vision", "patch_szie", "patch_size"),
    ("data", {"augment": {"randaugment": {"nn": 2}}}, "data.augment.randaugment", "nn", "n"),
    (None, {"nmae": "x"}, None, "nmae", "name"),
])
def test_a_misspelt_run_config_key_names_the_key_and_the_nearest_one(section, bad, where, key, guess):
    config = _config("tiny.yaml")
    if section is None:
        config.update(bad)
    else:
        config[section] = {**config.get(section, {}), **bad} if section != "model" else \
            {**config["model"], "vision": {**config["model"]["vision"], **bad["vision"]}}
        if section == "data":
            config["data"]["augment"] = {**_config("tiny.yaml")["data"]["augment"], **bad["augment"]}
    message = _error(RunSpec, config, where="configs/tiny.yaml")
    prefix = f"configs/tiny.yaml: {where}: " if where else "configs/tiny.yaml: "
    assert message == f"{prefix}unknown key '{key}' (did you mean '{guess}'?)"


def test_misspelt_chain_keys_give_the_dotted_path():
    demo = _config("demo.yaml")
    cases = [({**demo, "build": {**demo["build"], "shard_sise": 5}},
              "configs/demo.yaml: build: unknown key 'shard_sise' (did you mean 'shard_size'?)"),
             ({**demo, "pretrain": {"runs": [{"name": "a", "config": "configs/tiny.yaml", "itc_ony": True}]}},
              "configs/demo.yaml: pretrain.runs[0]: unknown key 'itc_ony' (did you mean 'itc_only'?)"),
             ({**demo, "translate": {"thresholds": {"by_lang": {"ru": {"max_len_ratoi": 3}}}}},
              "configs/demo.yaml: translate.thresholds.by_lang.ru: unknown key 'max_len_ratoi' "
              "(did you mean 'max_len_ratio'?)"),
             ({**demo, "acquire": {"metadata": {"cc3n": ["x.tsv"]}}},
              "configs/demo.yaml: acquire.metadata: unknown key 'cc3n'; use one of cc3m, sbu, vg, coco, multi30k"),
             ({**demo, "exeuctor": "ray"}, "configs/demo.yaml: unknown key 'exeuctor' (did you mean 'executor'?)")]
    for data, expected in cases:
        assert _error(ReproduceSpec, data, where="configs/demo.yaml") == expected
    assert _error(BuildSpec, {"shard_sise": 5}, where="configs/demo.yaml", section="build") == \
        "configs/demo.yaml: build: unknown key 'shard_sise' (did you mean 'shard_size'?)"
    assert _error(ReproduceSpec, {"name": "x"}, where="x.yaml") == \
        "x.yaml: acquire, translate, build and pretrain are required"


def test_a_key_far_from_every_valid_one_lists_them():
    message = _error(CorpusSpec, {"zzz": 1}, section="corpus")
    assert message == "corpus: unknown key 'zzz'; known keys: seed, n_train, n_heldout, port"


def test_bad_values_are_one_line_with_the_dotted_key():
    tiny = _config("tiny.yaml")

    def with_(section, **values):
        config = copy.deepcopy(tiny)
        config.setdefault(section, {}).update(values)
        return config

    where = "configs/x.yaml"
    assert _error(RunSpec, with_("train", lr="abc"), where=where) == "configs/x.yaml: train.lr must be a number, not 'abc'"
    assert _error(RunSpec, with_("train", bf16="no"), where=where) == \
        "configs/x.yaml: train.bf16 must be true or false, not 'no'"
    assert _error(RunSpec, with_("train", batch_size=True), where=where) == \
        "configs/x.yaml: train.batch_size must be a whole number, not True"
    assert _error(RunSpec, with_("train", epochs=2.5), where=where) == \
        "configs/x.yaml: train.epochs must be a whole number, not 2.5"
    assert _error(RunSpec, with_("loss", kcl_norm="mean"), where=where) == \
        "configs/x.yaml: loss.kcl_norm must be one of code, paper, soft, not 'mean'"
    assert _error(RunSpec, with_("loss", max_masks=0), where=where) == \
        "configs/x.yaml: loss.max_masks is out of range: must be >= 1, not 0"
    assert _error(RunSpec, {**tiny, "device": "gpu"}, where=where) == \
        "configs/x.yaml: device must be auto, cpu, cuda or cuda:N, not 'gpu'"
    assert _error(RunSpec, {**tiny, "langs": "en"}, where=where) == "configs/x.yaml: langs must be a list, not 'en'"
    two = with_("train", lr="abc", clip="x")
    assert _error(RunSpec, two, where=where).endswith("train.lr must be a number, not 'abc' (and 1 more)")
    no_depths = copy.deepcopy(tiny)
    del no_depths["model"]["vision"]["depths"]
    assert _error(RunSpec, no_depths) == "model.vision: depths is required with init: random"
    cl2cm = {**_config("cl2cm-demo.yaml"), "cl2cm": {"target_lang": "de"}}
    assert "cl2cm.target_lang 'de' must be 'any' or a language of" in _error(RunSpec, cl2cm)
    assert _error(DataSpec, {"augment": {"crop_scale": [0.5, 0.2]}}, section="data") == \
        "data.augment.crop_scale: needs 0 < min <= max <= 1, not [0.5, 0.2]"
    assert "model.text.layers: must be odd, first or a list" in \
        _error(RunSpec, {**tiny, "model": {**tiny["model"], "text": {**tiny["model"]["text"], "layers": "even"}}})
    assert _error(LossSpec, "kcl", section="loss") == "loss must be a mapping, not 'kcl'"


def test_yaml_numbers_written_as_text_are_read_as_numbers():
    assert TrainSpec.parse({"lr": "1e-4"}).lr == 1e-4  # YAML 1.1 reads 1e-4 (no dot) as text


def test_missing_and_unreadable_files_are_one_line(tmp_path):
    with pytest.raises(CCRKError, match="config file .*nowhere.yaml does not exist"):
        RunSpec.load(str(tmp_path / "nowhere.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1,\n")
    with pytest.raises(CCRKError, match=r"bad.yaml: not valid YAML \(line \d+\)"):
        RunSpec.load(str(bad))


def test_nearest():
    assert nearest("shard_sise", ["shard_size", "seed"]) == "shard_size"
    assert nearest("shard-size", ["shard_size"]) == "shard_size"
    assert nearest("Seed", ["seed"]) == "seed"
    assert nearest("xyz", ["shard_size", "seed"]) is None


# ---------------------------------------------------------------------------- defaults are today's values

# The dicts the specs replace, as they were (ccrk/objectives.py, ccrk/cl2cm.py, ccrk/data.py, configs/translation.yaml).
OLD_LOSS_DEFAULTS = {"kcl": True, "fusion": True, "weights": {"itc": 1.0, "itm": 1.0, "mlm": 1.0}, "kcl_norm": "code",
                     "gather_grad": "exact", "temp_clamp": True, "itm_positive": "code", "itm_negatives": "hard",
                     "mlm_caption": "hard", "mask_style": "span", "mask_prob": 0.4, "max_masks": 12,
                     "mask_span_prob": 0.2, "mask_span_max": 3}
OLD_CL2CM_DEFAULTS = {"source_lang": "en", "target_lang": "any",
                      "weights": {"itc": 1.0, "cl_sentence": 1.0, "cl_word": 1.0, "kd": 1.0, "itc_source": 0.0},
                      "cl_temp": 0.05, "word_temp": 0.05, "kd_temp": 0.1, "word_loss": "contrastive",
                      "sinkhorn": {"eps": 0.05, "iters": 50}}
OLD_AUGMENT_DEFAULTS = {"crop_scale": [0.2, 1.0], "hflip": True, "randaugment": {"n": 2, "m": 7}}
OLD_CAPTION_DEFAULTS = {"pre_caption": False, "max_words": 40}
OLD_TRANSLATION_DEFAULTS = {"langs": ["es", "id", "ru", "tr"], "engine": "ctranslate2", "device": "auto",
                            "compute_type": "auto", "beam_size": 1, "max_len_a": 1.5, "max_len_b": 10,
                            "part_size": 20000, "token_budget": 4096, "max_batch_size": 256}
OLD_THRESHOLDS = {"default": {"max_uniformity": 0.5, "max_copy_sim": 0.9, "min_len_ratio": 0.4, "max_len_ratio": 2.5,
                              "min_script_share": 0.8}, "ru": {"max_len_ratio": 3.0}}


def test_objective_and_data_defaults_are_the_former_dicts():
    from ccrk.objectives import LOSS_DEFAULTS, loss_config

    assert LossSpec().to_config() == OLD_LOSS_DEFAULTS == LOSS_DEFAULTS == loss_config({})
    assert CL2CMSpec().to_config() == OLD_CL2CM_DEFAULTS
    augment = AugmentSpec().to_config()
    assert augment == {**OLD_AUGMENT_DEFAULTS, "randaugment": {"n": 2, "m": 7, "ops": None}}
    data = DataSpec().to_config()
    assert {k: data[k] for k in OLD_CAPTION_DEFAULTS} == OLD_CAPTION_DEFAULTS
    assert (data["max_tokens"], data["num_workers"]) == (40, 0)  # the .get defaults of ccrk/data.py and trainer


def test_train_and_finetune_defaults_are_the_modules_dicts():
    from ccrk.evaluation.protocols import FINETUNE_DEFAULTS
    from ccrk.trainer import TRAIN_DEFAULTS

    assert TrainSpec().to_config() == TRAIN_DEFAULTS
    assert FinetuneHyperparameters().to_config() == FINETUNE_DEFAULTS
    hp = FinetuneSpec().hyperparameters()  # the demo benchmark under the paper preset
    assert {k: hp[k] for k in FINETUNE_DEFAULTS} == FINETUNE_DEFAULTS
    assert {k: v for k, v in hp.items() if k not in FINETUNE_DEFAULTS} == FINETUNE_PRESETS["paper"]["demo"]
    few = FinetuneSpec(mode="few-shot", lang="de", shots=5).hyperparameters()
    assert few["lr"] == FINETUNE_PRESETS["paper"]["few-shot"]["lr"] and few["epochs"] == 60
    assert FinetuneSpec(mode="few-shot", lang="de", shots=5, lr=2e-5, epochs=3).hyperparameters()["lr"] == 2e-5


def test_model_defaults_are_the_code_defaults():
    from ccrk.modeling.text import XLMR_LAYER_NORM_EPS

    vision = VisionSpec.parse({"image_size": 224, "init": "x"})
    assert (vision.patch_size, vision.window_size, vision.drop_path) == (4, 7, 0.1)  # swin_config's .get
    text = TextSpec.parse({"init": "x", "text_layers": 6, "fusion_layers": 6})
    assert (text.tokenizer, text.layers, text.max_position, text.layer_norm_eps) == ("demo", "odd", 514,
                                                                                  XLMR_LAYER_NORM_EPS)
    assert "dropout" not in text.to_config() and "init_std" not in text.to_config()  # read as `"x" in cfg`
    model = ModelSpec.parse({"vision": {"image_size": 224, "init": "x"}, "text": text.to_config()})
    assert (model.embed_dim, model.temp) == (256, 0.07)
    run = RunSpec.parse({"langs": ["en"], "model": model.to_config(), "train": {}})
    assert (run.name, run.objective, run.seed, run.device) == ("run", "ccrk", 0, "auto")  # normalise_config's


def test_the_specs_keep_todays_versions():
    """What the flows hash into versions, for the specs' defaults, is what they hashed before the
    specs (tests/test_specs_wiring.py checks that no flow restates a spec's default)."""
    from storage.download import DEFAULT_MAX_IMAGE_AREA
    from storage.languages import TRANSLATED
    from storage.versioning import canonical_json
    from translation.pipeline import decode_settings

    acquire = AcquireSpec(source="coco")
    assert acquire.max_image_area == DEFAULT_MAX_IMAGE_AREA
    today = {"image_size": 256, "resize_mode": "border", "resize_only_if_bigger": False,
             "number_sample_per_shard": 10_000, "max_image_area": DEFAULT_MAX_IMAGE_AREA, "encode_quality": 95}
    assert canonical_json(acquire.download_params()) == canonical_json(today)
    decode = TranslateSpec().decode_params()
    assert decode_settings(**decode).decode_id() == "d71b6abfc95"  # the demo store's decode id before the specs
    assert TranslateSpec().model == "demo" and TranslateSpec().langs == list(TRANSLATED)
    assert {k: TranslateSpec().to_config()[k] for k in OLD_TRANSLATION_DEFAULTS} == OLD_TRANSLATION_DEFAULTS
    assert (BuildSpec().shard_size, BuildSpec().sources, BuildSpec().langs) == (
        1000, ["cc3m", "sbu", "vg", "coco"], ["en", "es", "id", "ru", "tr"])
    assert EvaluateSpec().device == FinetuneSpec().device == "auto"


def test_thresholds_are_the_former_configs_translation_yaml():
    from translation import scores

    assert Thresholds().default.to_config() == OLD_THRESHOLDS["default"]
    for lang in ("es", "id", "ru", "tr", "de"):
        assert scores.thresholds(lang) == {**OLD_THRESHOLDS["default"], **OLD_THRESHOLDS.get(lang, {})}
    # A language given replaces its built-in entry; the other built-in entries stay.
    mine = Thresholds.parse({"by_lang": {"tr": {"max_copy_sim": 0.8}}})
    assert mine.for_lang("tr")["max_copy_sim"] == 0.8 and mine.for_lang("ru")["max_len_ratio"] == 3.0
    assert Thresholds.parse({"by_lang": {"ru": {}}}).for_lang("ru")["max_len_ratio"] == 2.5
    strict = Thresholds.parse({"default": {"max_copy_sim": 0.5}})
    assert not scores.score("a red star", "a red starr", "es", config=strict)["ok"]
    assert TranslateSpec().device == "auto"  # what ccrk translate (its flags from the spec) runs on by default


def test_the_choices_are_the_modules_choices():
    from ccrk import data, losses, objectives
    from ccrk import specs
    from ccrk.evaluation import protocols
    from flows import executors
    from storage import specs as storage_specs

    assert specs.OBJECTIVES == tuple(objectives.OBJECTIVES)
    assert (specs.KCL_NORMS, specs.POSITIVE_MODES, specs.GATHER_GRADS, specs.MASK_STYLES) == \
        (losses.KCL_NORMS, losses.POSITIVE_MODES, losses.GATHER_GRADS, losses.MASK_STYLES)
    assert specs.FINETUNE_MODES == protocols.MODES
    assert specs.RANDAUGMENT_OPS == tuple(data.RANDAUGMENT_OPS)
    assert storage_specs.EXECUTORS == executors.EXECUTORS


def test_the_data_module_reads_its_defaults_from_the_spec():
    from ccrk.data import ImageTransform, pretrain_max_words, uses_pre_caption

    tiny = _config("tiny.yaml")
    aug = ImageTransform(tiny, train=True).aug
    assert aug["crop_scale"] == [0.6, 1.0] and aug["hflip"] is False and aug["randaugment"]["m"] == 3
    assert ImageTransform({"model": tiny["model"]}, train=True).aug["randaugment"] == {"n": 2, "m": 7, "ops": None}
    off = {**tiny, "data": {"augment": {"randaugment": False}}}
    assert ImageTransform(off, train=True).aug["randaugment"] is None
    assert uses_pre_caption(tiny) and pretrain_max_words(tiny) == 40
    assert not uses_pre_caption({}) and pretrain_max_words({}) is None
    with pytest.raises(SpecError, match="data.augment: unknown key 'hfilp' \\(did you mean 'hflip'\\?\\)"):
        ImageTransform({**tiny, "data": {"augment": {"hfilp": True}}}, train=True)


def test_a_validated_run_config_builds_the_model():
    from ccrk.model import build_model

    config = RunSpec.load(os.path.join(REPO, "configs", "tiny.yaml")).to_config()
    model, _ = build_model(copy.deepcopy(config))
    assert model.text.config.hidden_dropout_prob == 0.0 and model.text.config.initializer_range == 0.1


# ---------------------------------------------------------------------------- version fields


def test_every_field_says_whether_it_is_versioned_and_booleans_are_strict():
    from pydantic import TypeAdapter, ValidationError

    for cls in _all_specs():
        for name, info in cls.model_fields.items():
            extra = info.json_schema_extra
            assert isinstance(extra, dict) and isinstance(extra.get("version"), bool), f"{cls.__name__}.{name}"
            ann = info.annotation
            if bool in (ann, *typing.get_args(ann)) or "bool" in repr(ann):
                adapter = TypeAdapter(typing.Annotated[ann, *info.metadata] if info.metadata else ann)
                with pytest.raises(ValidationError):  # storage.spec.Bool, not bool
                    adapter.validate_python("yes")
    with pytest.raises(SpecError, match="must be true or false, not 1"):
        BuildSpec.parse({"drop_flagged": 1})
    with pytest.raises(SpecError, match="itc_only must be true or false"):
        ReproduceSpec.parse({**_config("demo.yaml"), "pretrain": {"runs": [{"name": "a", "config": "x",
                                                                             "itc_only": "yes"}]}})


def test_version_params_leave_out_the_settings():
    acquire = AcquireSpec(source="coco", processes=8, thread_count=64, executor="ray")
    assert acquire.version_params() == AcquireSpec(source="coco").version_params()
    assert set(AcquireSpec.setting_fields()) == {"processes", "thread_count", "timeout", "fetch_deadline",
                                                 "max_image_bytes", "allow_addresses", "retries", "retry_failed",
                                                 "executor", "ray_address", "from_webdataset", "images"}
    assert set(BuildSpec.setting_fields()) == {"name", "shards_per_task", "memory"}
    translate = TranslateSpec(device="cuda", threads=4, part_size=10, engine="transformers")
    assert translate.version_params() == TranslateSpec().version_params()
    assert translate.version_params()["thresholds"]["by_lang"] == {"ru": {"max_len_ratio": 3.0}}
    assert TranslateSpec(thresholds={"default": {"max_copy_sim": 0.5}}).version_params() != \
        TranslateSpec().version_params()  # the thresholds change every row's ok flag
    run = RunSpec.load(os.path.join(REPO, "configs", "tiny.yaml"))
    params = run.version_params()
    assert "device" not in params and "name" not in params and "num_workers" not in params["data"]
    assert set(params["train"]) == set(TrainSpec.version_fields())
    assert "threads" not in params["train"] and "log_every" not in params["train"]
    assert params["loss"] == run.loss.to_config() and params["model"]["text"]["init_std"] == 0.1
    faster = run.merged({"device": "cpu", "train": {"threads": 2, "log_every": 1}, "data": {"num_workers": 4}})
    assert faster.version_params() == params
    assert run.merged({"train": {"lr": 1e-3}}).version_params() != params


def test_to_config_without_defaults_keeps_what_was_written():
    tiny = _config("tiny.yaml")
    written = RunSpec.parse(tiny).to_config(defaults=False)
    assert written == tiny


# ---------------------------------------------------------------------------- the command line


def test_arguments_derived_from_a_spec_round_trip():
    parser = argparse.ArgumentParser()
    added = add_arguments(parser, BuildSpec)
    assert "source_versions" not in added  # a mapping has no flag form
    args = parser.parse_args(["--name", "ccr10", "--langs", "en,de", "--min-langs", "2", "--drop-flagged",
                              "--shard-size", "5"])
    spec = from_arguments(BuildSpec, args)
    assert spec == BuildSpec(name="ccr10", langs=["en", "de"], min_langs=2, drop_flagged=True, shard_size=5)
    assert from_arguments(BuildSpec, parser.parse_args([])) == BuildSpec()  # no flag: the spec's default
    base = {"shard_size": 100, "drop_flagged": True, "langs": ["en", "es"]}
    over = from_arguments(BuildSpec, parser.parse_args(["--no-drop-flagged", "--seed", "3"]), base=base)
    assert (over.shard_size, over.drop_flagged, over.seed, over.langs) == (100, False, 3, ["en", "es"])
    help_text = parser.format_help()
    assert "samples per shard (default: 1000)" in help_text and "(default: all of them)" in help_text


def test_argument_types_choices_and_renamed_flags():
    parser = argparse.ArgumentParser()
    add_arguments(parser, AcquireSpec, exclude=("metadata",),
                  flags={"thread_count": "--threads", "number_sample_per_shard": "--shard-size"})
    args = parser.parse_args(["--source", "vg", "--threads", "4", "--shard-size", "7", "--resize-mode", "no",
                              "--retry-failed"])
    spec = from_arguments(AcquireSpec, args)
    assert (spec.source, spec.thread_count, spec.number_sample_per_shard, spec.resize_mode, spec.retry_failed) == \
        ("vg", 4, 7, "no", True)
    for bad in (["--source", "flickr"], ["--threads", "many"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)
    with pytest.raises(SpecError, match="thread_count is out of range: must be >= 1, not 0"):
        from_arguments(AcquireSpec, parser.parse_args(["--source", "vg", "--threads", "0"]))
    only = argparse.ArgumentParser()
    assert add_arguments(only, TrainSpec, fields=["lr", "betas", "bf16"]) == ["lr", "betas", "bf16"]
    train = from_arguments(TrainSpec, only.parse_args(["--lr", "3e-4", "--betas", "0.9,0.95", "--no-bf16"]),
                           fields=["lr", "betas", "bf16"])
    assert (train.lr, train.betas, train.bf16) == (3e-4, [0.9, 0.95], False)
    with pytest.raises(TypeError, match="has no command-line form"):
        add_arguments(argparse.ArgumentParser(), TranslateSpec, fields=["thresholds"])
    help_text = only.format_help()
    assert "AdamW betas (default: 0.9,0.98)" in help_text and "--bf16, --no-bf16" in help_text


def test_specs_are_plain_to_construct_and_compare():
    assert AcquireChainSpec().sources == ["cc3m", "sbu", "vg", "coco"]
    assert AcquireChainSpec().for_source("sbu").source == "sbu"
    assert isinstance(AcquireSpec(source="coco"), AcquireSettings)
    assert QualityThresholds() == Thresholds().default and ThresholdOverrides().to_config() == {}
    a = TranslateSpec()
    a.imports.append(ImportSpec(name="x", path="y"))
    assert TranslateSpec().imports == []  # mutable defaults are not shared
    with pytest.raises(Exception):
        TrainSpec().lr = "abc"  # assignments are validated too
