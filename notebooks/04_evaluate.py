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
res = 224  # evaluation resolution in pixels: the paper evaluates at 320; the demo keeps the 224 of its caches
crop = "center"  # "center" (resize the short side, then crop) or "none"
dataset_options = {}  # extra loader options, e.g. {"n_images": 40} for mosaic; must match chapter 01's
cache_res = 0  # image size of the feature caches the runs were trained on (chapters 01-03); 0 means res
cache_crop = ""  # crop of those caches, e.g. "five" for COCO/Cityscapes training; "" means crop
preset = "demo"  # training preset of the runs evaluated when no checkpoint is given (stego_core.training.PRESETS); the dataset and backbone are this chapter's
methods = ["stego", "dino"]  # which trained runs to evaluate: Table 2 has "stego" and "dino"; "pca", "rp", "hnne" also work
code_dim = 0  # code dimension of the STEGO/PCA/RP/h-NNE runs; 0 means the preset's (24 for the demo)
seed = 0  # seed of the runs to evaluate
overrides = {}  # TrainConfig fields of the runs (e.g. {"steps": 4} in the tests); {} takes any finished run of the preset
train_missing = False  # train a run that chapters 02/03 did not make (True in the demo and smoke profiles only); False stops with the command that makes it
checkpoint = ""  # path to a released STEGO .ckpt to evaluate instead of the trained "stego" run; empty means the trained run
baseline_checkpoint = ""  # path to a stego-studies DINO-baseline .ckpt instead of the trained "dino" run; empty means the trained run
trusted = False  # allow a full unpickle of the checkpoint files (only for files whose source you trust)
protocol = "original"  # "original" (the reference's CRF image bytes and metrics) or "corrected"
flip = True  # average the code of the image and its mirror image, as the paper's evaluation does
crf = True  # also evaluate with DenseCRF refinement (Table 2 reports both)
crf_images = 0  # images the CRF rows use (the first N of the split; 0 means all): DenseCRF costs ~1 s per 320 px image per core
workers = 2  # processes for DenseCRF
batch_size = 8  # images per backbone call
n_examples = 4  # example images shown with their predictions
device = "cpu"  # "cpu" or "cuda" for the backbone
root = None  # artifacts folder; None means $STEGO_ARTIFACTS, else ./artifacts
progress = True  # show progress bars

# %% [markdown]
# # Evaluation like the paper
#
# Training-time validation (chapters 02 and 03) takes one pass per image. The paper's final numbers come from a
# stricter protocol, the one of STEGO's `eval_segmentation.py`:
#
# 1. the **code** of an image is averaged with the mirrored code of its horizontally flipped copy;
# 2. the code is upsampled bilinearly to the label resolution;
# 3. the linear probe gives log-softmax scores, the cluster probe log_softmax(2·cos(code, centres));
# 4. optionally a fully connected **DenseCRF** refines each score map using the image's colours;
# 5. pooled confusion matrices over the whole split: Hungarian matching of clusters to classes for the cluster
#    probe, identity for the linear probe; mIoU and pixel accuracy.
#
# Table 2 of the study compares STEGO with a **DINO baseline**: the same probes trained on the raw backbone
# features, with no STEGO head. Here both are evaluated with and without the CRF.

# %%
import time

import pandas as pd
import torch
from IPython.display import Markdown
from myst_nb import glue

from stego_core import backbones, cache, config, data, evaluation, findings, papers, runs
from stego_core import results as results_store
from stego_core.book import viz
from stego_core.evaluation import evaluate
from stego_core.segmenter import Segmenter
from stego_core.training import PRESETS

pd.set_option("display.max_colwidth", None)  # show the sources and notes in full
t_start = time.perf_counter()
dim = code_dim or PRESETS[preset].get("code_dim", 24)
val_ds = data.load_dataset(dataset, "val", res=res, crop=crop, **dataset_options)
checkpoints = {"stego": checkpoint, "dino": baseline_checkpoint}
# released checkpoints are checked against this evaluation's dataset, classes, backbone and code dim first
loaded = {method: Segmenter.from_checkpoint(
              checkpoints[method], trusted=trusted, device=device, protocol=protocol, expected_dataset=dataset,
              expected_classes=val_ds.n_classes, expected_backbone=backbone,
              expected_code_dim=dim if method == "stego" else None)
          for method in methods if checkpoints.get(method)}
needs_runs = [(method, dim) for method in methods if method not in loaded]
if needs_runs:  # the runs of chapters 02 / 03, found on the stores of chapter 01 (nothing is built or trained here)
    stores = {split: cache.cache_features(dataset, split, backbone, res=split_res, crop=split_crop, weights=weights,
                                          dataset_options=dataset_options, root=root, build=False)
              for split, split_res, split_crop in (("train", cache_res or res, cache_crop or crop),
                                                   ("val", res, crop))}
    found = runs.require_runs(preset, needs_runs, train_store=stores["train"], val_store=stores["val"], seed=seed,
                              protocol=protocol, root=root, device=device, train_missing=train_missing,
                              backbone=backbones.load_backbone(backbone, weights, device=device),
                              progress=progress, **overrides)
    loaded.update({method: seg for (method, _), seg in found.items()})
models = {config.METHOD_LABELS[m] + ("" if m in ("stego", "dino") else f" d={dim}"): loaded[m] for m in methods}
pd.DataFrame([{"model": name, "source": f"{seg.info['source']} {seg.info.get('run_id') or seg.info['checkpoint']}"
               + (f" (step {seg.info['step']})" if seg.info.get("step") is not None else "")}
              for name, seg in models.items()])

# %% [markdown]
# ## Table 2
#
# Every model runs over the validation split twice: without the CRF on all images, and with it on the images
# chosen by `crf_images` (the CRF costs about a second per image and probe on one core, so the demo may use a
# subset; then the no-CRF numbers on the same subset are listed as well, so the CRF's effect is read on equal
# footing). The rows go into the results store (stage "final") and the table below is read back from there.

# %%
n_val = len(val_ds)
n_crf = min(crf_images or n_val, n_val)
crf_ds = val_ds if n_crf == n_val else torch.utils.data.Subset(val_ds, range(n_crf))
settings = [("all", val_ds, False)]
if crf and n_crf < n_val:
    settings.append(("crf subset", crf_ds, False))
if crf:
    settings.append(("crf subset" if n_crf < n_val else "all", crf_ds, True))
results = {}
timing = []
for name, seg in models.items():
    for subset, ds, use_crf in settings:
        t0 = time.perf_counter()
        results[(name, subset, use_crf)] = evaluate(
            seg, ds, flip=flip, crf=use_crf, workers=workers, protocol=protocol, batch_size=batch_size,
            class_names=val_ds.class_names, keep_predictions=n_examples, progress=progress)
        timing.append({"model": name, "images": len(ds), "CRF": use_crf, "seconds": time.perf_counter() - t0})
table2_file = evaluation.write_final_rows(
    [row for (name, _, _), r in results.items() for row in evaluation.final_rows(r, models[name], dataset=dataset)],
    name=f"{dataset}-table2", root=root,
    key={"models": {name: seg.description for name, seg in models.items()}, "res": res, "crop": crop,
         "dataset_options": dataset_options, "flip": flip, "crf_images": n_crf if crf else 0, "protocol": protocol})
ours = results_store.final_table(results_store.read_rows(table2_file), labels=config.METHOD_LABELS)
table2 = ours.set_index(["model", "CRF", "images"])
summary = []
for name in models:
    full = table2.loc[(name, "no CRF", n_val)].astype(float)
    line = f"**{name}**: cluster mIoU {full['cluster mIoU']:.1f}, linear mIoU {full['linear mIoU']:.1f} without CRF"
    if crf:
        gain = float(table2.loc[(name, "with CRF", n_crf), "cluster mIoU"]
                     - table2.loc[(name, "no CRF", n_crf), "cluster mIoU"])
        line += f"; the CRF changes the cluster mIoU by {gain:+.1f} points"
        glue(f"{name.split()[0].lower().replace('-', '')}_crf_gain", round(gain, 1), display=False)
    glue(f"{name.split()[0].lower().replace('-', '')}_cluster_miou", round(float(full["cluster mIoU"]), 1),
         display=False)
    summary.append(line)
glue("summary", Markdown("; ".join(summary) + "."), display=False)
glue("n_val", n_val, display=False)
glue("n_crf", n_crf if crf else 0, display=False)
glue("eval_dataset", Markdown(f"`{dataset}`"), display=False)
glue("eval_dataset_name", dataset, display=False)
glue("eval_res", res, display=False)
crf_effects = findings.published_crf_effects()
glue("pub_crf_min", float(crf_effects["effect"].min()), display=False)
glue("pub_crf_max", float(crf_effects["effect"].max()), display=False)
glue("table2_ours", ours.round(1), display=False)  # shown again on the Results part's Table 2 page
ours.round(1)

# %% [markdown]
# Our rows on {glue:md}`eval_dataset` ({glue:text}`n_val` validation images; the CRF rows use
# {glue:text}`n_crf`): {glue:md}`summary`
#
# The papers' published numbers follow ({glue:md}`paper_scope`), each with its source (`stego_core.papers`):
# "paper" is the value printed in the STEGO paper, "study" the evaluation of Koenig et al. (for STEGO, of the
# released checkpoint; for DINO, of their baseline), "issue" a user's independent evaluation of the released
# checkpoint; "≈" marks a value read off a figure, "–" one the source does not report. Where this chapter ran on other data
# than the papers' (the demo's mosaic scenes, a folder of your own photos), only the *pattern* can be compared
# (whether STEGO's row lies above the raw-feature baseline's; how large the CRF's effect is), not the values. In
# the study's Table 2 the CRF changes mIoU by {glue:text}`pub_crf_min:+.1f` to {glue:text}`pub_crf_max:+.1f` points
# (with CRF against the same model without it, the latter read off its Figure 4; `stego_core.findings`); here it
# changes STEGO's cluster mIoU by {glue:text}`stego_crf_gain:+.1f` and the baseline's by
# {glue:text}`dino_crf_gain:+.1f` points. The paper's Table 2 is evaluated at 320 px with the CRF; this chapter ran
# at {glue:text}`eval_res` px.

# %%
paper, paper_notes = papers.table2_frame(dataset)
glue("paper_scope", Markdown(f"for `{dataset}`" if dataset in papers.DATASETS else "all three paper datasets"),
     display=False)
glue("table2_paper", paper.style.hide(axis="index"), display=False)
glue("table2_paper_notes", paper_notes.style.hide(axis="index"), display=False)
paper.style.hide(axis="index")

# %%
paper_notes.style.hide(axis="index")

# %% [markdown]
# ## Which classes are found
#
# Per-class IoU of the cluster probe (unsupervised, Hungarian-matched) and of the linear probe, on all validation
# images without CRF and on the CRF images with it. Click a legend entry to highlight one setting.

# %%
iou_rows = pd.DataFrame([
    {"setting": f"{name}, {'with' if use_crf else 'no'} CRF", "probe": probe, "class": cls, "IoU": float(iou)}
    for (name, subset, use_crf), r in results.items() if use_crf or subset == "all"
    for probe in ("cluster", "linear")
    for cls, iou in zip(val_ds.class_names, r[probe]["iou"][:val_ds.n_classes])])
viz.bar_chart(iou_rows[iou_rows["probe"] == "cluster"], "class", "IoU", "setting",
              tooltip=["setting", "class", "IoU"], title="cluster probe: IoU per class (%)", width=460)

# %%
viz.bar_chart(iou_rows[iou_rows["probe"] == "linear"], "class", "IoU", "setting",
              tooltip=["setting", "class", "IoU"], title="linear probe: IoU per class (%)", width=460)

# %% [markdown]
# The same numbers as a table (cluster probe): each model on all validation images without CRF, then on the CRF
# images without and with the CRF. The Hungarian matching of clusters to classes is fitted on the very images it
# scores (all images for the first column, the CRF images alone for the other two), as in the paper.

# %%
per_class = pd.DataFrame({
    f"{name}, {'CRF images' if subset != 'all' or use_crf else 'all'}{', CRF' if use_crf else ''}":
        pd.Series(r["cluster"]["iou"][:val_ds.n_classes], index=val_ds.class_names)
    for (name, subset, use_crf), r in results.items()}).rename_axis("class")
first, second = list(models)[:2] if len(models) > 1 else (list(models)[0], list(models)[0])
_, failures = findings.failure_cases(per_class, f"{first}, all", f"{second}, all")
glue("failure_cases", failures, display=False)
glue("per_class_table", per_class.round(1), display=False)
per_class.round(1)

# %% [markdown]
# Failure cases, generated from the table: {glue:text}`failure_cases:s`.

# %% [markdown]
# ## Examples
#
# Each row: an image, its ground truth, then the cluster-probe prediction of each model without and with the CRF
# (clusters mapped to classes by the Hungarian matching of the whole split; black = a cluster without a class).

# %%
n_show = min(n_examples, n_crf if crf else n_val)
pics, titles = [], []
for i in range(n_show):
    image = viz.to_image(val_ds[i]["img"])
    pics += [image, viz.colorize(val_ds[i]["label"].numpy(), val_ds.palette)]
    titles += [f"#{i}", "ground truth"]
    for name in models:
        for use_crf in ([False, True] if crf else [False]):
            pred = results[(name, "crf subset" if use_crf and n_crf < n_val else "all", use_crf)]["predictions"]["cluster"][i]
            pics.append(viz.colorize(pred, val_ds.palette))
            titles.append(f"{name}, {'CRF' if use_crf else 'no CRF'}")
viz.show_images(pics, titles, width=130, ncols=len(pics) // max(n_show, 1))

# %%
viz.label_legend(val_ds.class_names, val_ds.palette)

# %% [markdown]
# ## Cost
#
# Wall time of each evaluation pass on this machine (backbone twice per image for the flip, probes, CRF).

# %%
glue("eval_seconds", round(time.perf_counter() - t_start), display=False)
pd.DataFrame(timing).round(2)

# %% [markdown]
# The whole chapter took {glue:text}`eval_seconds` s here.
