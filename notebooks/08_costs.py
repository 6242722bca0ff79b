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
datasets = ["cocostuff27", "cityscapes", "potsdam"]  # which of the paper's datasets the tables cover
precision = "fp32"  # backbone precision of the estimate: "fp32" (what 01_features does, as the original) or "bf16" (fused attention, if you switch extraction to amp)
source = "cache"  # where training reads features: "cache" (the feature store, this project's way) or "live" (backbone every step, as the original)
protocol = "original"  # decides how often training validates: "original" (PyTorch Lightning 1.x, per epoch) or "corrected"
seeds = 1  # seeds per configuration in the sweep estimate; the study used one
fused = True  # the sweep estimate for a fused sweep (run_sweep's default: each seed's STEGO heads, and its probe-only runs, read the training batches once); False: every run reads them itself, as independent runs do
backbones = None  # backbones of the per-backbone table (names of stego_core.costs.BACKBONE_SHAPES); None takes each dataset's paper backbone and the DINOv2 / DINOv3 of its extended-study presets

# %% [markdown]
# # What the paper-scale runs cost
#
# Before downloading a dataset it helps to know how much disk and GPU time each stage needs. The numbers below are
# not measured on your machine: they come from a small cost model (`stego_core.costs`) whose assumptions are
# spelled out in its module documentation and summarised here:
#
# - images per split as the reference lists them (COCO-Stuff-27 and Cityscapes train on five crops per image,
#   Potsdam uncropped);
# - a feature store item holds the backbone's patch tokens in float16 (28 × 28 tokens at 224 px with patch 8,
#   40 × 40 at the 320 px evaluation size) plus the image and its label at the same size;
# - GPU times are scaled from one set of measurements on an NVIDIA H200 (ViT-B/8 at 224 px: 255 images/s in
#   the original's fp32 style, 2,112 images/s in bf16 with fused attention; a training step with batch 32 takes
#   270 ms with live fp32 features, 48 ms live in bf16 and 14 ms on cached features), by the ratio of the
#   transformer's FLOPs for other backbones and image sizes and linearly in the batch size. The default precision
#   is the feature chapter's: it extracts in fp32, as the original did (the fp32 rate was measured with unfused
#   attention, 01_features uses fused attention, so its fp32 times are upper bounds);
# - training validates over the whole validation split as often as the protocol's schedule says (PyTorch
#   Lightning 1.x under "original": every 100 batches of each epoch), each validated image costing about one image
#   of a cached training step (an assumption);
# - every training step reads its batch and the kNN partners from the feature store, and every validation the
#   whole validation store, at 2 GB/s (a local NVMe disk; a store small enough for the page cache is read faster);
#   reading and computing take turns, so the wall time adds them.

# %%
import pandas as pd
from myst_nb import glue

from stego_core import costs
from stego_core.book import viz

table = costs.cost_table(datasets, precision=precision, source=source, protocol=protocol)
glue("precision", precision, display=False)
glue("source", source, display=False)
glue("biggest_store_gb", float(table["feature store GB"].max()), display=False)
glue("biggest_store_dataset", str(table.loc[table["feature store GB"].idxmax(), "dataset"]), display=False)
glue("max_gpu_min", float(table["GPU total min"].max()), display=False)
glue("max_wall_min", float(table["wall total min"].max()), display=False)
glue("max_reads_gb", float(table["disk reads GB"].max()), display=False)
table.round(2)

# %% [markdown]
# With {glue:text}`precision` backbone passes and training on features from the {glue:text}`source`, one
# paper run of any dataset needs at most {glue:text}`max_gpu_min:.0f` GPU minutes, validations included; reading
# the features back from disk (up to {glue:text}`max_reads_gb:.0f` GB per run) brings the wall time to at most
# {glue:text}`max_wall_min:.0f` minutes. The disk is the real cost: the feature store of
# {glue:text}`biggest_store_dataset` alone takes {glue:text}`biggest_store_gb:.0f` GB. (At thousands of images per
# second the GPU outruns image decoding: expect the caching stage to be limited by CPU cores reading JPEGs unless
# the loader has many workers.)

# %%
stages = table.melt(id_vars=["dataset"], value_vars=["caching GPU min", "training GPU min", "validation GPU min",
                                                     "evaluation GPU min", "disk read min"],
                    var_name="stage", value_name="minutes")
stages["stage"] = stages["stage"].str.replace(" GPU min", "").str.replace(" min", "")
viz.bar_chart(stages.round(3), "dataset", "minutes", "stage", title="minutes per stage (click the legend)")

# %% [markdown]
# ## Precision and feature source
#
# The same estimate for the four ways of running: the original style (fp32, features computed live at every
# step, no store) against bf16 and against a feature store. Live training needs no store (its disk is the
# download and the five-crop tree) but pays two backbone passes per step and one pass to find the neighbours.

# %%
variants = []
for p in costs.PRECISIONS:
    for s in costs.FEATURE_SOURCES:
        t = costs.cost_table(datasets, precision=p, source=s, protocol=protocol)
        variants.append(t.assign(precision=p, source=s)[["dataset", "precision", "source", "disk total GB",
                                                            "GPU total min", "wall total min"]])
variants = pd.concat(variants, ignore_index=True)
variants.round(2)

# %% [markdown]
# ## The whole dimension study
#
# The study trains every method (STEGO, the DINO baseline, PCA, random projections and, on Cityscapes, h-NNE) at
# every code dimension of its grid (`stego_core.sweep.study_grid`). On cached features the store is built once and
# each run then costs its steps, its validations and its disk reads; baseline runs are charged the STEGO step time,
# an upper bound. In a fused sweep (parameter `fused`) the runs of one seed that share the store read each training
# batch once per group (column `train_reads`); their GPU time per step is still charged per run, since the fused
# step has been measured only on CPU so far (`benchmarks/run.py --only sweep`).

# %%
sweep = pd.DataFrame([costs.study_hours(d, precision=precision, seeds=seeds, protocol=protocol, fused=fused)
                      for d in datasets])
glue("sweep_runs", int(sweep["runs"].sum()), display=False)
glue("sweep_hours", float(sweep["total_h"].sum()), display=False)
sweep.round(2)

# %% [markdown]
# All {glue:text}`sweep_runs` runs together take about {glue:text}`sweep_hours:.1f` hours of a GPU machine under
# these assumptions, disk reads included (DenseCRF for the final evaluation runs on CPU cores and is not
# included).

# %% [markdown]
# ## Newer backbones (beyond the paper)
#
# The extended study repeats the paper's runs with DINOv2 and DINOv3 backbones (the profiles
# `cocostuff27_dinov2`, `potsdam_dinov3_sat`, …; the Results page "Beyond the paper: newer backbones"). None of
# them was measured: their images per second and GPU times below are the ViT-B/8 measurements scaled by each
# backbone's FLOPs (its width C, its blocks, and its tokens: patches of 14 or 16 px plus the CLS and register
# tokens), so they are estimates that assume the same efficiency per FLOP (column `basis`). The feature store
# follows from the token grid and the width. A patch-14 backbone validates at 322 px, the multiple of 14 nearest 320.

# %%
per_backbone = costs.backbone_table(datasets, backbones, precision=precision, source=source)
extended = per_backbone[(per_backbone["preset"] != "") & (per_backbone["preset"] != per_backbone["dataset"])]
glue("extended_sweep_hours", float(extended["sweep GPU h"].sum()), display=False)
glue("extended_presets", len(extended), display=False)
per_backbone.round(2)

# %% [markdown]
# The {glue:text}`extended_presets` extended-study sweeps of these datasets would take about
# {glue:text}`extended_sweep_hours:.1f` GPU hours together under these assumptions (an estimate, as above).
