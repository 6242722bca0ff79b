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
dataset = "mosaic"  # which dataset: "mosaic" (offline demo, generated), "cocostuff27", "cityscapes", "potsdam", "directory"
backbone = "efficientnet_lite0"  # frozen feature extractor: "efficientnet_lite0" (offline demo) or "dino_vits8", "dino_vits16", "dino_vitb8", "dino_vitb16" (the paper); beyond the paper "dinov2_vits14", "dinov2_vitb14" (+ "_reg"), "dinov3_vits16", "dinov3_vitb16", "dinov3_vitl16", "dinov3_vitl16_sat" (res a multiple of their patch, 14 or 16)
weights = None  # backbone weights: None for the default (EfficientNet: bundled; DINO: the official file STEGO used, downloaded once; DINOv2/v3: the timm hub), "random" (tests only) or a path to a weights file
res = 224  # side of the square training images in pixels; 224 as in the paper
crop = "center"  # training crop: "center" (resize the short side, then crop), "none" (squash) or "five" (the prepared five-crop tree)
val_res = None  # side of the validation images; None keeps res (the demo), the paper validates at 320
val_crop = None  # validation crop; None keeps crop (the demo), the paper validates on the uncropped split ("center")
dataset_options = {}  # extra loader options, e.g. {"n_images": 40} for mosaic; see stego_core.data
batch_size = 16  # images per backbone call; raise it on a GPU
device = "cpu"  # cpu, cuda, cuda:1 …; training and feature extraction run there
k = 30  # neighbours per image in the kNN table; STEGO draws its positive pairs from the top 7 of 30
protocol = "original"  # "original" (the paper's code, incl. channel dropout in the kNN descriptors) or "corrected"
n_queries = 3  # how many query images the nearest-neighbour examples show
n_neighbors_shown = 4  # how many neighbours are shown per query
n_pca = 6  # how many images the PCA colouring of the features shows
seed = 0  # which images the examples pick (random but reproducible)
root = None  # artifacts folder; None means $STEGO_ARTIFACTS, else ./artifacts
progress = True  # show progress bars

# %% [markdown]
# # Features and neighbours
#
# STEGO trains only a small head on top of a **frozen** backbone, so the backbone's patch features can be computed
# once and kept on disk. This chapter builds that feature store for the train and val splits, then the table of
# each training image's nearest neighbours in feature space, from which STEGO draws the "positive" image pairs
# whose feature correspondences it distils (only the training split needs one: validation draws no pairs). Both
# are keyed artifacts: a second run with the same parameters reads them back instead of recomputing them.

# %%
import time

import numpy as np
import pandas as pd
from IPython.display import Markdown
from myst_nb import glue

from stego_core import cache, knn, training
from stego_core.book import viz

timings = []
stores = {}
sizes = {"train": (res, crop), "val": (val_res or res, val_crop or crop)}  # (res, crop) of each split's store
for split, (split_res, split_crop) in sizes.items():
    t0 = time.perf_counter()
    stores[split] = cache.cache_features(dataset, split, backbone, res=split_res, crop=split_crop, weights=weights,
                                         dataset_options=dataset_options, root=root, batch_size=batch_size,
                                         device=device, progress=progress)
    t1 = time.perf_counter()
    n = len(stores[split])
    timings.append({"split": split, "stage": "features", "items": n, "seconds": t1 - t0, "items_per_s": n / (t1 - t0)})
train = stores["train"]
t1 = time.perf_counter()
table = knn.build_knn(train, k=k, protocol=protocol, seed=seed, progress=progress)  # partners come from train only
t2 = time.perf_counter()
timings.append({"split": "train", "stage": "kNN table", "items": len(train), "seconds": t2 - t1,
                "items_per_s": len(train) / (t2 - t1)})
timings = pd.DataFrame(timings)
glue("n_train", len(stores["train"]), display=False)
glue("n_val", len(stores["val"]), display=False)
glue("dim", train.dim, display=False)
glue("grid", Markdown(f"{train.grid[0]} × {train.grid[1]}"), display=False)
glue("train_res", train.res, display=False)
glue("val_res", stores["val"].res, display=False)
glue("val_grid", Markdown(f"{stores['val'].grid[0]} × {stores['val'].grid[1]}"), display=False)
glue("k_eff", table.shape[1], display=False)
glue("stride", train.meta.get("stride") or "n/a", display=False)
glue("grid_text", f"{train.grid[0]} × {train.grid[1]}", display=False)
glue("backbone_name", backbone, display=False)
glue("dataset_name", dataset, display=False)
glue("weights_source", train.meta["weights_source"], display=False)
timings.round(3)

# %% [markdown]
# The store holds {glue:text}`n_train` training and {glue:text}`n_val` validation images; each training image
# ({glue:text}`train_res` px) becomes a {glue:md}`grid` grid of {glue:text}`dim`-dimensional patch features, each
# validation image ({glue:text}`val_res` px) a {glue:md}`val_grid` grid. The paper trains at 224 px and validates
# at 320 px; the head works on any grid, and validation upsamples its output to each label's size. The backbone's
# weights came from {glue:text}`weights_source`. (Timings near zero mean the artifact was already there and was
# read back.)

# %%
viz.bar_chart(timings, "stage", "seconds", "split", title="wall time per stage (s)")

# %% [markdown]
# ## What the features see
#
# A feature map has hundreds of channels; its first three principal components, shown as red, green and blue, give
# a picture of what the backbone separates. One PCA is fitted on all images shown, so equal colours mean similar
# features across images. Regions of one class should share a colour if the features are to be clustered.

# %%
rng = np.random.default_rng(seed)
shown = np.sort(rng.choice(len(train), size=min(n_pca, len(train)), replace=False))
batch = train.read(shown)
colours = viz.pca_rgb(batch["feats"], size=train.res)
labelled = [viz.overlay(im, lab.numpy(), train.palette, 0.55) for im, lab in zip(batch["image"], batch["label"])]
viz.show_images(
    [pic for triple in zip(batch["image"], labelled, colours) for pic in triple],
    [title for i in shown for title in (f"#{i}", f"#{i} labels", f"#{i} features (PCA)")],
    width=140,
)

# %% [markdown]
# ## Nearest neighbours
#
# Each row: a query image, then its nearest neighbours among the training images by cosine similarity of the
# spatially averaged features (column 0 of the table is the image itself and is skipped). STEGO pairs each image
# with one of its top neighbours and learns to agree with the backbone on which patches of the two images
# correspond; the pairs are only useful if the neighbours share classes with the query.

# %%
queries = np.sort(rng.choice(len(train), size=min(n_queries, len(train)), replace=False))
nns = table[queries, 1: 1 + n_neighbors_shown].numpy()
rows = [np.concatenate([[q], row]) for q, row in zip(queries, nns)]
pics = train.read(np.concatenate(rows))
viz.show_images(
    [viz.overlay(pics["image"][i], pics["label"][i].numpy(), train.palette, 0.3) for i in range(len(pics["image"]))],
    [("query #" if j == 0 else f"neighbour {j}: #") + str(idx) for row in rows for j, idx in enumerate(row)],
    width=120,
    ncols=len(rows[0]),
)

# %% [markdown]
# ## Which pairs share a class, and where the loss's shifts sit
#
# STEGO's loss compares three kinds of image pairs: an image with itself, with one of its 7 nearest neighbours,
# and with a random image. For each pair it takes the feature correlation $F$ of every point of one image with
# every point of the other (centred per anchor point when the preset says `pointwise`, as the loss does) and
# pulls the codes of a point pair together where $F$ is above that pair type's shift $b$, and pushes them apart
# below it. So the shifts are thresholds on *this backbone's* $F$: values tuned on DINO's features for CocoStuff
# do not carry over to another backbone by themselves. Below, $F$ of randomly sampled point pairs of each type,
# with the shifts of the preset made for this dataset and backbone marked as dashed lines, and how often the two
# points of a pair show the same class.

# %%
preset_name = training.preset_for(dataset, backbone)
shifts = training.preset_shifts(preset_name) if preset_name else None
pointwise_F = training.make_config(preset_name).pointwise if preset_name else True
pairs = knn.pair_statistics(train, table, seed=seed, pointwise=pointwise_F)
pair_table = pairs.groupby("pair", sort=False).agg(
    same_class=("same_class", "mean"), F_mean=("F", "mean"), F_10=("F", lambda v: v.quantile(0.1)),
    F_90=("F", lambda v: v.quantile(0.9)), pairs=("F", "size"))
if shifts:
    pair_table["shift"] = pd.Series(shifts)
    pair_table["share F > shift"] = [float((pairs.loc[pairs["pair"] == p, "F"] > shifts[p]).mean())
                                     for p in pair_table.index]
for name in pair_table.index:
    glue(f"same_{name}", float(100 * pair_table.loc[name, "same_class"]), display=False)
    glue(f"F_mean_{name}", float(pair_table.loc[name, "F_mean"]), display=False)
glue("pair_preset", preset_name or "none", display=False)
glue("pair_F_chart", viz.pair_correlation_chart(pairs, shifts, title=f"feature correlation F per pair type "
                                                f"({backbone}, {dataset})"), display=True)
pair_table.rename(columns={"same_class": "share same class", "F_mean": "mean F", "F_10": "F 10 %",
                           "F_90": "F 90 %"}).round(3)

# %% [markdown]
# The two points of a kNN pair show the same class in {glue:text}`same_knn:.0f` % of the sampled pairs, those of a
# random pair in {glue:text}`same_random:.0f` % (an image with itself: {glue:text}`same_self:.0f` %). Only this
# difference lets the kNN term teach the head something the random term does not. The dashed lines are the
# shifts of the {glue:text}`pair_preset` preset; the table gives the share of each pair type's $F$ above its
# shift, that is, the share of pairs the loss pulls together.
