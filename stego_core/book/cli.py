"""The ``stego-study`` command.

``stego-study run NOTEBOOK [-p name value ...] [--profile demo] [--force]``
    converts ``notebooks/NOTEBOOK.py`` (jupytext py:percent) to a notebook, executes it with papermill and writes the
    executed chapter to ``book/chapters/NOTEBOOK.ipynb`` (``stego_core.book.runner``). ``-p`` values are parsed like
    papermill's (YAML literals); names must exist in the notebook's ``parameters`` cell and values must have the type
    of the default. A current chapter is not executed again unless ``--force``.
``stego-study book [--profile demo] [--force] [--workdir DIR]``
    runs every notebook of the profile (``notebooks/profiles/NAME.yaml``), vendors the JavaScript the charts and
    widgets need (npm registry, once) and builds the book strictly.
``stego-study preflight --profile NAME [--synthetic]``
    checks that a profile will run before the GPU-days (``stego_core.preflight``); exit status 1 when a check fails.
``stego-study params NOTEBOOK``
    prints the notebook's parameters with their defaults and comments.
``stego-study vendor``
    only fetches the JavaScript into ``book/vendor/``.
``stego-study publish [--html _build/html] [--remote origin] [--branch gh-pages]``
    puts the built book on the ``gh-pages`` branch and pushes it (``make publish``; ``stego_core.book.publish``).
``stego-study segment ...``
    segments your own images (``stego_core.segment``).
``stego-study explore [--profile NAME] [--port N] [--no-browser] [--checkpoint FILE] [--root DIR] [--device D]``
    serves the live explorer with a real kernel on 127.0.0.1 (Voila; ``stego_core.book.explore``).
"""
from __future__ import annotations

import argparse
import sys
from typing import Any

from ..config import StegoError
from ..preflight import add_arguments, run_cli
from ..segment import main as segment_main
from .build import make_book, prepare_workdir
from .explore import serve  # imports torch and voila: only for this command
from .parameters import (
    load_profile,
    notebook_path,
    parse_cli_parameters,
    read_parameters,
)
from .publish import publish
from .runner import run_notebook
from .vendor import vendor_js


# --------------------------------------------------------------------------------------------- CLI
def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="stego-study", description="Run the study's notebooks and build its book.")
    sub = ap.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="execute one notebook into book/chapters/NAME.ipynb")
    run.add_argument("notebook", help="name of a notebook in notebooks/ (e.g. 00_data)")
    run.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                     help="set a parameter (repeatable); values are YAML literals like papermill's -p")
    run.add_argument("--profile", help="take this profile's parameters for the notebook first (e.g. demo)")
    run.add_argument("--force", action="store_true", help="execute even when the chapter is current")
    run.add_argument("--workdir", help="book folder to write into (default: the checkout)")
    sub.add_parser("segment", add_help=False,
                   help="segment your own images with a trained run or a released checkpoint (see its --help)")
    book = sub.add_parser("book", help="run a profile's notebooks and build the book")
    book.add_argument("--profile", default="demo", help="notebooks/profiles/NAME.yaml or a YAML path (demo)")
    book.add_argument("--force", action="store_true", help="execute every notebook even when current")
    book.add_argument("--workdir", help="build a copy of the book in this folder instead of the checkout")
    add_arguments(sub.add_parser("preflight", help="check that a profile will run (data, weights, device, disk, a "
                                 "tiny end-to-end run) before the GPU-days; --synthetic without data or GPU"))
    params = sub.add_parser("params", help="list a notebook's parameters with their comments")
    params.add_argument("notebook")
    sub.add_parser("vendor", help="fetch the book's JavaScript from the npm registry into book/vendor/")
    pub = sub.add_parser("publish", help="put the built book on the gh-pages branch (ghp-import) and push it")
    pub.add_argument("--html", help="the built HTML folder (default: _build/html of the checkout)")
    pub.add_argument("--remote", default="origin", help="git remote name or URL to push to (origin)")
    pub.add_argument("--branch", default="gh-pages", help="branch that holds the HTML (gh-pages)")
    pub.add_argument("--no-push", action="store_true", help="only commit to the local branch")
    explore = sub.add_parser("explore", help="serve the live explorer (Voila, a real kernel) on localhost")
    explore.add_argument("--profile", help="only this profile's runs (dataset, backbone), device and checkpoints")
    explore.add_argument("--port", type=int, default=8866, help="local port to serve on (8866)")
    explore.add_argument("--no-browser", action="store_true", help="do not open a browser")
    explore.add_argument("--checkpoint", action="append", default=[], metavar="FILE",
                         help="also offer this released STEGO .ckpt (repeatable)")
    explore.add_argument("--root", help="artifacts folder with the runs (default: $STEGO_ARTIFACTS, else ./artifacts)")
    explore.add_argument("--device", help="where the models run (default: the profile's, else cpu)")
    return ap


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``stego-study`` console script."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["segment"]:  # its own argument parser: stego_core.segment
        return segment_main(argv[1:])
    args = _parser().parse_args(argv)
    try:
        if args.command == "params":
            for p in read_parameters(args.notebook):
                print(f"{p.name} = {p.default!r}" + (f"  # {p.comment}" if p.comment else ""))
        elif args.command == "publish":
            commit = publish(args.html, remote=args.remote, branch=args.branch, push=not args.no_push)
            print(f"published: {args.branch} at {commit[:12]}" + ("" if args.no_push else f", pushed to {args.remote}"))
        elif args.command == "vendor":
            vendor_js()
        elif args.command == "run":
            values: dict[str, Any] = {}
            if args.profile:
                values.update(dict(load_profile(args.profile)).get(notebook_path(args.notebook).stem, {}))
            values.update(parse_cli_parameters(args.notebook, args.parameter))
            workdir = prepare_workdir(args.workdir) if args.workdir else None
            run_notebook(args.notebook, values, workdir=workdir, force=args.force)
        elif args.command == "book":
            make_book(args.profile, workdir=args.workdir, force=args.force)
        elif args.command == "explore":
            return serve(profile=args.profile, port=args.port, open_browser=not args.no_browser, root=args.root,
                         checkpoints=args.checkpoint, device=args.device)
        elif args.command == "preflight":
            return run_cli(args)
    except StegoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
