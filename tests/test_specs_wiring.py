"""The specs are the one home of every stage's settings: the flows take them, the command line's flags
and prefect.yaml's deployments are checked against them, and a misspelt key anywhere is one line."""
from __future__ import annotations

import argparse
import importlib
import inspect
import os
import typing

import pytest
import yaml

from ccrk.specs import EvaluateSpec, FinetuneSpec, ReproduceSpec
from ccrk.trainer import load_config
from storage.spec import Spec, SpecError
from storage.specs import AcquireSpec, BuildSpec
from translation.spec import TranslateSpec

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGE_FLOWS = {"flows.acquire:acquire_flow": AcquireSpec, "flows.translate:translate_flow": TranslateSpec,
               "flows.build:build_flow": BuildSpec, "flows.evaluate:evaluate_flow": EvaluateSpec,
               "flows.evaluate:finetune_flow": FinetuneSpec}
VERBS = {"acquire": AcquireSpec, "translate": TranslateSpec, "build": BuildSpec, "evaluate": EvaluateSpec,
         "finetune": FinetuneSpec}


def _flow(entry: str):
    module, name = entry.replace("/", ".").removesuffix(".py").split(":") if ":" in entry else (entry, None)
    return getattr(importlib.import_module(module.replace(".py", "")), name)


def _deployments() -> list[dict]:
    with open(os.path.join(REPO, "prefect.yaml"), encoding="utf-8") as f:
        return yaml.safe_load(f)["deployments"]


@pytest.mark.parametrize("entry,spec_cls", sorted(STAGE_FLOWS.items(), key=lambda kv: kv[0]))
def test_every_stage_flow_takes_its_spec_and_restates_none_of_its_fields(entry, spec_cls):
    fn = _flow(entry).fn
    hints = typing.get_type_hints(fn)
    params = inspect.signature(fn).parameters
    assert spec_cls in typing.get_args(hints["spec"]), f"{entry}'s spec parameter is not a {spec_cls.__name__}"
    restated = sorted(set(params) & set(spec_cls.model_fields) - {"spec"})
    assert not restated, f"{entry} restates spec fields as parameters: {restated}"


def test_every_deployment_validates_against_its_flow():
    """Each deployment's parameters are its flow's; a `spec` parses with the flow's spec class, a
    `config` file with the loader its flow uses."""
    for dep in _deployments():
        path, name = dep["entrypoint"].split(":")
        fn = getattr(importlib.import_module(path.removesuffix(".py").replace("/", ".")), name).fn
        params = dep.get("parameters", {})
        assert set(params) <= set(inspect.signature(fn).parameters), dep["name"]
        if "spec" in params:
            spec_cls = next(a for a in typing.get_args(typing.get_type_hints(fn)["spec"])
                            if isinstance(a, type) and issubclass(a, Spec))
            spec_cls.parse(params["spec"], where=f"prefect.yaml: {dep['name']}", section="spec")
        if "config" in params:
            config = os.path.join(REPO, params["config"])
            ReproduceSpec.load(config) if name == "reproduce_flow" else load_config(config)


def test_the_m2m100_deployment_translates_with_the_configured_model_on_every_visible_gpu():
    dep = next(d for d in _deployments() if d["name"] == "m2m100")
    spec = TranslateSpec.parse(dep["parameters"]["spec"])
    assert spec.model == "pretrained/m2m100_1.2B" and spec.beam_size == 5 and spec.device == "auto"
    for config in ("configs/ccr10-e.yaml", "configs/ccr10.yaml"):
        translate = ReproduceSpec.load(os.path.join(REPO, config)).translate_spec()
        assert translate.model.startswith("pretrained/m2m100") and translate.device == "auto"


@pytest.mark.parametrize("name", ["ccr6", "ccr6-e", "ccr10", "ccr10-e"])
def test_every_paper_config_runs_the_chain_the_paper_describes(name):
    """Each paper config is a whole chain for ``ccrk reproduce``: its sources, the authors' translator
    (M2M-100 1.2B, beam 5) for es/id/ru/tr where K is 10, the authors' released de/fr/cs/ja/zh for
    every source it acquires, complete K-lingual tuples, every protocol benchmark excluded."""
    from flows.reproduce import build_spec_with_exclusions

    spec = ReproduceSpec.load(os.path.join(REPO, "configs", f"{name}.yaml"))
    k = 10 if name.startswith("ccr10") else 6
    sources = ["cc3m", "sbu", "vg", "coco"] if name.endswith("-e") else ["cc3m"]
    assert spec.acquire.sources == sources and spec.build_spec().sources == sources
    translate = spec.translate_spec()
    if k == 10:
        assert translate.langs == ["es", "id", "ru", "tr"]
        assert translate.model == "pretrained/m2m100_1.2B" and translate.beam_size == 5
    else:
        assert translate.langs == []
    assert sorted(s for item in translate.imports for s in item.source) == sorted(sources)
    assert all(item.langs == ["de", "fr", "cs", "ja", "zh"] for item in translate.imports)
    build = build_spec_with_exclusions(spec)
    assert len(build.langs) == k and build.min_langs == k
    assert sorted(e.benchmark for e in build.exclude) == ["coco", "multi30k", "wit", "xflickrco"]
    assert sorted(p.benchmark for p in spec.protocol) == ["coco", "multi30k", "wit", "xflickrco"]
    assert {p.paper_model for p in spec.protocol} == {name.upper()}
    assert [r.name for r in spec.pretrain.runs] == [name]


def test_the_nightly_build_is_the_ccr10_e_configs_build():
    """The scheduled build makes the dataset `ccrk reproduce --config configs/ccr10-e.yaml` builds:
    the same sources, languages, complete tuples and excluded benchmarks."""
    from flows.reproduce import build_spec_with_exclusions

    dep = next(d for d in _deployments() if d["name"] == "nightly-ccr10-e")
    nightly = BuildSpec.parse(dep["parameters"]["spec"])
    chain = build_spec_with_exclusions(ReproduceSpec.load(os.path.join(REPO, "configs/ccr10-e.yaml")))
    assert nightly.version_params() == chain.version_params()


def test_a_misspelt_deployment_key_is_one_line_naming_the_nearest():
    dep = next(d for d in _deployments() if d["name"] == "nightly-ccr10-e")
    bad = {**dep["parameters"]["spec"], "shard_sise": 10}
    with pytest.raises(SpecError) as err:
        BuildSpec.parse(bad, where="prefect.yaml: nightly-ccr10-e", section="spec")
    assert str(err.value) == "prefect.yaml: nightly-ccr10-e: spec: unknown key 'shard_sise' (did you mean 'shard_size'?)"


def test_a_misspelt_key_in_a_reproduce_config_is_one_line(tmp_path):
    text = open(os.path.join(REPO, "configs", "demo.yaml"), encoding="utf-8").read()
    bad = tmp_path / "demo.yaml"
    bad.write_text(text.replace("  shard_size: 100", "  shard_sise: 100"), encoding="utf-8")
    with pytest.raises(SpecError, match=r"build: unknown key 'shard_sise' \(did you mean 'shard_size'\?\)") as err:
        ReproduceSpec.load(str(bad))
    assert "\n" not in str(err.value)
    run = tmp_path / "tiny.yaml"
    run.write_text(open(os.path.join(REPO, "configs", "tiny.yaml"), encoding="utf-8").read()
                   .replace("  fusion: true", "  fusoin: true"), encoding="utf-8")
    with pytest.raises(SpecError, match=r"loss: unknown key 'fusoin' \(did you mean 'fusion'\?\)"):
        load_config(str(run))


def _verb_parsers() -> dict[str, argparse.ArgumentParser]:
    from ccrk.app.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_every_verb_flag_of_a_spec_field_defaults_to_the_spec(verb):
    """A verb's flag for a spec field has no default of its own (None: the spec's applies) and its
    help shows the spec's; the verb's FLAGS name fields of its spec."""
    spec_cls = VERBS[verb]
    module = importlib.import_module(f"ccrk.app.commands.{verb}")
    flags = getattr(module, "FLAGS", None)
    assert flags, f"ccrk {verb} derives no flags from {spec_cls.__name__}"
    assert set(flags) <= set(spec_cls.model_fields)
    actions = {a.dest: a for a in _verb_parsers()[verb]._actions}
    for field in flags:
        action = actions[field]
        assert action.default is None, f"--{field}: default {action.default!r} restates the spec's"
        shown = spec_cls.model_fields[field].json_schema_extra.get("shown")
        if shown:
            assert shown in (action.help or "").replace("%%", "%"), f"--{field}'s help hides the spec's default"
