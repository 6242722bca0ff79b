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
dataset = None  # dataset whose numbers the findings quote; None takes the first one in the results store (the demo: "mosaic")
protocol = "original"  # which protocol's runs to show: "original" (the study's code) or "corrected"
main_methods = ["stego", "pca", "rp", "dino"]  # series of Figure 4 (the paper shows h-NNE only in the appendix)
spread = "band"  # spread over seeds: "band", "errorbar" or "none"
slider = True  # add the dimension slider to the charts (False gives plainer, printable charts)
root = None  # artifacts folder to read; None means $STEGO_ARTIFACTS, else ./artifacts

# %% [markdown]
# # Results
#
# This chapter trains nothing: it reads the results store (every `results.csv` written by the training runs under
# the artifacts folder) and the cached PCA fits, and draws the study's figures from them. Each number is the
# validation score at the step a run selected itself (its highest validation cluster mIoU), averaged over seeds;
# the runs come from the dimension study (and from any other training chapter run on the same artifacts).

# %%
import numpy as np
from IPython.display import Markdown
from myst_nb import glue

from stego_core import figures, results

store = results.load_results(root)
table = figures.dimension_table(store, protocol=protocol)
curves = figures.pca_variance_curves(root)
datasets = list(dict.fromkeys(table["dataset"]))
quoted = dataset if dataset in datasets else (datasets[0] if datasets else None)
glue("res_n_runs", int(store["run_id"].nunique()), display=False)
glue("res_datasets", Markdown(", ".join(f"`{d}`" for d in datasets) or "none yet"), display=False)
glue("res_n_curves", len(curves), display=False)
Markdown("The results store is empty: run the dimension study (`stego-study run 03_dimension_study`) first."
         if table.empty else f"{store['run_id'].nunique()} runs on {len(datasets)} dataset(s).")

# %% [markdown]
# The store holds {glue:text}`res_n_runs` runs; datasets with dimension-study results: {glue:md}`res_datasets`.
#
# ## Figure 3: explained variance of PCA
#
# Cumulative share of variance explained by the first components of the PCA fitted on each feature source's
# standardised training tokens, against the fraction of the C components kept ({glue:text}`res_n_curves`
# fitted PCA(s) found). The paper shows the three datasets' DINO features, whose variance spreads over many
# components: no small D keeps most of it.

# %%
figures.variance_chart(figures.variance_frame(curves)) if len(curves) else Markdown("No PCA fit found yet.")

# %% [markdown]
# ## Figure 4: probe mIoU against the code dimension
#
# Rows: linear probe, cluster probe; one column per dataset; x: the code dimension D (log scale). STEGO's trained
# head against the training-free projections PCA and RP, and the DINO baseline (raw features: dashed line, its
# point at D = C). Click legend entries to highlight methods; the slider reads off every series at one D.

# %%
figures.dimension_chart(table, metrics=("mIoU",), methods=main_methods, spread=spread, slider=slider) \
    if len(table) else Markdown("No results yet.")

# %%
findings = figures.dimension_findings(table, quoted) if quoted is not None else {}
glue("res_dataset", Markdown(f"`{quoted}`" if quoted else "(none)"), display=False)
for key in ("stego_cluster_min", "pca_cluster_min", "rp_cluster_min", "stego_minus_pca_cluster_min",
            "pca_linear_full", "dino_linear", "pca_linear_full_minus_dino", "dino_cluster"):
    glue(f"res_{key}", float(findings.get(key, np.nan)), display=False)
for key in ("min_dim", "pca_full_dim", "stego_beats_pca_cluster", "n_dims_pca", "stego_beats_rp_cluster",
            "n_dims_rp"):
    glue(f"res_{key}", findings.get(key) if findings.get(key) is not None else "n/a", display=False)
figures.pivot_table(table[table["dataset"] == quoted], "mIoU") if quoted else Markdown("No results yet.")

# %% [markdown]
# **Findings on {glue:md}`res_dataset`.** At the smallest dimension (D = {glue:text}`res_min_dim`) the cluster
# probe reaches {glue:text}`res_stego_cluster_min:.1f` mIoU on STEGO's code, {glue:text}`res_pca_cluster_min:.1f`
# on PCA's and {glue:text}`res_rp_cluster_min:.1f` on RP's (STEGO − PCA:
# {glue:text}`res_stego_minus_pca_cluster_min:.1f` points). STEGO's cluster mIoU is above PCA's at
# {glue:text}`res_stego_beats_pca_cluster` of {glue:text}`res_n_dims_pca` dimensions and above RP's at
# {glue:text}`res_stego_beats_rp_cluster` of {glue:text}`res_n_dims_rp`; the paper found it above both at every
# dimension on all three datasets. With the linear probe, PCA at D = {glue:text}`res_pca_full_dim` reaches
# {glue:text}`res_pca_linear_full:.1f` mIoU against {glue:text}`res_dino_linear:.1f` for the raw features
# (difference {glue:text}`res_pca_linear_full_minus_dino:.1f`), the paper's observation that the projections keep
# the information a supervised probe needs. The raw features' cluster mIoU is {glue:text}`res_dino_cluster:.1f`.
#
# ## Appendix: pixel accuracy
#
# The same runs, scored by pixel accuracy.

# %%
figures.dimension_chart(table, metrics=("Accuracy",), methods=main_methods, spread=spread, slider=slider) \
    if len(table) else Markdown("No results yet.")

# %% [markdown]
# ## Appendix: h-NNE
#
# The paper tried the non-linear h-NNE projection on Cityscapes only; here it is shown wherever it ran, against
# the other methods, for both probes and both metrics.

# %%
hnne_datasets = sorted(set(table.loc[table["method"] == "hnne", "dataset"]))
glue("res_hnne_datasets", Markdown(", ".join(f"`{d}`" for d in hnne_datasets) or "none"), display=False)
figures.dimension_chart(table[table["dataset"] == hnne_datasets[0]], metrics=("mIoU", "Accuracy"), spread=spread,
                        slider=slider) if hnne_datasets else Markdown("No h-NNE runs in the results store.")

# %% [markdown]
# h-NNE results found for: {glue:md}`res_hnne_datasets` (the chart shows the first).
#
# ## All numbers
#
# Every dataset, method and dimension of the store, with standard deviations where there are several seeds.

# %%
figures.pivot_table(table) if len(table) else Markdown("No results yet.")
