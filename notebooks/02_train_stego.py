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
dataset = "mosaic"  # dataset of the feature stores: "mosaic" (offline demo), "cocostuff27", "cityscapes", "potsdam", "directory"
backbone = "efficientnet_lite0"  # frozen backbone of the stores: "efficientnet_lite0" (offline demo) or a DINO ViT ("dino_vits8", "dino_vitb8", ...)
preset = "demo"  # hyper-parameter preset (stego_core.training.PRESETS): "demo", or the paper presets "cocostuff27", "cityscapes", "potsdam"
code_dim = None  # D, channels of the learned code; None takes the preset value (demo 24; the paper 70-100)
steps = None  # optimiser steps; None takes the preset value (demo 800; the paper 5000-7000); lower it for a quick look
batch_size = None  # images per step, each with one kNN partner; None takes the preset value (demo 8; the paper 16-32)
pos_intra_weight = None  # weight of the image-with-itself term; None takes the preset value
pos_inter_weight = None  # weight of the image-with-kNN-partner term; None takes the preset value
neg_inter_weight = None  # weight of the image-with-random-image term; None takes the preset value
pos_intra_shift = None  # shift b of the self term (higher: fewer pairs pulled together); None takes the preset value
pos_inter_shift = None  # shift b of the kNN term (higher: fewer pairs pulled together); None takes the preset value
neg_inter_shift = None  # shift b of the negative term (higher: more pairs pushed apart); None takes the preset value
pointwise = None  # centre the feature correlations of each anchor point (True/False); None takes the preset value
n_neighbors = None  # partners are drawn from kNN ranks 1..n_neighbors; None takes 7; must be below k of the kNN table
seed = 0  # seeds the head and probe initialisation, batch order, partners, dropout; also picks the examples shown
protocol = "original"  # "original" (quirks of the reference code) or "corrected" (kNN without dropout, clean loss features)
feature_source = "cache"  # "cache": the stored features (fast); "live": the backbone on the stored images every step
val_freq = None  # validate (and checkpoint) every this many steps (original protocol: batches within each epoch, as PyTorch Lightning 1.x); None takes the preset value (demo 100)
res = 224  # image side of the feature stores (must match 01_features)
crop = "center"  # crop of the feature stores (must match 01_features): "center", "none" or "five"
val_res = None  # image side of the validation store; None keeps res (the demo); the paper validates at 320
val_crop = None  # crop of the validation store; None keeps crop (the demo); the paper: "center" (uncropped split)
weights = None  # backbone weights of the feature stores (must match 01_features); None takes the default
dataset_options = {}  # extra loader options of the feature stores (must match 01_features), e.g. {"n_images": 40}
n_examples = 4  # how many validation images the example predictions show
device = "cpu"  # where the backbone (live features), head and probes run: "cpu" or "cuda"
alpha = 0.6  # opacity of the label / prediction overlays: 0 shows only the image, 1 only the labels
root = None  # artifacts folder; None means $STEGO_ARTIFACTS, else ./artifacts
progress = True  # show progress bars
logger = "none"  # live logs of the runs: "none", or "tensorboard" (losses, validation metrics and example predictions in <run folder>/tensorboard; watch with tensorboard --logdir artifacts/runs; needs pip install 'stego-study[tensorboard]')

# %% [markdown]
# # Training STEGO
#
# STEGO {cite:p}`hamilton2022stego` keeps the backbone frozen and trains only a small segmentation head that maps
# each patch feature $f \in \mathbb{R}^C$ to a code $g \in \mathbb{R}^D$ (a 1×1 convolution plus a two-layer 1×1
# MLP). The head learns to *distil the backbone's feature correspondences*: two patches whose features are similar
# should get similar codes, two dissimilar ones dissimilar codes. One training step:
#
# 1. take a batch of images and, for each, one partner drawn among its 7 nearest neighbours (the kNN table of the
#    previous chapter), and for the negative term a random other image of the batch;
# 2. sample 11 × 11 random points in each image and read off features and codes there;
# 3. for each pair of images $(a, a')$ — the image with itself, with its kNN partner, with a random image — compare
#    the cosine similarities of features, $F_{hwij} = \cos(f_{hw}, f'_{ij})$ (without gradient, centred per
#    anchor point), with those of codes, $C_{hwij} = \cos(g_{hw}, g'_{ij})$, through
#
#    $$\mathcal{L}_\text{corr}(a, a'; b) = -\frac{1}{HWIJ} \sum_{h,w,i,j} \left(F_{hwij} - b\right)
#    \max\!\left(C_{hwij}, 0\right),$$
#
#    which raises $C$ where the feature similarity exceeds the shift $b$ and lowers it below;
# 4. minimise $\lambda_\text{self} \mathcal{L}_\text{corr}(x, x; b_\text{self}) +
#    \lambda_\text{knn} \mathcal{L}_\text{corr}(x, x^\text{knn}; b_\text{knn}) +
#    \lambda_\text{rand} \mathcal{L}_\text{corr}(x, x^\text{rand}; b_\text{rand})$, together with the two probes
#    that read the (detached) code: a **cluster probe** (spherical k-means with as many centres as classes; no
#    labels, matched to the classes by the Hungarian algorithm only for scoring) and a **linear probe** (trained on
#    the labels; it measures how much class information the code holds, not an unsupervised result).
#
# The six $\lambda$ and $b$ are the method's hyper-parameters. The same probes, with the same schedule, are
# also trained on the **raw backbone features** (the study's "DINO" baseline {cite:p}`koenig2023uncovering`) and on
# the code of a head that never trains (its random initialisation), so the three can be compared.

# %%
import altair as alt
import numpy as np
import pandas as pd
from IPython.display import Markdown
from myst_nb import glue

from stego_core import cache, evaluation, training
from stego_core.book import viz
from stego_core.segmenter import Segmenter

stores = {split: cache.cache_features(dataset, split, backbone, res=split_res, crop=split_crop, weights=weights,
                                      dataset_options=dataset_options, root=root, device=device, progress=progress)
          for split, split_res, split_crop in (("train", res, crop), ("val", val_res or res, val_crop or crop))}
chosen = dict(code_dim=code_dim, steps=steps, batch_size=batch_size, pos_intra_weight=pos_intra_weight,
              pos_inter_weight=pos_inter_weight, neg_inter_weight=neg_inter_weight, pos_intra_shift=pos_intra_shift,
              pos_inter_shift=pos_inter_shift, neg_inter_shift=neg_inter_shift, pointwise=pointwise,
              n_neighbors=n_neighbors, val_freq=val_freq)
overrides = dict({k: v for k, v in chosen.items() if v is not None}, dataset=dataset, backbone=backbone, seed=seed,
                 protocol=protocol, feature_source=feature_source)
configs = {
    "STEGO head": training.make_config(preset, **overrides),
    "untrained head": training.make_config(preset, **overrides, correspondence_weight=0.0),
    "raw features": training.make_config(preset, **overrides, method="dino"),
}
cfg = configs["STEGO head"]
pd.DataFrame({"value": {k: str(v) for k, v in cfg.to_dict().items()}}).rename_axis("STEGO setting")

# %% [markdown]
# The feature stores of the previous chapter are opened again with the same keyed configuration (finished work is
# skipped). Above, the resolved settings of the STEGO run. Each run below is a keyed artifact under `runs/`: if a
# run with the same configuration and features has finished before, it is loaded instead of trained again.

# %% tags=["show-input"]
results = {name: training.train(c, train_store=stores["train"], val_store=stores["val"], root=root, device=device,
                                 progress=progress, logger=logger)
           for name, c in configs.items()}
pd.DataFrame([{"model": name, "run": r.run_dir.name, "method": r.config.method, "code_dim": r.config.code_dim,
               "steps": r.config.steps, "correspondence_weight": r.config.correspondence_weight}
              for name, r in results.items()]).set_index("model")

# %% [markdown]
# ## Training curves
#
# The STEGO run's losses, logged every 10 steps: the three correspondence terms (`pos_intra` = self,
# `pos_inter` = kNN partner, `neg_inter` = random image), the cluster-probe and linear-probe losses and their sum.
# Click legend entries to highlight them (shift-click for several); hover points for values.

# %%
history = pd.concat([r.history.assign(model=name) for name, r in results.items()], ignore_index=True)
losses = history[(history["model"] == "STEGO head") & history["metric"].str.startswith("loss/")]
viz.line_chart(losses.assign(term=losses["metric"].str[5:]), "step", "value", "term", points=False,
               tooltip=["term", "step", "value"], title="STEGO training losses")

# %% [markdown]
# The mean code correlation of each pair type, logged during training, for the trained and the untrained head
# (whose code stays where the random initialisation puts it). The loss does not ask for a high *mean*: it raises
# the correlation of point pairs whose feature correlation is above the shift and lowers it for the rest, so the
# means can fall for all three pair types while the pairs that matter separate (the histograms below).

# %%
corr_means = history[history["metric"].str.startswith("cd/") & history["model"].str.endswith("head")]
stego_cd = corr_means[corr_means["model"] == "STEGO head"].sort_values("step").groupby("metric")["value"]
for term, values in stego_cd:
    glue(f"cd_first_{term[3:]}", float(values.iloc[0]), display=False)
    glue(f"cd_last_{term[3:]}", float(values.iloc[-1]), display=False)
viz.line_chart(corr_means.assign(series=corr_means["model"] + ": " + corr_means["metric"].str[3:]),
               "step", "value", "series", points=False, tooltip=["series", "step", "value"],
               title="mean code correlation per pair type")

# %% [markdown]
# Validation mIoU of both probes over the whole validation split, for the three models. The cluster probe is the
# unsupervised result; the linear probe is an upper reference of what the code holds.

# %%
val_curves = history[(history["split"] == "val") & history["metric"].str.endswith("mIoU")]
viz.line_chart(val_curves.assign(series=val_curves["model"] + " · " + val_curves["metric"].str[:-5] + " probe"),
               "step", "value", "series", tooltip=["series", "step", "value"], title="validation mIoU (%)")

# %% [markdown]
# ## Code correlations at the end of training
#
# The maintainers' tuning advice (STEGO issue #23) is to look at the distributions of the code correlations $C$ of
# the three pair types: self and kNN pairs should mostly correlate, while random pairs — which mostly show
# different classes — should mostly sit at or below zero. The shifts $b$ move these distributions. Below, the
# histograms of the last training step for the trained and the untrained head (click the legend to isolate a
# term).

# %%
edges = np.linspace(-1.0, 1.0, 41)
corr_hist = pd.DataFrame([
    {"model": name, "pair": term, "from": lo, "to": hi, "share": count / max(len(values), 1)}
    for name, r in results.items() if r.code_corr
    for term, values in r.code_corr.items()
    for lo, hi, count in zip(edges[:-1], edges[1:], np.histogram(np.clip(values, -1, 1), bins=edges)[0])
])
pick = alt.selection_point(fields=["pair"], bind="legend")
(alt.Chart(corr_hist).mark_area(interpolate="step-after", line=True)
 .encode(x=alt.X("from:Q", title="code correlation C"), y=alt.Y("share:Q", stack=None, title="share"),
         color=alt.Color("pair:N", sort=["intra", "inter", "neg"]),
         opacity=alt.condition(pick, alt.value(0.35), alt.value(0.04)),
         tooltip=["model", "pair", alt.Tooltip("from:Q", format=".2f"), alt.Tooltip("to:Q", format=".2f"),
                  alt.Tooltip("share:Q", format=".3f")])
 .add_params(pick).properties(width=300, height=200)
 .facet(column=alt.Column("model:N", title=None)))

# %%
corr_summary = pd.DataFrame([
    {"model": name, "pair": term, "mean": float(np.mean(v)), "share > 0": float(np.mean(v > 0)),
     "10 %": float(np.quantile(v, 0.1)), "90 %": float(np.quantile(v, 0.9))}
    for name, r in results.items() if r.code_corr for term, v in r.code_corr.items()
])
positive = corr_summary.set_index(["model", "pair"])["share > 0"]
glue("inter_pos", float(100 * positive.get(("STEGO head", "inter"), np.nan)), display=False)
glue("neg_pos", float(100 * positive.get(("STEGO head", "neg"), np.nan)), display=False)
glue("neg_pos_untrained", float(100 * positive.get(("untrained head", "neg"), np.nan)), display=False)
corr_summary.round(3)

# %%
glue("pos_gap", float(100 * (positive.get(("STEGO head", "inter"), np.nan) - positive.get(("STEGO head", "neg"), np.nan))),
     display=False)
coco = training.make_config("cocostuff27")
for name in ("pos_inter_shift", "neg_inter_weight", "neg_inter_shift"):
    glue(f"coco_{name}", getattr(coco, name), display=False)
    glue(f"run_{name}", getattr(cfg, name), display=False)

# %% [markdown]
# After training, {glue:text}`inter_pos:.0f` % of the kNN pairs' code correlations are positive and
# {glue:text}`neg_pos:.0f` % of the random pairs' (untrained head: {glue:text}`neg_pos_untrained:.0f` %), a gap of
# {glue:text}`pos_gap:.0f` points. The mean code correlation of the kNN pairs went from
# {glue:text}`cd_first_inter:.2f` at the first logged step to {glue:text}`cd_last_inter:.2f` at the last, that of the
# random pairs from {glue:text}`cd_first_neg:.2f` to {glue:text}`cd_last_neg:.2f`.
#
# **What the shifts did.** The shifts are thresholds on the backbone's feature correlation $F$ (chapter
# {doc}`01_features` draws $F$ per pair type with the shifts marked). This run's kNN shift is
# {glue:text}`run_pos_inter_shift` (CocoStuff's preset: {glue:text}`coco_pos_inter_shift`), its random-pair weight
# {glue:text}`run_neg_inter_weight` (CocoStuff: {glue:text}`coco_neg_inter_weight`) and its random-pair shift
# {glue:text}`run_neg_inter_shift` (CocoStuff: {glue:text}`coco_neg_inter_shift`). A kNN shift below most kNN
# pairs' $F$ pulls those pairs together; a random-pair shift above every random pair's $F$ pushes all of them
# apart, and its weight sets how hard. The demo preset was tuned so that kNN pairs end mostly positive and random
# pairs mostly at or below zero, as STEGO's maintainers advise (mhamilton723/STEGO issue 23). If the random pairs
# still correlate about as often as the kNN pairs, a larger `neg_inter_shift` or `neg_inter_weight` pushes them
# further below zero (at the risk of splitting classes).

# %% [markdown]
# ## Results
#
# Validation metrics (%) of each model at its best validation (highest cluster mIoU, the study's model selection)
# and at its last validation (under the original protocol the reference's PyTorch Lightning schedule validates
# every `val_freq` batches of each epoch, so the final step need not be one; `stego_core.training`).

# %%
table = pd.DataFrame([
    {"model": name, "checkpoint": which, "step": int(m["step"]),
     "cluster mIoU": m["cluster/mIoU"], "cluster accuracy": m["cluster/Accuracy"],
     "linear mIoU": m["linear/mIoU"], "linear accuracy": m["linear/Accuracy"]}
    for name, r in results.items() for which, m in (("best", r.best), ("last", r.last))
]).set_index(["model", "checkpoint"])
best = table.xs("best", level="checkpoint")
glue("stego_cluster", float(best.loc["STEGO head", "cluster mIoU"]), display=False)
glue("raw_cluster", float(best.loc["raw features", "cluster mIoU"]), display=False)
glue("untrained_cluster", float(best.loc["untrained head", "cluster mIoU"]), display=False)
glue("stego_linear", float(best.loc["STEGO head", "linear mIoU"]), display=False)
glue("raw_linear", float(best.loc["raw features", "linear mIoU"]), display=False)
gain = float(best.loc["STEGO head", "cluster mIoU"] - best.loc["raw features", "cluster mIoU"])
glue("cluster_gain", abs(gain), display=False)
glue("verdict", Markdown("beats" if gain > 0 else "does not beat"), display=False)
table.round(1)

# %% [markdown]
# The cluster probe on the STEGO code reaches {glue:text}`stego_cluster:.1f` % mIoU, against
# {glue:text}`raw_cluster:.1f` % on the raw backbone features and {glue:text}`untrained_cluster:.1f` % on the code of
# the untrained head: here STEGO {glue:md}`verdict` the raw-feature cluster probe, by
# {glue:text}`cluster_gain:.1f` points (the STEGO paper reports a clear gain over its DINO baseline; Koenig et al.
# found that baseline stronger than printed, see {doc}`../findings`). The linear probes
# reach {glue:text}`stego_linear:.1f` % on the STEGO code and {glue:text}`raw_linear:.1f` % on the raw features:
# the linear probe measures how much class information can be read off linearly, and a head that compresses the
# features to a few channels need not add any; what it is meant to change is how well the classes *cluster*.

# %%
loaded = {name: Segmenter.from_run(r.run_dir, "best", device=device)
          for name, r in results.items() if name != "untrained head"}
evals = {name: evaluation.evaluate_batches(seg, stores["val"].iter_batches(8, shuffle=True, seed=seed),
                                           protocol=protocol, class_names=stores["val"].class_names,
                                           keep_predictions=n_examples, progress=False)
         for name, seg in loaded.items()}
per_class = pd.DataFrame([
    {"model": name, "probe": probe, "class": cls, "IoU": float(iou)}
    for name, ev in evals.items() for probe in ("cluster", "linear")
    for cls, iou in zip(stores["val"].class_names, ev[probe]["iou"])
])
viz.bar_chart(per_class.assign(series=per_class["model"] + " · " + per_class["probe"]), "class", "IoU", "series",
              tooltip=["model", "probe", "class", "IoU"], title="per-class IoU (%) at the best checkpoint",
              width=420).configure_legend(orient="bottom", columns=2, labelLimit=300)

# %% [markdown]
# Per-class IoU of both probes at the best checkpoints (the cluster probe after Hungarian matching over the whole
# validation split). A class that the cluster probe misses entirely shares its cluster with another class.
#
# ## Example predictions
#
# Validation images with their ground truth and the predictions, each coloured with the class palette (a cluster
# takes the colour of the class it was matched to): STEGO's cluster and linear probes, then the cluster probe on
# the raw features.

# %%
pred = {name: ev["predictions"] for name, ev in evals.items()}
shown = pred["STEGO head"]["index"]
assert shown == pred["raw features"]["index"]  # both evaluations walk the images in the same seeded order
batch = stores["val"].read(np.asarray(shown))
palette = stores["val"].palette
panels = [("ground truth", batch["label"].numpy()), ("STEGO cluster", pred["STEGO head"]["cluster"]),
          ("STEGO linear", pred["STEGO head"]["linear"]), ("raw-feature cluster", pred["raw features"]["cluster"])]
viz.show_images(  # every other pixel: the textures hardly compress, and the book page stays small
    [pic[::2, ::2] for i, image in enumerate(batch["image"])
     for pic in [image] + [viz.overlay(image, maps[i], palette, alpha) for _, maps in panels]],
    [title for i in shown for title in [f"#{i}"] + [f"#{i} {name}" for name, _ in panels]],
    width=130, ncols=1 + len(panels),
)

# %%
viz.label_legend(stores["val"].class_names, palette)
