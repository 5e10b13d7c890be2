"""Nothing a user, a config, an imported file or a manifest supplies makes ccrk write or read
outside its data root: language codes, dataset / source names and versions, and a manifest's shard
names are checked where they enter (issue 26, item 4)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import duckdb
import pytest

from ccrk.app.cli import main
from kshards import make_klingual_dataset
from storage import layout, manifest
from storage.errors import CCRKError
from storage.export import export_dataset
from storage.languages import check_lang, parse_langs
from storage.reader import KLingualDataset
from storage.spec import SpecError
from storage.specs import build_spec
from storage.verify import verify_dataset
from translation import store
from translation.imports import import_report, import_translations
from translation.spec import TranslateSpec

CCRK = os.path.join(os.path.dirname(sys.executable), "ccrk")
ESCAPE = "../../../../imp-escape"


def tree(top) -> set[str]:
    """Every file and directory below ``top``."""
    out = set()
    for d, dirs, files in os.walk(top):
        out.update(os.path.join(d, n) for n in dirs + files)
    return out


def new_outside(before: set[str], after: set[str], root: str) -> list[str]:
    return sorted(p for p in after - before if not p.startswith(root + os.sep))


def _jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


# ---------------------------------------------------------------------------- language codes


def test_language_codes_are_bcp47_like_and_stored_lower_case():
    assert parse_langs("en, ES,zh-Hans,pt-BR,es-419,en") == ("en", "es", "zh-hans", "pt-br", "es-419")
    assert build_spec(langs="EN,Zh-Hans").langs == ["en", "zh-hans"]
    for bad in ("../x", "a/b", "e", "english", "zh_Hans", "de\x1b[31m", "..", "de/../../x"):
        with pytest.raises(CCRKError, match="is not a language code"):
            check_lang(bad, "--langs")


def test_an_import_key_that_is_no_language_is_a_counted_skip_and_writes_nothing_outside(root, tmp_path):
    path = _jsonl(tmp_path / "release.jsonl", [
        {"caption": {"en": "a red circle", "de": "ein roter Kreis", ESCAPE: "escaped"}},
        {"caption": {"en": "a blue square", "DE": "ein blaues Quadrat", "a/b": "x"}}])
    before = tree(tmp_path)
    stats = import_translations(root, path, "cclm")
    assert new_outside(before, tree(tmp_path), root) == []
    assert not (tmp_path / "imp-escape").exists()
    assert stats.imported == {"de": 2} and stats.bad_rows == 0  # the rows' other languages are imported
    assert stats.bad_keys == 2 and stats.bad_key_examples == [repr(ESCAPE), repr("a/b")]
    assert {lang for _, _, lang in store.list_stores(root)} == {"de"}
    (warning,) = import_report("cclm", path, stats, 0.95)["warnings"]
    assert warning.startswith("import cclm: 2 text(s) skipped under keys that are no language code") and ESCAPE in warning


def test_the_import_command_reports_the_skip_and_refuses_bad_langs(root, tmp_path, capsys):
    path = _jsonl(tmp_path / "release.jsonl", [{"en": "a red circle", "de": "ein roter Kreis", ESCAPE: "x"}])
    before = tree(tmp_path)
    assert main(["translate", "--import", path, "--name", "cclm", "--root", root]) == 0
    out = capsys.readouterr().out
    assert "warning: import cclm: 1 text(s) skipped under keys that are no language code" in out
    assert main(["translate", "--import", path, "--name", "cclm", "--langs", "de,../x", "--root", root]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'../x' is not a language code" in err
    assert main(["translate", "--import", path, "--name", "../cclm", "--root", root]) == 2
    assert "import name '../cclm' is not a plain name" in capsys.readouterr().err
    assert new_outside(before, tree(tmp_path), root) == []


def test_bad_langs_on_the_command_line_and_in_configs_are_one_line(root, tmp_path, capsys):
    assert main(["build", "--langs", "en,../../x", "--root", root]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "langs[1]: '../../x' is not a language code" in err
    config = tmp_path / "c.yaml"
    for section, message in (({"langs": ["es", "a/b"]}, "translate.langs[1]: 'a/b' is not a language code"),
                             ({"thresholds": {"by_lang": {"..": {}}}}, "'..' is not a language code"),
                             ({"imports": [{"name": "x", "path": "p", "langs": ["de", "/etc"]}]},
                              "translate.imports[0].langs[1]: '/etc' is not a language code")):
        config.write_text(json.dumps({"translate": section}))
        with pytest.raises(SpecError, match="^" + str(config).replace(".", r"\.") + ": ") as e:
            TranslateSpec.load(str(config), "translate")
        assert message in str(e.value) and "\n" not in str(e.value)


# ---------------------------------------------------------------------------- names and versions


def test_build_name_outside_the_root_is_refused_by_the_real_command(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    before = tree(tmp_path)
    out = subprocess.run([CCRK, "build", "--name", "../../x", "--root", str(root)], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "CCRK_ROOT": str(root)})
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines() == [
        "ccrk build: error: name: '../../x' is not a plain name (letters, digits, '-', '_' and '.', "
        "starting with a letter or digit, no slash, at most 255 characters)"]
    assert tree(tmp_path) == before


@pytest.mark.parametrize("fields, message", [
    ({"name": ".."}, "name: '..' is not a plain name"),
    ({"name": ".hidden"}, "name: '.hidden' is not a plain name"),
    ({"name": "a/b"}, "name: 'a/b' is not a plain name"),
    ({"sources": ["coco", "../vg"]}, "sources[1]: '../vg' is not a plain name"),
    ({"source_versions": {"coco": "../../v1"}}, "source_versions.coco: '../../v1' is not a plain name"),
    ({"exclude": [{"benchmark": "../b", "data": "d"}]}, "exclude: entry 0: benchmark: '../b' is not a plain name"),
])
def test_names_and_versions_that_become_paths_are_plain_names(fields, message):
    with pytest.raises(SpecError) as e:
        build_spec(**fields)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_the_layout_refuses_a_component_that_is_no_plain_name(tmp_path):
    root = str(tmp_path)
    assert layout.dataset_dir(root, "demo", "0123abcd") == f"{root}/datasets/demo/0123abcd"
    assert layout.translation_dir(root, "import:cclm", "imported", "zh-hans").endswith("import:cclm/imported/zh-hans")
    for build in (lambda: layout.dataset_dir(root, "..", "v"), lambda: layout.dataset_dir(root, "x", "../v"),
                  lambda: layout.source_dir(root, "coco", "/etc"), lambda: layout.run_dir(root, "a/../../b"),
                  lambda: layout.report_dir(root, ""), lambda: layout.translation_dir(root, "m", "d", ESCAPE)):
        with pytest.raises(CCRKError, match=f"is not a plain name .*refused as a path under {root}$"):
            build()


# ---------------------------------------------------------------------------- a crafted manifest


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    return make_klingual_dataset(str(tmp_path_factory.mktemp("paths") / "ds"), n_images=4, per_shard=2, side=32)


def crafted(dataset, tmp_path, sql: str, *params) -> str:
    """A copy of ``dataset`` whose manifest ``sql`` changed."""
    import shutil

    ds = shutil.copytree(dataset, str(tmp_path / "crafted"))
    con = duckdb.connect(manifest.manifest_path(ds))
    try:
        con.execute(sql, list(params))
    finally:
        con.close()
    return ds


@pytest.mark.parametrize("bad", ["/etc/passwd", "/dev/zero", "../../../../etc/passwd", "..", ".hidden.tar"])
def test_verify_refuses_a_manifest_whose_shard_is_no_plain_file_name(dataset, tmp_path, capsys, bad):
    ds = crafted(dataset, tmp_path, "UPDATE shards SET name = ? WHERE name = 'shard-00001.tar'", bad)
    with pytest.raises(CCRKError) as e:
        verify_dataset(ds)
    assert str(e.value).startswith(f"{ds}: the manifest names shard {bad!r}, which is no plain file name")
    assert main(["verify", ds]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and repr(bad) in err and ds in err


@pytest.mark.parametrize("bad", ["/etc/passwd", "/dev/zero", "../../../../etc/passwd"])
def test_the_reader_refuses_a_manifest_whose_sample_points_outside_the_shards(dataset, tmp_path, bad):
    ds = crafted(dataset, tmp_path, "UPDATE samples SET shard = ? WHERE idx = 3", bad)
    with pytest.raises(CCRKError, match=f"the manifest names shard {bad!r}, which is no plain file name"):
        KLingualDataset(ds)
    assert len(KLingualDataset(dataset)) == 4  # the clean copy still reads


def test_export_refuses_a_manifest_language_that_is_no_code(dataset, tmp_path):
    ds = crafted(dataset, tmp_path, "UPDATE lang_counts SET lang = ? WHERE lang = 'es'", "../../escape")
    before = tree(tmp_path)
    with pytest.raises(CCRKError, match="the manifest's language: '../../escape' is not a language code"):
        export_dataset(ds, str(tmp_path / "out" / "export"))
    assert tree(tmp_path) == before


# ---------------------------------------------------------------------------- the model stages' configs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _reproduce_config(tmp_path, file="chain.yaml", **changes) -> str:
    """configs/demo-small.yaml with ``changes`` over its top-level keys, written as ``file``."""
    from storage.spec import read_yaml

    data = {**read_yaml(os.path.join(REPO, "configs", "demo-small.yaml")), **changes}
    path = tmp_path / file
    path.write_text(json.dumps(data), encoding="utf-8")  # JSON is YAML
    return str(path)


def _one_line_error(capsys) -> str:
    """The command's error line (stderr's lines starting 'ccrk ...: error:'), checked to be one."""
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("ccrk ")]
    assert len(err) == 1, err
    return err[0]


def test_a_reproduce_config_named_outside_the_root_is_one_line(root, tmp_path, capsys):
    from ccrk.specs import ReproduceSpec

    config = _reproduce_config(tmp_path, name="../x")
    with pytest.raises(SpecError) as e:
        ReproduceSpec.load(config)
    assert str(e.value).startswith(f"{config}: name: '../x' is not a plain name (") and "\n" not in str(e.value)
    # Without a name the chain takes its file's, which must be a plain name then.
    unnamed = {k: v for k, v in json.loads(open(config, encoding="utf-8").read()).items() if k != "name"}
    spaced = tmp_path / "my chain.yaml"
    spaced.write_text(json.dumps(unnamed), encoding="utf-8")
    with pytest.raises(SpecError, match=r"'my chain' is not a plain name .*: set name: in the config$"):
        ReproduceSpec.load(str(spaced))
    assert ReproduceSpec.load(_reproduce_config(tmp_path, "ok.yaml", name="demo-small")).name == "demo-small"
    before = tree(tmp_path)
    assert main(["reproduce", "--config", config, "--root", root]) == 2
    assert "name: '../x' is not a plain name" in _one_line_error(capsys)
    assert new_outside(before, tree(tmp_path), root) == [] and not (tmp_path / "x-comparison").exists()


def test_evaluate_languages_outside_the_benchmark_folder_are_one_line(root, tmp_path, capsys):
    from ccrk.specs import EvaluateSpec, FinetuneSpec, ReproduceSpec

    for cls, values, message in (
            (EvaluateSpec, {"langs": ["en", "../x"]}, "langs[1]: '../x' is not a language code"),
            (EvaluateSpec, {"mrv_langs": ["a/b"]}, "mrv_langs[0]: 'a/b' is not a language code"),
            (FinetuneSpec, {"mode": "few-shot", "lang": "../../de", "shots": 100}, "lang: '../../de' is not a"),
    ):
        with pytest.raises(SpecError) as e:
            cls.parse(values, where="c.yaml")
        assert str(e.value).startswith("c.yaml: ") and message in str(e.value) and "\n" not in str(e.value)
    assert EvaluateSpec.parse({"langs": ["EN", "zh-Hans"]}).langs == ["en", "zh-hans"]
    config = _reproduce_config(tmp_path, evaluate={"benchmark": "demo", "langs": ["../x"]})
    with pytest.raises(SpecError, match=r"evaluate\.langs\[0\]: '\.\./x' is not a language code") as e:
        ReproduceSpec.load(config)
    assert "\n" not in str(e.value)
    protocol = [{"benchmark": "demo", "few_shot": {"langs": ["de", "/etc"]}}]
    with pytest.raises(SpecError, match=r"protocol\[0\]\.few_shot\.langs\[1\]: '/etc' is not a language code"):
        ReproduceSpec.load(_reproduce_config(tmp_path, protocol=protocol))
    assert main(["evaluate", "--checkpoint", str(tmp_path), "--benchmark", "demo", "--data", str(tmp_path),
                 "--langs", "en,../x", "--root", root]) == 2
    assert "'../x' is not a language code" in _one_line_error(capsys)


def test_a_checkpoint_or_report_that_is_not_there_keeps_its_own_message(root, tmp_path, capsys):
    from ccrk.evaluation.protocols import _resolve_checkpoint
    from flows.evaluate import CombineStage

    for ref in (str(tmp_path / "no" / "such"), "../../x", "no-such-run", "a b"):
        with pytest.raises(CCRKError) as e:
            _resolve_checkpoint(ref, root)
        assert str(e.value) == f"checkpoint {ref!r} is neither a directory, a run under {root}/runs nor a run version"
        with pytest.raises(CCRKError) as e:
            CombineStage(root, [(ref, None)]).plan()
        assert str(e.value) == f"report {ref!r} is neither a report directory nor a report id under {root}/reports"
    os.makedirs(os.path.join(root, "runs", "r1"))
    assert _resolve_checkpoint("r1", root) == os.path.join(root, "runs", "r1")  # a run id still resolves
    assert main(["evaluate", "--checkpoint", "../../x", "--benchmark", "demo", "--data", str(tmp_path),
                 "--root", root]) == 2
    assert _one_line_error(capsys).endswith("checkpoint '../../x' is neither a directory, a run under "
                                            f"{root}/runs nor a run version")


def test_the_exclusion_dir_is_under_the_same_guard(tmp_path):
    root = str(tmp_path)
    assert layout.exclusion_dir(root, "demo", "0123abcd") == f"{root}/exclusions/demo/0123abcd"
    for benchmark, version in (("..", "v"), ("demo", "../../v"), ("a/b", "v"), ("demo", "")):
        with pytest.raises(CCRKError, match=f"is not a plain name .*refused as a path under {root}$"):
            layout.exclusion_dir(root, benchmark, version)


# ---------------------------------------------------------------------------- a crafted benchmark folder


def _xflickrco(tmp_path, rows, lang="en") -> str:
    data = tmp_path / "bench"
    (data / "annotations" / lang).mkdir(parents=True)
    _jsonl(data / "annotations" / lang / "test.jsonl", rows)
    (data / "images").mkdir()
    return str(data)


@pytest.mark.parametrize("bad", ["/etc/passwd", "/dev/zero", "../../../../etc/passwd", "..", "a/../../b.jpg"])
def test_a_benchmark_file_naming_an_image_outside_its_folder_is_refused(tmp_path, bad):
    from ccrk.evaluation.exclusion import evaluation_images
    from ccrk.evaluation.loaders import load_benchmark

    data = _xflickrco(tmp_path, [{"sentences": ["a dog"], "id": "1", "img_path": "1.jpg"},
                                 {"sentences": ["a cat"], "id": "2", "img_path": bad}])
    path = os.path.join(data, "annotations", "en", "test.jsonl")
    message = f"^{path}:2: image path {bad!r} is not a relative path inside the image folder "
    with pytest.raises(CCRKError, match=message.replace(".", r"\.")):
        load_benchmark("demo", data, skip_missing=True)
    with pytest.raises(CCRKError, match=message.replace(".", r"\.")):
        evaluation_images("demo", data)  # an exclusion list never reads it either


def test_cclm_and_multi30k_image_names_outside_the_folder_are_refused(tmp_path):
    from ccrk.evaluation.loaders import load_benchmark

    cclm = tmp_path / "cclm"
    cclm.mkdir()
    (cclm / "test_2016_flickr.en.json").write_text(json.dumps([{"image": "/etc/passwd", "caption": ["x"]}]))
    with pytest.raises(CCRKError, match=r"test_2016_flickr\.en\.json entry 0: image path '/etc/passwd' is not"):
        load_benchmark("multi30k", str(cclm), ["en"], skip_missing=True)
    raw = tmp_path / "m30k" / "data" / "task1"
    (raw / "raw").mkdir(parents=True)
    (raw / "image_splits").mkdir()
    (raw / "image_splits" / "test_2016_flickr.txt").write_text("1.jpg\n../../../escape.jpg\n")
    import gzip

    with gzip.open(raw / "raw" / "test_2016_flickr.en.gz", "wt", encoding="utf-8") as f:
        f.write("a dog\na cat\n")
    with pytest.raises(CCRKError, match=r"test_2016_flickr\.txt:2: image path '\.\./\.\./\.\./escape\.jpg' is not"):
        load_benchmark("multi30k", str(tmp_path / "m30k"), skip_missing=True)


def test_a_listed_language_folder_that_is_no_code_is_one_line(tmp_path):
    from ccrk.evaluation.loaders import load_benchmark

    data = _xflickrco(tmp_path, [{"sentences": ["a dog"], "id": "1", "img_path": "1.jpg"}], lang="de_DE")
    with pytest.raises(CCRKError, match=r"de_DE/test\.jsonl: 'de_DE' is not a language code .*--langs$"):
        load_benchmark("demo", data, skip_missing=True)
    wit = tmp_path / "wit"
    wit.mkdir()
    _jsonl(wit / "test_EN.jsonl", [{"image_url": "u", "caption_reference_description": "x", "image_content": "AA=="}])
    with pytest.raises(CCRKError, match=r"test_EN\.jsonl: 'EN' is not a language code"):
        load_benchmark("wit", str(wit), skip_missing=True)
