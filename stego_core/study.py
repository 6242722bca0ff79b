"""Compatibility names: the book tooling lives in ``stego_core.book`` (``parameters``, ``runner``, ``vendor``,
``build``, ``sphinx_ext``, ``cli``); this module re-exports their public names for older imports."""
from .book.build import build_book, make_book, page_ready, pasted_from, prepare_workdir
from .book.cli import main
from .book.parameters import (
                              Parameter,
                              check_parameters,
                              load_profile,
                              notebook_path,
                              parse_cli_parameters,
                              parse_value,
                              profile_path,
                              read_parameters,
)
from .book.runner import (
                              CHAPTERS,
                              KERNEL_NAME,
                              RunResult,
                              ensure_kernel,
                              run_key,
                              run_notebook,
                              run_profile,
)
from .book.sphinx_ext import setup
from .book.vendor import VENDOR, VENDORED_JS, vendor_js
from .config import StegoError, repo_root

__all__ = [
                              "CHAPTERS",
                              "KERNEL_NAME",
                              "VENDOR",
                              "VENDORED_JS",
                              "Parameter",
                              "RunResult",
                              "StegoError",
                              "build_book",
                              "check_parameters",
                              "ensure_kernel",
                              "load_profile",
                              "main",
                              "make_book",
                              "notebook_path",
                              "page_ready",
                              "parse_cli_parameters",
                              "parse_value",
                              "pasted_from",
                              "prepare_workdir",
                              "profile_path",
                              "read_parameters",
                              "repo_root",
                              "run_key",
                              "run_notebook",
                              "run_profile",
                              "setup",
                              "vendor_js",
]
