# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% tags=["parameters"]
notebooks = []  # which notebooks to list, e.g. ["00_data"]; an empty list means every notebook in notebooks/

# %% [markdown]
# # Parameter reference
#
# Every chapter of this book is a notebook with a first cell of parameters. Each table below is read from that
# cell (`stego_core.study.read_parameters`), so it always matches the code: the name, the default and the
# comment that explains it. Change a value with `stego-study run NAME -p name value`, or give a notebook its
# values in a profile (`notebooks/profiles/*.yaml`); unknown names and values of the wrong type are refused
# before anything runs. `stego-study params NAME` prints the same list in a terminal.

# %%
import pandas as pd
from IPython.display import Markdown, display

from stego_core import study
from stego_core.config import repo_root

names = notebooks or sorted(p.stem for p in (repo_root() / "notebooks").glob("[0-9]*.py"))
for name in names:
    params = study.read_parameters(name)
    display(Markdown(f"**`{name}`** ({len(params)} parameters; `stego-study params {name}`)"))
    display(pd.DataFrame({"parameter": [p.name for p in params], "default": [repr(p.default) for p in params],
                          "what it does": [p.comment for p in params]}).style.hide(axis="index"))
