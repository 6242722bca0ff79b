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
fault: str = ""  # show only the cases of this kind of fault (e.g. "full disk"); "" shows every case

# %% [markdown]
# # Reliability: what happens when things go wrong
#
# Paper-scale runs die: a preempted GPU node, a full scratch disk, a second terminal starting the same chapter, a
# laptop closed in the middle of a sweep. The table below lists every fault and bad input that the test suite
# inflicts on the study and what the study does about it. It is generated from the tests' own list of cases
# (`stego_core.reliability.CASES`): `make test` runs each case and fails when one no longer behaves as this page
# says.
#
# How the pieces fit: every keyed artifact is written under temporary names and renamed into place, and counts as
# finished only once its marker is written last, so a process killed at any moment (even `kill -9`) leaves
# something that refuses to open and that a rerun resumes. One process writes an artifact at a time (an operating
# system file lock that dies with its holder), a full disk stops with one line that says how much the stage needs,
# and every process the runner starts (the chapter's kernel, sweep and CRF workers) dies with it. The kill cases
# come from a fault-injection harness (`tests/faults.py`): it kills a stage at seeded random moments, reads what is
# left, restarts the stage and compares the end state with an uninterrupted run; `benchmarks/kill_harness.py` runs
# twenty trials per stage.

# %% tags=["remove-cell"]
from myst_nb import glue

from stego_core.reliability import CASES, cases_table

table = cases_table(fault or None)
glue("n_cases", len(CASES), display=False)
glue("n_shown", len(table), display=False)

# %% [markdown]
# The test suite tries {glue:text}`n_cases` cases; {glue:text}`n_shown` of them are shown here.

# %%
table.style.hide(axis="index")
