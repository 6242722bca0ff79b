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
dataset = "mosaic"  # which dataset: "mosaic" (offline demo), "cocostuff27", "cityscapes", "potsdam", "directory"
backbone = "efficientnet_lite0"  # backbone of the trained runs: "efficientnet_lite0" (demo) or a "dino_vit*" name
weights = None  # backbone weights: None for the default, "random" (tests only) or a weights file
res = 224  # image size of the training feature cache (chapter 01)
crop = "center"  # crop of the training feature cache (chapter 01)
val_res = None  # image size of the validation cache shown here; None keeps res (the demo), the paper validates at 320
val_crop = None  # crop of the validation cache; None keeps crop (the demo), the paper: "center" (uncropped split)
dataset_options = {}  # extra loader options of the caches, e.g. {"n_images": 40} for mosaic
preset = "demo"  # training preset of the runs (stego_core.training.PRESETS); the dataset and backbone are this chapter's
methods = ["stego", "pca", "rp", "hnne", "dino"]  # methods offered: "stego", "pca", "rp", "hnne", "dino" (raw features); each must have been trained by chapter 02 or 03
dims = [6, 24, 96]  # code dimensions offered for every method but "dino" (which keeps all C channels)
seed = 0  # seed of the runs shown
overrides = {}  # TrainConfig fields of the runs (e.g. {"steps": 4} in the tests); {} takes any finished run of the preset
train_missing = False  # train a run that chapters 02/03 did not make (True in the demo and smoke profiles only); False stops with the command that makes it
protocol = "original"  # "original" (reference CRF bytes and metrics) or "corrected"
n_images = 4  # validation images precomputed for the explorer (each adds methods x dims x 2 CRF x 2 probes maps)
first_image = 0  # index of the first validation image shown; the next ones follow
workers = 2  # processes for DenseCRF
size = 200  # pixel size of each panel in the explorer
live = True  # also build the live panel (upload, recompute): needs a running kernel; the book turns it off
device = "cpu"  # cpu, cuda, cuda:1 …; the models (and missing runs, with train_missing) run there
root = None  # artifacts folder; None means $STEGO_ARTIFACTS, else ./artifacts
progress = True  # show progress bars

# %% [markdown]
# # Explore the segmentations
#
# Pick an image, a method, a code dimension, a probe and whether DenseCRF refines the result, and compare the
# prediction with the ground truth. Every combination was computed when this page was built, so the controls work
# in the static book without a running Python kernel.
#
# - **STEGO**: the trained head (correspondence distillation) compresses the backbone features to *d* channels;
# - **PCA**, **RP** (Gaussian random projection), **h-NNE**: fixed projections of the features to *d* channels;
# - **DINO**: the raw backbone features (on the demo: EfficientNet-Lite0's), the study's baseline.
#
# Each method's probes were trained exactly alike. The **cluster** probe is the unsupervised result (its clusters
# are matched to classes once, on the whole validation split); the **linear** probe is a supervised read-out that
# tells how much class information the code still holds.

# %%
from IPython.display import Markdown, display
from myst_nb import glue

from stego_core import backbones, cache, explorer, runs
from stego_core.book import widgets

train_store = cache.cache_features(dataset, "train", backbone, res=res, crop=crop, weights=weights,
                                   dataset_options=dataset_options, root=root, build=False)
val_store = cache.cache_features(dataset, "val", backbone, res=val_res or res, crop=val_crop or crop,
                                 weights=weights, dataset_options=dataset_options, root=root, build=False)
models = runs.require_runs(preset, runs.method_dims(methods, dims, train_store.dim), train_store=train_store,
                           val_store=val_store, seed=seed, protocol=protocol, root=root, device=device,
                           train_missing=train_missing, progress=progress, **overrides)
shown = list(range(first_image, min(first_image + n_images, len(val_store))))
data = explorer.precompute(models, val_store, shown, workers=workers, protocol=protocol, progress=progress)
glue("n_models", len(models), display=False)
glue("n_maps", len(data.predictions), display=False)
glue("n_shown", len(shown), display=False)

# %%
widgets.explorer_chart(data, size=size)

# %% [markdown]
# The explorer holds {glue:text}`n_maps` prediction maps ({glue:text}`n_models` trained models ×
# {glue:text}`n_shown` images × CRF on/off × two probes). The caption line names the setting and its mIoU on the
# image shown and on the whole validation split. Things to try: lower the code dimension and compare the methods'
# maps with the table below (on the demo, lower dimensions do not always hurt PCA: k-means is easier there); switch
# on the CRF and see region borders snap to texture edges; set the opacity to 1
# to see the bare label maps.
#
# ## How good is each setting
#
# Validation metrics (all images, no CRF) of every model in the explorer:

# %%
table = data.metrics.pivot_table(index=["label"], columns="probe", values=["mIoU", "Accuracy"], sort=False)
table.columns = [f"{probe} {metric}" for metric, probe in table.columns]
table[sorted(table.columns)].round(1)

# %% [markdown]
# ## In a live notebook
#
# With a running kernel (open this notebook in Jupyter, keep `live = True`) the panel below recomputes in Python:
# choose any model, a probe and the CRF for one of the images above, or upload an image of your own (it is
# resized and centre-cropped like the data). In the static book the panel is switched off, because nothing could
# answer its controls.

# %%
if live:
    display(widgets.live_explorer(data, backbones.load_backbone(backbone, weights, device=device), res=val_store.res,
                                   workers=1))
else:
    display(Markdown("*(live panel off: `live = False`)*"))
