"""The shape ARCHITECTURE.md promises, checked: our own imports at module top (outside the app layer),
no function over 80 lines, and the import-linter contract's list of library modules complete.
(`make test` runs ruff and the import-linter contracts themselves before the tests.)"""
from __future__ import annotations

import ast
import pathlib
import tomllib

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("ccrk", "flows", "storage", "translation")
MAX_FUNCTION_LINES = 80
# In-function imports of our own modules that stay, and why (everything else sits at module top).
LAZY_OWN_IMPORTS: dict[str, str] = {
    "translation/engines/base.py:translation.engines.ctranslate2_engine": "imports ctranslate2 (a heavy native library)",
    "translation/engines/base.py:translation.engines.transformers_engine": "imports transformers and torch",
}


def _modules(root: pathlib.Path = REPO):
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            yield path, ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _imported(node: ast.AST) -> str | None:
    if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        return node.module
    if isinstance(node, ast.Import):
        return node.names[0].name
    return None


def _function_imports(tree: ast.Module):
    """(line, module) of every import statement inside a function of ``tree``."""
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                name = _imported(node)
                if name:
                    yield node.lineno, name


def test_our_imports_sit_at_module_top_outside_the_app():
    """The app's verbs import their stage when run (so `ccrk --help` and the Prefect server's start do
    not wait for torch); everywhere else our own imports are at module top, where the import
    contracts and a reader see them."""
    found = set()
    for path, tree in _modules():
        rel = path.relative_to(REPO).as_posix()
        if rel.startswith("ccrk/app/"):
            continue
        for line, name in _function_imports(tree):
            if name.split(".")[0] in PACKAGES:
                found.add(f"{rel}:{name}")
    unexplained = sorted(found - set(LAZY_OWN_IMPORTS))
    assert not unexplained, f"own imports inside functions: {unexplained}"
    assert not set(LAZY_OWN_IMPORTS) - found, "LAZY_OWN_IMPORTS lists imports that are gone"


def test_no_function_is_longer_than_80_lines():
    long = [f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for path, tree in _modules() for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, long


def test_the_library_contract_names_every_library_module_of_ccrk():
    """The first import-linter contract lists ccrk's library modules one by one (ccrk.app sits inside
    ccrk); a new module must join the list, or the contract would not see it."""
    config = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    contract = config["tool"]["importlinter"]["contracts"][0]
    listed = {m for m in contract["source_modules"] if m.startswith("ccrk.")}
    present = {f"ccrk.{p.stem if p.is_file() else p.name}" for p in (REPO / "ccrk").iterdir()
               if (p.suffix == ".py" and p.stem != "__init__") or (p / "__init__.py").exists()}
    assert listed == present - {"ccrk.app"}
    assert {"flows", "ccrk.app"} <= set(contract["forbidden_modules"])


def test_only_the_stage_contract_writes_the_catalog():
    """storage.stage.run_stage is the one place an artifact reaches the catalog: every stage gives it
    its plan and outcome instead of recording itself."""
    writers = sorted({str(path.relative_to(REPO)) for path, tree in _modules() for node in ast.walk(tree)
                      if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                      and node.func.attr == "record" and node.args and isinstance(node.args[0], ast.Call)
                      and ast.unparse(node.args[0].func) == "Artifact"})
    assert writers == ["storage/stage.py"], writers


def test_no_model_or_tokenizer_load_can_run_remote_code():
    """Only transformers' Auto classes can import a checkpoint's own modules (its config's auto_map):
    each of their loads pins trust_remote_code off. Concrete classes (M2M100Tokenizer, SwinModel, ...)
    never run a checkpoint's code."""
    auto_loads, unpinned = [], []
    for path, tree in _modules():
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "from_pretrained" and isinstance(node.func.value, ast.Name)
                    and node.func.value.id.startswith("Auto")):
                where = f"{path.relative_to(REPO)}:{node.lineno}"
                auto_loads.append(where)
                pinned = any(k.arg == "trust_remote_code" and isinstance(k.value, ast.Constant)
                             and k.value.value is False for k in node.keywords)
                if not pinned:
                    unpinned.append(where)
    assert auto_loads, "no Auto*.from_pretrained found: the check looks at nothing"
    assert unpinned == [], unpinned
