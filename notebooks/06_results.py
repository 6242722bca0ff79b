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
show_figures = True  # draw the figures on this page too; the book's profiles set False (the Results pages show them)

# %% [markdown]
# # Collecting the results
#
# This chapter trains nothing: it reads the results store (the `results.csv` written by every training run under
# the artifacts folder), keeps the runs of the dimension study's sweeps, and draws the study's figures from them
# and from the cached PCA fits. Other runs on the same artifacts (the untrained-head control of the training
# chapter, the protocol variants of the quirks chapter) share a method, dimension and seed with sweep runs but
# are not part of the comparison. Each number is the validation score at the step a run selected itself (its
# highest validation cluster mIoU), averaged over seeds.
#
# In the book the figures are shown, with their reading, in the Results part: {doc}`../results/figure3`,
# {doc}`../results/figure4` and {doc}`../results/appendix`; this page keeps the complete table of numbers. With
# `show_figures = True` (the default when you run the chapter yourself) they are drawn here as well.

# %%
import numpy as np
import pandas as pd
from IPython.display import Markdown
from myst_nb import glue

from stego_core import findings, papers, sweep
from stego_core.book import figures, viz

store = sweep.load_sweep_results(root)
table = figures.dimension_table(store, protocol=protocol)
curves = figures.pca_variance_curves(root)
datasets = list(dict.fromkeys(table["dataset"]))
quoted = dataset if dataset in datasets else (datasets[0] if datasets else None)
glue("res_n_runs", int(store["run_id"].nunique()), display=False)
glue("res_datasets", Markdown(", ".join(f"`{d}`" for d in datasets) or "none yet"), display=False)
glue("res_dataset_names", ", ".join(datasets) or "none yet", display=False)
glue("res_n_curves", len(curves), display=False)
Markdown("The results store is empty: run the dimension study (`stego-study run 03_dimension_study`) first."
         if table.empty else f"{store['run_id'].nunique()} runs on {len(datasets)} dataset(s).")

# %% [markdown]
# The store holds {glue:text}`res_n_runs` runs; datasets with dimension-study results: {glue:md}`res_datasets`.
#
# ## Figure 3: explained variance of PCA
#
# The cumulative share of variance of each cached PCA fit ({glue:text}`res_n_curves` found), drawn as the study
# drew it, with the paper's values for its three datasets (diamonds, read off its Figure 3).

# %%
fig3 = figures.variance_chart(figures.variance_frame(curves), reference=papers.figure3_points())
glue("fig3", fig3, display=show_figures)
for key, value in figures.variance_findings(curves).items():
    glue(f"res_var_{key}", value, display=False)

# %% [markdown]
# ## Figure 4: probe mIoU against the code dimension
#
# STEGO's trained head against the training-free projections PCA and RP and the DINO baseline, for the linear and
# the cluster probe, with the findings quoted for the first dataset of the store. For a dataset of the paper the
# published curves are drawn as thin dashed lines of the same colours (values read off the paper's figure).

# %%
published = figures.paper_dimension_table()
fig4 = figures.dimension_chart(table, metrics=("mIoU",), methods=main_methods, spread=spread, slider=slider,
                               reference=published) if len(table) else viz.note("No results yet.")
glue("fig4", fig4, display=show_figures)
glue("res_paper_datasets", ", ".join(sorted(set(table["dataset"]) & set(papers.DATASETS))) or "none", display=False)
fig4_paper = figures.dimension_chart(published, methods=main_methods, slider=False, width=190, height=150,
                                     title="Koenig et al. 2023, Figure 4: mIoU without CRF (read off the figure)")
glue("fig4_paper", fig4_paper, display=show_figures)
headline = figures.dimension_findings(table, quoted) if quoted is not None else {}
glue("res_dataset", Markdown(f"`{quoted}`" if quoted else "(none)"), display=False)
glue("res_dataset_name", quoted or "(none)", display=False)
for key in ("stego_cluster_min", "pca_cluster_min", "rp_cluster_min", "stego_minus_pca_cluster_min",
            "pca_linear_full", "dino_linear", "pca_linear_full_minus_dino", "dino_cluster", "stego_cluster_best"):
    glue(f"res_{key}", float(headline.get(key, np.nan)), display=False)
for key in ("min_dim", "pca_full_dim", "stego_beats_pca_cluster", "n_dims_pca", "stego_beats_rp_cluster",
            "n_dims_rp"):
    glue(f"res_{key}", headline.get(key) if headline.get(key) is not None else "n/a", display=False)
quoted_table = figures.pivot_table(table[table["dataset"] == quoted], "mIoU") if quoted \
    else viz.note("No results yet.")
glue("fig4_table", quoted_table, display=show_figures)

# %% [markdown]
# ## Paired differences over seeds
#
# Every run of a method at one dimension is paired with the run of the other method at the same dimension and
# seed (STEGO − raw features: the raw-feature run of the same seed). Below, the mean difference in cluster mIoU
# with its 95 % interval over the seeds (a t interval; one seed gives no interval), and whether the interval
# lies above zero, below it, or includes it.

# %%
diffs = {b: figures.paired_differences(store[store["dataset"] == quoted] if quoted else store, b)
         for b in ("pca", "rp", "hnne", "dino")}
for b, d in diffs.items():
    glue(f"res_verdict_{b}", figures.differences_verdict(d), display=False)
hnne_vs_pca = figures.paired_differences(store[store["dataset"] == quoted] if quoted else store, "pca", method="hnne")
glue("res_verdict_hnne_pca", figures.differences_verdict(hnne_vs_pca, method="h-NNE"), display=False)
diff_frame = pd.concat([d.assign(comparison="STEGO − " + figures.METHOD_LABELS[b]) for b, d in diffs.items()])
glue("fig4_diffs", figures.differences_chart(diff_frame) if len(diff_frame) else viz.note("No paired runs yet."),
     display=show_figures)
diff_table = figures.differences_table(diff_frame)
glue("fig4_diffs_table", diff_table, display=show_figures)
convergence = figures.convergence_table(store[store["dataset"] == quoted] if quoted else store)
glue("res_n_sweep_runs", len(convergence), display=False)
glue("res_n_last_best", int(convergence["picks_last"].sum()), display=False)
glue("res_last_best_share", float(100 * convergence["picks_last"].mean()) if len(convergence) else float("nan"),
     display=False)
glue("res_n_seeds", int(store.loc[store["dataset"] == quoted, "seed"].nunique()) if quoted else 0, display=False)
diff_table

# %% [markdown]
# On {glue:md}`res_dataset`: {glue:text}`res_verdict_pca:s`; {glue:text}`res_verdict_rp:s`;
# {glue:text}`res_verdict_hnne:s`; {glue:text}`res_verdict_dino:s`.
# {glue:text}`res_n_last_best` of the {glue:text}`res_n_sweep_runs` runs selected their last validation step as
# their best (a run still improving when it stopped).
#
# ## The paper's claims, in numbers
#
# The published numbers (`stego_core.papers`, each with its source) that the findings page quotes, and this
# build's evidence for each claim (`stego_core.findings`).

# %%
published_pca = findings.published_stego_vs("pca").set_index("dataset")
published_rp = findings.published_stego_vs("rp").set_index("dataset")
for ds in papers.DATASETS:
    for name, frame in (("pca", published_pca), ("rp", published_rp)):
        glue(f"pub_{ds}_above_{name}", int(frame.loc[ds, "above"]), display=False)
        glue(f"pub_{ds}_n_{name}", int(frame.loc[ds, "n_dims"]), display=False)
        glue(f"pub_{ds}_not_above_{name}", ", ".join(map(str, frame.loc[ds, "not_above"])) or "none", display=False)
for ds in papers.DATASETS:
    setting = papers.PAPER_SETTINGS[ds]
    glue(f"pub_{ds}_stego_dim", int(setting["stego_dim"]), display=False)
    glue(f"pub_{ds}_vit_dim", int(setting["vit_dim"]), display=False)
    glue(f"pub_{ds}_compression", setting["vit_dim"] / setting["stego_dim"], display=False)
glue("claim_little", findings.LITTLE, display=False)
anomaly = findings.potsdam_anomaly()
for key, value in anomaly.items():
    glue(f"pub_potsdam_{key}", value, display=False)
crf_effects = findings.published_crf_effects()
glue("pub_crf_min", float(crf_effects["effect"].min()), display=False)
glue("pub_crf_max", float(crf_effects["effect"].max()), display=False)
t2 = papers.table2_values(crf=True)
for key, (row, ds, probe) in {"coco_dino_cluster": ("DINO (ours)", "cocostuff27", "cluster"),
                              "coco_dino_theirs_cluster": ("DINO (theirs)", "cocostuff27", "cluster"),
                              "coco_dino_linear": ("DINO (ours)", "cocostuff27", "linear"),
                              "coco_stego_linear": ("STEGO (ours, released checkpoint)", "cocostuff27", "linear"),
                              "city_dino_linear": ("DINO (ours)", "cityscapes", "linear"),
                              "city_stego_linear": ("STEGO (ours, released checkpoint)", "cityscapes", "linear")}.items():
    pick = t2[(t2["row"] == row) & (t2["dataset"] == ds) & (t2["probe"] == probe) & (t2["metric"] == "mIoU")]
    glue(f"pub_{key}", float(pick["value"].iloc[0]), display=False)
claims = findings.demo_claims(table, quoted) if quoted else {}
for key, value in claims.items():
    glue(f"claim_{key}", value if isinstance(value, (str, int)) or value is None else float(value), display=False)
crf_effects.rename(columns={"row": "model", "with_crf": "with CRF", "without_crf": "without CRF"}).round(2)

# %%
later, later_notes = papers.later_methods_frame()
glue("later_methods", later.style.hide(axis="index"), display=False)
glue("later_methods_notes", later_notes.style.hide(axis="index"), display=False)
later.style.hide(axis="index")
#
# ## Appendix figures: pixel accuracy and h-NNE

# %%
fig_accuracy = figures.dimension_chart(table, metrics=("Accuracy",), methods=main_methods, spread=spread,
                                       slider=slider) if len(table) else viz.note("No results yet.")
glue("fig_accuracy", fig_accuracy, display=show_figures)
hnne_datasets = sorted(set(table.loc[table["method"] == "hnne", "dataset"]))
glue("res_hnne_datasets", Markdown(", ".join(f"`{d}`" for d in hnne_datasets) or "none"), display=False)
glue("res_hnne_dataset_names", ", ".join(hnne_datasets) or "none", display=False)
hnne_findings = figures.dimension_findings(table, hnne_datasets[0]) if hnne_datasets else {}
for key in ("stego_beats_hnne_cluster", "n_dims_hnne", "hnne_beats_pca_cluster", "n_dims_hnne_pca"):
    glue(f"res_{key}", hnne_findings.get(key, "n/a"), display=False)
fig_hnne = figures.dimension_chart(table[table["dataset"] == hnne_datasets[0]], metrics=("mIoU", "Accuracy"),
                                   spread=spread, slider=slider) if hnne_datasets \
    else viz.note("No h-NNE runs in the results store.")
glue("fig_hnne", fig_hnne, display=show_figures)

# %% [markdown]
# h-NNE results found for: {glue:md}`res_hnne_datasets`.
#
# ## All numbers
#
# Every dataset, method and dimension of the store, with standard deviations where there are several seeds.

# %%
figures.pivot_table(table) if len(table) else Markdown("No results yet.")

# %% [markdown]
# ## Beyond the paper: newer backbones
#
# The datasets whose dimension study also ran on a DINOv2 or DINOv3 backbone (the extended study's profiles), with
# every backbone of those datasets side by side; the Results page "Beyond the paper: newer backbones" shows them.

# %%
from stego_core import backbones

glue("bb_registry", backbones.newer_vits_table().style.hide(axis="index"), display=False)
newer = figures.extended_study_rows(table)
glue("bb_status", viz.note(figures.extended_study_status(newer)), display=False)
fig_backbones = figures.dimension_chart(newer, metrics=("mIoU",), methods=main_methods, spread=spread,
                                        slider=slider) if len(newer) else viz.note("No chart yet: it needs those runs.")
glue("fig_backbones", fig_backbones, display=show_figures)
bb_table = figures.backbone_comparison(newer).style.hide(axis="index").format(precision=1) if len(newer) \
    else viz.note("No rows yet.")
glue("bb_table", bb_table, display=show_figures)
Markdown(figures.extended_study_status(newer))
