"""Every name a notebook takes from stego_core exists: a renamed or moved function breaks a chapter at run time
(after its upstream chapters have spent minutes), so it is caught here, statically, in the fast suite."""
import ast
import importlib
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.py"))


def _stego_modules(tree: ast.Module) -> tuple[dict[str, object], list[str]]:
    """Names a notebook binds to stego_core modules, and its missing `from stego_core... import x` names."""
    bound, missing = {}, []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "stego_core":
            parent = importlib.import_module(node.module)
            for alias in node.names:
                try:
                    bound[alias.asname or alias.name] = importlib.import_module(f"{node.module}.{alias.name}")
                except ModuleNotFoundError:
                    if not hasattr(parent, alias.name):
                        missing.append(f"from {node.module} import {alias.name}")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "stego_core":
                    bound[alias.asname or alias.name] = importlib.import_module(alias.name)
    return bound, missing


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_stego_core_name_a_notebook_uses_exists(notebook):
    tree = ast.parse(notebook.read_text())
    bound, missing = _stego_modules(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in bound:
            if not hasattr(bound[node.value.id], node.attr):
                missing.append(f"line {node.lineno}: {node.value.id}.{node.attr}")
    assert not missing, f"{notebook.name} uses names stego_core does not have: {missing}"


def test_the_check_sees_a_missing_name(tmp_path):
    tree = ast.parse("from stego_core.book import figures\nfigures.no_such_function()\n")
    bound, _ = _stego_modules(tree)
    assert not hasattr(bound["figures"], "no_such_function")
