"""Notebook parameters and profiles.

A notebook's ``parameters`` cell holds ``name = literal  # comment`` lines; ``-p NAME VALUE`` values are parsed like
papermill's (YAML literals) and checked against the defaults' types. A profile is YAML::

    parameters:            # shared: given to every notebook that has a parameter of that name
      dataset: mosaic
    notebooks:             # run in this order
      - notebook: 00_data
        parameters: {n_examples: 8}   # strict: each name must exist in that notebook
"""
from __future__ import annotations

import ast
import io
import os
import tokenize
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..config import StegoError, repo_root


# --------------------------------------------------------------------------------------------- notebooks & params
@dataclass(frozen=True)
class Parameter:
    """One line of a notebook's ``parameters`` cell."""

    name: str  # the variable name
    default: Any  # the literal it is assigned
    comment: str  # the comment that explains it ("" when there is none)


def notebook_path(notebook: str | os.PathLike, root: Path | None = None) -> Path:
    """``00_data`` / ``00_data.py`` / ``notebooks/00_data.py`` -> the jupytext source file."""
    root = root or repo_root()
    text = str(notebook)
    cands = [Path(text)] if text.endswith(".py") else []
    stem = Path(text).name.removesuffix(".py")
    cands += [root / "notebooks" / f"{stem}.py"]
    for cand in cands:
        if cand.is_file():
            return cand.resolve()
    known = sorted(p.stem for p in (root / "notebooks").glob("[0-9]*.py"))
    raise StegoError(f"notebook: {notebook!r} not found; expected one of {', '.join(known) or '(none)'} "
                     f"(files notebooks/NAME.py)")


def _parameters_cell(source: str, path: Path) -> tuple[str, int]:
    """The text of the cell tagged ``parameters`` in a py:percent file and its first line number (1-based)."""
    lines = source.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("# %%") and "parameters" in line and "tags" in line:
            body = []
            for nxt in lines[i + 1:]:
                if nxt.startswith("# %%"):
                    break
                body.append(nxt)
            return "\n".join(body), i + 2
    raise StegoError(f"{path.name}: no cell tagged parameters; expected a first cell "
                     f"'# %% tags=[\"parameters\"]'")


def read_parameters(notebook: str | os.PathLike) -> list[Parameter]:
    """The parameters of a notebook: ``name = literal  # comment`` lines of its ``parameters`` cell, in order."""
    path = notebook_path(notebook)
    cell, first = _parameters_cell(path.read_text(), path)
    try:
        tree = ast.parse(cell)
    except SyntaxError as exc:
        raise StegoError(f"{path.name}: parameters cell line {first + (exc.lineno or 1) - 1}: {exc.msg}") from None
    comments: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(cell).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
    cell_lines = cell.splitlines()
    params = []
    for node in tree.body:
        where = f"{path.name}: parameters cell line {first + node.lineno - 1}"
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
            raise StegoError(f"{where}: expected 'name = literal  # comment', got {ast.unparse(node)!r}")
        try:
            value = ast.literal_eval(node.value)
        except ValueError:
            raise StegoError(f"{where}: {ast.unparse(node.value)!r} is not a literal; "
                             f"the parameters cell holds literals only") from None
        text = " ".join(comments[n] for n in range(node.lineno, node.end_lineno + 1) if n in comments)
        if not text:  # a comment block right above the assignment
            above, n = [], node.lineno - 1
            while n >= 1 and cell_lines[n - 1].lstrip().startswith("#"):
                above.insert(0, comments.get(n, ""))
                n -= 1
            text = " ".join(a for a in above if a)
        params.append(Parameter(node.targets[0].id, value, text))
    return params


def parse_value(text: str) -> Any:
    """A ``-p`` value as papermill reads it, extended to YAML literals: ``3``, ``0.5``, ``true``, ``[1, 2]``,
    ``None``."""
    if text in ("None", "null", "~"):
        return None
    if text in ("True", "False"):
        return text == "True"
    for number in (int, float):  # what papermill accepts, incl. 1e-3 that YAML 1.1 reads as text
        try:
            return number(text)
        except ValueError:
            pass
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return value if isinstance(value, (int, float, bool, list, dict)) or value is None else text


def parse_cli_parameters(notebook: str | os.PathLike, pairs: list[tuple[str, str]]) -> dict[str, Any]:
    """``-p NAME VALUE`` pairs -> values: the text as is for string parameters, else :func:`parse_value`."""
    defaults = {p.name: p.default for p in read_parameters(notebook)}
    return {name: text if isinstance(defaults.get(name), str) else parse_value(text) for name, text in pairs}


def _type_name(value: Any) -> str:
    return {bool: "a boolean (true/false)", int: "an integer", float: "a number", str: "a string",
            list: "a list", tuple: "a list", dict: "a mapping"}.get(type(value), type(value).__name__)


def check_parameters(notebook: str | os.PathLike, values: dict[str, Any], *, strict: bool = True,
                     source: str = "-p") -> dict[str, Any]:
    """Validate ``values`` against the notebook's parameters cell and return them coerced to the defaults' types.

    Unknown names raise a StegoError listing the valid ones (``strict=False`` drops them instead); a value whose type
    differs from the default's raises a StegoError (an int is accepted for a float; a ``None`` default takes anything;
    a string default takes the text as it was written).
    """
    params = {p.name: p for p in read_parameters(notebook)}
    name = notebook_path(notebook).stem
    out = {}
    for key, value in values.items():
        if key not in params:
            if not strict:
                continue
            raise StegoError(f"{source} {key}: {name} has no parameter {key!r}; valid names: {', '.join(params)}")
        default = params[key].default
        if default is None:  # a None default takes any value
            out[key] = value
            continue
        ok = (
            (isinstance(default, bool) and isinstance(value, bool))
            or (isinstance(default, int) and not isinstance(default, bool) and isinstance(value, int)
                and not isinstance(value, bool))
            or (isinstance(default, float) and isinstance(value, (int, float)) and not isinstance(value, bool))
            or (isinstance(default, str) and isinstance(value, str))
            or (isinstance(default, (list, tuple)) and isinstance(value, (list, tuple)))
            or (isinstance(default, dict) and isinstance(value, dict))
        )
        if not ok:
            raise StegoError(f"{source} {key}: expected {_type_name(default)} like the default {default!r}, "
                             f"got {_type_name(value)} {value!r}")
        out[key] = float(value) if isinstance(default, float) else value
    return out


# --------------------------------------------------------------------------------------------- profiles
def profile_path(profile: str | os.PathLike) -> Path:
    """``demo`` -> ``notebooks/profiles/demo.yaml``; a path to a YAML file is taken as is."""
    path = Path(profile)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path.resolve()
    cand = repo_root() / "notebooks" / "profiles" / f"{profile}.yaml"
    if cand.is_file():
        return cand
    known = sorted(p.stem for p in (repo_root() / "notebooks" / "profiles").glob("*.yaml"))
    raise StegoError(f"--profile: {profile!r} not found; expected one of {', '.join(known)} or a .yaml file")


def load_profile(profile: str | os.PathLike) -> list[tuple[str, dict[str, Any]]]:
    """The (notebook, validated parameters) pairs of a profile, in run order."""
    path = profile_path(profile)
    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise StegoError(f"--profile: {path.name} is not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("notebooks"), list):
        raise StegoError(f"--profile: {path.name} needs a 'notebooks:' list of {{notebook: NAME, parameters: {{...}}}}")
    shared = doc.get("parameters") or {}
    runs = []
    for entry in doc["notebooks"]:
        entry = {"notebook": entry} if isinstance(entry, str) else entry
        if not isinstance(entry, dict) or "notebook" not in entry:
            raise StegoError(f"--profile: {path.name}: each notebooks entry needs 'notebook: NAME', got {entry!r}")
        nb = str(entry["notebook"])
        values = check_parameters(nb, shared, strict=False, source=f"{path.name} parameters:")
        values.update(check_parameters(nb, entry.get("parameters") or {}, source=f"{path.name} {nb}:"))
        runs.append((nb, values))
    return runs


