"""Structural rules of the package, read from its source with `ast` (issue 13, "Done when").

- no function in stego_core longer than 80 lines, no module longer than 500 lines;
- no `from .module import _private` (or `module._private`) across modules;
- no module calls `training.train` except `training` itself, the sweep (and its Ray executor `distributed`) and the
  runs module's `train_missing` path;
- imports at the top of modules, except the heavy optional ones (`LAZY_IMPORTS`);
- one home per shared constant and one atomic writer (`config.atomic_write` / `atomic_write_fs`).

The two allow-lists below hold what is still over the limits. They only shrink: when you split one of these modules
or functions, delete its entry here (the test fails while a listed entry is already within the limit, so the list
cannot go stale), and never add one — split the code instead.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "stego_core"
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80

# Modules (paths relative to stego_core/) still longer than MAX_MODULE_LINES. Shrinking: remove yours when it is split.
MODULES_OVER_LIMIT = {
    "backbones.py",
    "cache.py",
    "data.py",
    "projections.py",
}
# Functions ("module path:qualified name") still longer than MAX_FUNCTION_LINES. Shrinking, like the list above.
FUNCTIONS_OVER_LIMIT = {
    "checkpoints.py:load_stego_checkpoint",
}
# Imported inside functions only: heavy and optional (a missing one must not break `import stego_core.x`).
LAZY_IMPORTS = {"ray", "hnne", "papermill", "playwright", "torch.utils.tensorboard"}
# Import cycles broken at call time: segmenter imports checkpoints to read released checkpoints, and the checkpoint
# writer builds a Segmenter from a run; cache and knn size their stores with the cost model, which reads the
# training presets, the sweep's grids and the fused groups (all of which import cache).
CYCLE_BREAKERS = {("checkpoints.py", ".segmenter"), ("costs.py", ".training"), ("costs.py", ".sweep"),
                  ("costs.py", ".fused")}
# Shared constants and the one module that may define them.
CONSTANT_HOMES = {
    "IMAGENET_MEAN": "data.py", "IMAGENET_STD": "data.py", "IMAGE_EXTENSIONS": "data.py",
    "METHODS": "config.py", "METHOD_LABELS": "config.py", "SERIES_LABELS": "config.py", "PROTOCOLS": "config.py",
    "PROBES": "probes.py",
}
# The modules that may call stego_core.training.train (distributed runs the sweep's runs as Ray jobs).
TRAINERS = {"training.py", "sweep.py", "distributed.py", "runs.py"}


def _modules() -> dict[str, ast.Module]:
    return {p.relative_to(PACKAGE).as_posix(): ast.parse(p.read_text(), filename=str(p))
            for p in sorted(PACKAGE.rglob("*.py"))}


def _module_lines() -> dict[str, int]:
    return {p.relative_to(PACKAGE).as_posix(): len(p.read_text().splitlines()) for p in sorted(PACKAGE.rglob("*.py"))}


def _functions(tree: ast.AST, prefix: str = ""):
    """(qualified name, node) of every function and method, nested ones included."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield prefix + node.name, node
            yield from _functions(node, prefix + node.name + ".")
        elif isinstance(node, ast.ClassDef):
            yield from _functions(node, prefix + node.name + ".")
        else:
            yield from _functions(node, prefix)


def _function_lengths() -> dict[str, int]:
    """Lines from the `def` (decorators not counted) to the last line of the body."""
    return {f"{path}:{name}": node.end_lineno - node.lineno + 1
            for path, tree in _modules().items() for name, node in _functions(tree)}


def _is_package_module(node: ast.ImportFrom) -> bool:
    return node.level > 0 or (node.module or "").split(".")[0] == "stego_core"


def _private_imports(tree: ast.Module) -> list[str]:
    """`from .x import _name` and `x._name` where x is a stego_core module bound by an import."""
    found, module_names = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and _is_package_module(node):
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    found.append(f"line {node.lineno}: from {'.' * node.level}{node.module or ''} import {alias.name}")
                if node.module in (None, "stego_core") or (node.level > 0 and not node.module):
                    module_names.add(alias.asname or alias.name)  # from . import crf
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("stego_core.") and alias.asname:
                    module_names.add(alias.asname)
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in module_names
                and node.attr.startswith("_") and not node.attr.startswith("__")):
            found.append(f"line {node.lineno}: {node.value.id}.{node.attr}")
    return found


def _train_calls(tree: ast.Module) -> list[str]:
    """Calls of stego_core.training.train: `train(...)` after `from .training import train`, or `training.train(...)`.
    Module methods (`self.train()`, `head.train(False)`) are nn.Module's mode switch, not this."""
    train_names, training_names = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and _is_package_module(node):
            for alias in node.names:
                if (node.module or "").split(".")[-1] == "training" and alias.name == "train":
                    train_names.add(alias.asname or "train")
                if alias.name == "training":
                    training_names.add(alias.asname or "training")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "stego_core.training":
                    training_names.add(alias.asname or "stego_core.training")
    calls = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        fn = node.func
        if isinstance(fn, ast.Name) and fn.id in train_names:
            calls.append(f"line {node.lineno}: {fn.id}(...)")
        elif isinstance(fn, ast.Attribute) and fn.attr == "train" and ast.unparse(fn.value) in training_names:
            calls.append(f"line {node.lineno}: {ast.unparse(fn)}(...)")
    return calls


def _lazy_allowed(module: str, path: str) -> bool:
    return (path, module) in CYCLE_BREAKERS or any(module == m or module.startswith(m + ".") for m in LAZY_IMPORTS)


def _local_imports(tree: ast.Module, path: str = "") -> list[str]:
    found = []
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                if isinstance(node, ast.Import):
                    modules = {alias.name for alias in node.names}
                elif isinstance(node, ast.ImportFrom):
                    modules = {"." * node.level + (node.module or "")}
                else:
                    continue
                if not all(_lazy_allowed(m, path) for m in modules):
                    found.append(f"line {node.lineno}: {ast.unparse(node)}")
    return found


def _assigned_names(tree: ast.Module) -> set[str]:
    """Names bound by module-level assignments (not imports)."""
    names = set()
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
            node, ast.AnnAssign) else []
        names |= {t.id for t in targets if isinstance(t, ast.Name)}
    return names


def _atomic_write_calls(tree: ast.Module) -> list[str]:
    """Hand-made atomic writes: ``tempfile.mkstemp`` or ``os.replace`` / ``os.rename``."""
    return [f"line {node.lineno}: {ast.unparse(node.func)}" for node in ast.walk(tree)
            if isinstance(node, ast.Call) and ast.unparse(node.func) in ("tempfile.mkstemp", "os.replace", "os.rename")]


def test_modules_are_short():
    lines = _module_lines()
    over = {path for path, n in lines.items() if n > MAX_MODULE_LINES}
    new = {path: lines[path] for path in over - MODULES_OVER_LIMIT}
    assert not new, f"modules over {MAX_MODULE_LINES} lines (split them): {new}"
    stale = {path: lines.get(path) for path in MODULES_OVER_LIMIT - over}
    assert not stale, f"within the limit or gone now: remove them from MODULES_OVER_LIMIT: {stale}"


def test_functions_are_short():
    lengths = _function_lengths()
    over = {name for name, n in lengths.items() if n > MAX_FUNCTION_LINES}
    new = {name: lengths[name] for name in over - FUNCTIONS_OVER_LIMIT}
    assert not new, f"functions over {MAX_FUNCTION_LINES} lines (split them): {new}"
    stale = {name: lengths.get(name) for name in FUNCTIONS_OVER_LIMIT - over}
    assert not stale, f"within the limit or gone now: remove them from FUNCTIONS_OVER_LIMIT: {stale}"


def test_no_private_names_cross_modules():
    found = {path: hits for path, tree in _modules().items() if (hits := _private_imports(tree))}
    assert not found, f"private names used across modules (make them public or move them): {found}"


def test_only_training_sweep_and_runs_call_train():
    found = {path: hits for path, tree in _modules().items()
             if path not in TRAINERS and (hits := _train_calls(tree))}
    assert not found, f"downstream modules must require runs, not train them: {found}"


def test_imports_at_module_top():
    found = {path: hits for path, tree in _modules().items() if (hits := _local_imports(tree, path))}
    assert not found, f"imports inside functions (move them to the top; only {sorted(LAZY_IMPORTS)} stay lazy): {found}"


def test_shared_constants_have_one_home():
    for path, tree in _modules().items():
        for name in _assigned_names(tree) & set(CONSTANT_HOMES):
            home = CONSTANT_HOMES[name]
            assert home == path, f"{path} defines {name}; import it from stego_core.{home.removesuffix('.py')}"
    imagenet_mean = "(0.485, 0.456, 0.406)"
    copies = [p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py") if imagenet_mean in p.read_text()]
    assert copies == ["data.py"], f"ImageNet statistics typed out again in {copies}; import them from stego_core.data"


def test_one_atomic_writer():
    # the book tooling (study.py) renames whole executed notebooks and built sites into place, not single files
    exempt = ("config.py", "study.py", "book/")
    found = {path: hits for path, tree in _modules().items()
             if not path.startswith(exempt) and (hits := _atomic_write_calls(tree))}
    assert not found, f"write through stego_core.config.atomic_write (or atomic_write_fs for stores): {found}"


# The checkers themselves, on small sources: each rule must catch what it is for.
@pytest.mark.parametrize("source, expected", [
    ("from .crf import _image_bytes\n", 1),
    ("from stego_core.explorer import _RunCode as R\n", 1),
    ("from . import crf\ncrf._pool()\n", 1),
    ("from .crf import dense_crf, __all__\n", 0),
    ("import numpy as np\nnp._NoValue\n", 0),
])
def test_private_import_checker(source, expected):
    assert len(_private_imports(ast.parse(source))) == expected


@pytest.mark.parametrize("source, expected", [
    ("from .training import train\ntrain(cfg)\n", 1),
    ("from .training import train as fit\nfit(cfg)\n", 1),
    ("from . import training\ntraining.train(cfg)\n", 1),
    ("import stego_core.training\nstego_core.training.train(cfg)\n", 1),
    ("self.train(False)\nhead.train()\n", 0),
    ("from .training import train_step\ntrain_step(state)\n", 0),
])
def test_train_call_checker(source, expected):
    assert len(_train_calls(ast.parse(source))) == expected


@pytest.mark.parametrize("source, expected", [
    ("import os\ndef f():\n    import json\n", 1),
    ("def f():\n    from .cache import open_store\n", 1),
    ("def f():\n    import ray\n    from hnne import HNNE\n    import papermill as pm\n", 0),
    ("def f():\n    from playwright.sync_api import sync_playwright\n", 0),
    ("def f():\n    from torch.utils.tensorboard import SummaryWriter\n", 0),
    ("def f():\n    import torch.utils.data\n", 1),
    ("def f():\n    from .segmenter import Segmenter\n", 1),
])
def test_local_import_checker(source, expected):
    assert len(_local_imports(ast.parse(source))) == expected


def test_function_length_counts_nested_and_methods():
    source = "class A:\n    def f(self):\n" + "        x = 1\n" * 90 + "\ndef g():\n    def h():\n        pass\n"
    lengths = {name: node.end_lineno - node.lineno + 1 for name, node in _functions(ast.parse(source))}
    assert lengths == {"A.f": 91, "g": 3, "g.h": 2}
