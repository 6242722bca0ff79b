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
preset = "demo"  # training preset (stego_core.training.PRESETS): "demo" (mosaic + EfficientNet-Lite0, offline) or the paper's "cocostuff27", "cityscapes", "potsdam"
dataset = None  # dataset of the feature stores; None keeps the preset's (the demo's is "mosaic"); change it only together with a matching preset
backbone = None  # backbone of the feature stores; None keeps the preset's ("efficientnet_lite0" for the demo, DINO ViT-B/8 or S/8 for the paper)
weights = None  # backbone weights when the feature stores must be built: None for the default, or a path to a weights file
res = 224  # image side of the cached training features (as in 01_features, so its stores are reused)
crop = "center"  # crop of the cached training features: "center", "none" or "five" (as in 01_features)
val_res = None  # image side of the validation features; None keeps res (the demo), the paper validates at 320
val_crop = None  # crop of the validation features; None keeps crop (the demo), the paper: "center" (uncropped split)
dataset_options = {}  # extra loader options of the stores (as in 01_features), e.g. {"n_images": 40} for mosaic
methods = ["stego", "dino", "pca", "rp", "hnne"]  # which methods to sweep: STEGO head, DINO baseline (raw features), PCA, random projection, h-NNE (the paper: h-NNE on Cityscapes only)
dims = None  # code dimensions D; None takes the study's list for the preset (stego_core.sweep.STUDY_DIMS) plus the backbone's full dimension C
seeds = [0]  # one run per seed and cell; the paper used one seed, the demo's numbers need 3+ seeds before small differences mean anything
steps = None  # training steps per run; None keeps the preset's (demo 800, paper 7000 / 5000); lower it for a quick look
n_fit_images = None  # training images (a seeded random sample) whose tokens fit PCA / RP / h-NNE; None keeps the preset's (the paper: 5000)
hnne_tokens = None  # h-NNE fits on a uniform sample of this many of those tokens; None keeps the preset's (the paper: 1e6; the demo: 12000, a quarter of its tokens as in the paper)
protocol = "original"  # "original" (the study's code, incl. per-batch standardisation inside PCA/RP/h-NNE) or "corrected"
overrides = {}  # further TrainConfig fields for every run, e.g. {"batch_size": 8} or {"n_neighbors": 4} on tiny data
spread = "band"  # how Figure 4 shows the spread over seeds: "band", "errorbar" or "none"
device = "cpu"  # cpu, cuda, cuda:1 …; training and feature extraction run there
fused = True  # train the runs of one seed that share the stores in one pass over the batches (each run keeps its own weights, generators and checkpoints and ends as it would alone, up to float rounding in PCA/RP; see the method page on baselines); False trains every run on its own
workers = 1  # runs (fused: groups of runs) trained at once, each in its own process sharing the CPU cores (the demo: 2 on 2 cores, about 1.5x faster); 1 runs them one after the other here
root = None  # artifacts folder; None means $STEGO_ARTIFACTS, else ./artifacts
progress = True  # show progress bars (one per run when True)
logger = "none"  # live logs of every run of the sweep: "none", or "tensorboard" (event files in each run's folder; watch the whole sweep with tensorboard --logdir artifacts/runs; needs pip install 'stego-study[tensorboard]')

# %% [markdown]
# # The dimension study
#
# STEGO's head maps the backbone's C-dimensional patch features to a code of D dimensions (D = 70 to 100 in the
# released models) and is trained so that the code's correlations sharpen the backbone's. How much of what the
# cluster probe gets from that code is due to the *training*, and how much just to having fewer dimensions?
# Koenig et al. (2023) answer this by replacing the head with training-free projections to the same D — principal
# component analysis (**PCA**), a Gaussian random projection (**RP**) and the non-linear **h-NNE** — and by a
# baseline without any head (**DINO baseline**: the raw backbone features, D = C). Every method gets the identical
# linear and cluster probes, trained with the identical schedule on the same cached features, and the best
# validation step (by cluster mIoU) of each run is reported. The paper reads STEGO as a semantics-preserving
# dimensionality reduction: in cluster mIoU its code lies above PCA and RP on COCO-Stuff and Cityscapes, while on
# Potsdam retrained STEGO falls as D grows and PCA catches up at the largest dimensions; in linear-probe mIoU PCA
# approaches the raw features at large D — the information is there, but a linear probe needs labels to find it.
# The findings page ({doc}`../findings`) puts the published counts and this build's paired differences side by
# side.
#
# This chapter runs that sweep (every method × dimension × seed), skipping runs that already finished, so an
# interrupted sweep simply resumes when the chapter is run again.

# %%
import time

import numpy as np
from IPython.display import Markdown
from myst_nb import glue

from stego_core import cache, config, papers, projections, sweep, training
from stego_core.book import figures

cache_options = {split: dict(res=split_res, crop=split_crop, weights=weights, dataset_options=dataset_options,
                             device=device)
                 for split, split_res, split_crop in (("train", res, crop), ("val", val_res or res, val_crop or crop))}
run_overrides = {k: v for k, v in dict(dataset=dataset, backbone=backbone, steps=steps,
                                       n_fit_images=n_fit_images, hnne_tokens=hnne_tokens).items()
                 if v is not None}
base_config = training.make_config(preset, **{**overrides, **run_overrides})  # fails early on a bad override
stores = {split: cache.cache_features(base_config.dataset, split, base_config.backbone, root=root,
                                      progress=progress, **cache_options[split]) for split in ("train", "val")}
C = stores["train"].dim
dims_used = sorted(set(sweep.STUDY_DIMS.get(preset, ())) | {C}) if dims is None else list(dims)
grid = sweep.SweepGrid(presets=[preset], methods=methods, dims=dims_used, seeds=seeds, protocol=protocol,
                       overrides={**overrides, **run_overrides}, train_cache=cache_options["train"],
                       val_cache=cache_options["val"])
specs = grid.runs()
# PCA and h-NNE give at most C components: such cells are skipped (RP and STEGO may map up to any D)
too_large = [s.name for s in specs if s.method in ("pca", "hnne") and s.code_dim > C]
runnable = [s for s in specs if s.name not in too_large]
glue("dim_C", C, display=False)
glue("dim_dims", Markdown(", ".join(str(d) for d in dims_used)), display=False)
glue("dim_n_runs", len(runnable), display=False)
glue("dim_skip_note", Markdown(
    f"Skipped because PCA and h-NNE have at most C = {C} components: {', '.join(too_large)}." if too_large
    else "No cell had to be skipped (PCA and h-NNE have at most C components, and every D here is at most C)."),
    display=False)

# %% [markdown]
# The sweep covers D ∈ {{glue:md}`dim_dims`} for the projections and the STEGO head, and the DINO baseline once per
# seed at the features' own dimension C = {glue:text}`dim_C`: {glue:text}`dim_n_runs` runs in all.
# {glue:md}`dim_skip_note`

# %% tags=["show-input"]
t0 = time.perf_counter()
swept = sweep.run_sweep(runnable, root=root, progress=progress, run_progress=False, fused=fused,
                        executor=sweep.local_executor(workers), logger=logger)
sweep_seconds = time.perf_counter() - t0
table = figures.dimension_table(swept.results, protocol=protocol)
glue("dim_n_ran", len(swept.ran), display=False)
glue("dim_n_skipped", len(swept.skipped), display=False)
glue("dim_minutes", sweep_seconds / 60, display=False)

# %% [markdown]
# This call trained {glue:text}`dim_n_ran` runs and found {glue:text}`dim_n_skipped` already finished
# ({glue:text}`dim_minutes:.1f` minutes).
#
# ## How much variance do the first components hold? (Figure 3)
#
# PCA keeps the D directions of largest variance of the standardised training tokens. The curve below is the
# cumulative share of variance explained against the fraction of the C components kept; the closer it hugs the
# top-left corner, the less a small D loses. The diamonds are the paper's values for its three datasets' DINO ViT
# features (read off its Figure 3).

# %% tags=["show-input"]
pca = projections.fit_projection("pca", 1, stores["train"], n_images=base_config.n_fit_images,
                                 root=config.artifacts_root(root), progress=progress)
ratio = pca.explained_variance_ratio_
source = f"{base_config.dataset} / {base_config.backbone}"
for key, value in figures.variance_findings({source: ratio}).items():
    glue(f"dim_var_{key}", value, display=False)
figures.variance_chart(figures.variance_frame({source: ratio}), reference=papers.figure3_points())

# %% [markdown]
# The first sixteenth of the components explains {glue:text}`dim_var_sixteenth:.1f`% of the variance, the first
# quarter {glue:text}`dim_var_quarter:.1f`%; {glue:text}`dim_var_k90` components reach 90%.
#
# ## Probe mIoU against the code dimension (Figure 4)
#
# Top row: the linear probe (supervised, it measures what a code *contains*); bottom row: the cluster probe
# (unsupervised, what STEGO is for). The dashed line is the DINO baseline (raw features, its point sits at D = C).
# On one of the paper's datasets its published curves are added as thin dashed lines ("(paper)", read off its
# Figure 4). Click a legend entry to highlight a method (shift-click for several); move the slider to read every
# method's value at one dimension; hover a point for its details.

# %%
figures.dimension_chart(table, metrics=("mIoU",), spread=spread, reference=figures.paper_dimension_table())

# %%
findings = figures.dimension_findings(table) if len(table) else {}
for key in ("stego_cluster_min", "pca_cluster_min", "rp_cluster_min", "stego_minus_pca_cluster_min",
            "pca_linear_full", "dino_linear", "dino_cluster", "pca_linear_full_minus_dino", "stego_cluster_best"):
    glue(f"dim_{key}", float(findings.get(key, np.nan)), display=False)
for key in ("min_dim", "pca_full_dim", "stego_cluster_best_dim", "stego_beats_pca_cluster", "n_dims_pca",
            "stego_beats_rp_cluster", "n_dims_rp"):
    glue(f"dim_{key}", findings.get(key) if findings.get(key) is not None else "n/a", display=False)
figures.pivot_table(table, "mIoU")

# %% [markdown]
# What this run shows, against the paper's findings:
#
# - **Cluster probe.** At the smallest dimension (D = {glue:text}`dim_min_dim`) STEGO reaches
#   {glue:text}`dim_stego_cluster_min:.1f` cluster mIoU, PCA {glue:text}`dim_pca_cluster_min:.1f` and RP
#   {glue:text}`dim_rp_cluster_min:.1f` (STEGO − PCA = {glue:text}`dim_stego_minus_pca_cluster_min:.1f` points).
#   STEGO is ahead of PCA at {glue:text}`dim_stego_beats_pca_cluster` of {glue:text}`dim_n_dims_pca` dimensions
#   and ahead of RP at {glue:text}`dim_stego_beats_rp_cluster` of {glue:text}`dim_n_dims_rp` (the paper: at all of
#   them). Its best cluster mIoU, {glue:text}`dim_stego_cluster_best:.1f`, is at D =
#   {glue:text}`dim_stego_cluster_best_dim`; the raw features give {glue:text}`dim_dino_cluster:.1f`.
# - **Linear probe.** PCA at its largest dimension (D = {glue:text}`dim_pca_full_dim`) reaches
#   {glue:text}`dim_pca_linear_full:.1f` linear mIoU against {glue:text}`dim_dino_linear:.1f` for the raw features
#   (difference {glue:text}`dim_pca_linear_full_minus_dino:.1f`): with all components PCA is only a rotation of
#   the standardised features, so the paper's finding that it recovers the raw level is expected there; the
#   question is how fast it gets there.
#
# With a single seed, differences of a few points between neighbouring dimensions are within the run-to-run noise;
# with several seeds (parameter `seeds`) the bands show ± one standard deviation over them.
#
# ## The same with pixel accuracy (appendix of the paper)

# %%
figures.dimension_chart(table, metrics=("Accuracy",), spread=spread)

# %% [markdown]
# ## All numbers
#
# One row per method and dimension: the scores at each run's selected step (highest validation cluster mIoU),
# averaged over seeds (with standard deviations when there are several).

# %%
figures.pivot_table(table)
