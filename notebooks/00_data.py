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
split = "train"  # which split to tour: "train" or "val"
res = 224  # side of the square centre crop in pixels (what the backbone sees); the paper uses 224 for training
crop = "center"  # "center" (resize the short side, then crop) or "none" (squash to res x res)
dataset_options = {}  # extra loader options, e.g. {"n_images": 40, "seed": 1} for mosaic; see stego_core.data
n_examples = 8  # how many example images to show with their label overlays
n_stats = 0  # how many images the class statistics count; 0 means the whole split (lower it on a big dataset)
alpha = 0.55  # label overlay opacity: 0 shows only the image, 1 only the labels
seed = 0  # which examples are picked (random but reproducible); change it to see other images
progress = True  # show progress bars

# %% [markdown]
# # The data
#
# STEGO never sees a label while it learns; labels are only used to *evaluate* it. This chapter shows what the
# images and their ground-truth labels look like and how often each class occurs, because the class balance decides
# what an unsupervised clustering can hope to find.

# %%
import numpy as np
from IPython.display import Markdown
from myst_nb import glue

from stego_core import data
from stego_core.book import viz

ds = data.load_dataset(dataset, split, res=res, crop=crop, **dataset_options)
rng = np.random.default_rng(seed)
picked = np.sort(rng.choice(len(ds), size=min(n_examples, len(ds)), replace=False))
items = [ds[int(i)] for i in picked]
images = [viz.to_image(item["img"]) for item in items]
glue("n_items", len(ds), display=False)
glue("n_classes", ds.n_classes, display=False)
glue("where", Markdown(f"The *{split}* split of `{dataset}`"), display=False)
ds

# %% [markdown]
# {glue:md}`where` holds {glue:text}`n_items` images labelled with
# {glue:text}`n_classes` classes. Below, a few of them: each image, then the same image with its labels painted
# over it (black = no label).

# %%
viz.label_legend(ds.class_names, ds.palette)

# %%
overlays = [viz.overlay(im, item["label"].numpy(), ds.palette, alpha) for im, item in zip(images, items)]
viz.show_images(
    [pic for pair in zip(images, overlays) for pic in pair],
    [title for i in picked for title in (f"#{i}", f"#{i} labels")],
    width=150,
)

# %% [markdown]
# ## How often each class occurs
#
# The share of labelled pixels that belong to each class (hover a bar for the counts; click a bar to highlight it).
# A class that covers few pixels is easy for a clustering to merge into a neighbour, and mIoU weighs it as much as
# the largest class.

# %%
stats = viz.class_statistics(ds, n_stats or None, progress=progress)
counted = stats[stats["class_id"] >= 0]
glue("largest_class", Markdown(str(counted.loc[counted["fraction"].idxmax(), "class"])), display=False)
glue("largest_share", float(100 * counted["fraction"].max()), display=False)
glue("smallest_class", Markdown(str(counted.loc[counted["fraction"].idxmin(), "class"])), display=False)
glue("smallest_share", float(100 * counted["fraction"].min()), display=False)
viz.class_histogram_chart(counted, title=f"{dataset} / {split}: share of labelled pixels per class")

# %% [markdown]
# The largest class, *{glue:md}`largest_class`*, covers {glue:text}`largest_share:.1f` % of the labelled pixels;
# the smallest, *{glue:md}`smallest_class`*, {glue:text}`smallest_share:.1f` %.

# %%
stats.drop(columns=["color"])
