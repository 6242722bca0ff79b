"""The explorer and the runs it shows: run lookup (stego_core.runs), predictions against a direct computation,
picture encodings, the static chart's data and controls, uploads; plus the quirk measurements of stego_core.quirks
against brute force."""
from __future__ import annotations

import base64
import datetime
import io
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from stego_core import explorer, quirks, runs, training
from stego_core.book import widgets
from stego_core.config import StegoError
from stego_core.knn import build_knn
from stego_core.segmenter import Segmenter

OPTS = {"n_images": 8, "scene_size": 96}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Tiny mosaic stores (random-weight EfficientNet, 64 px) and a 4-step STEGO, PCA and DINO run."""
    from stego_core.cache import cache_features

    root = tmp_path_factory.mktemp("explorer-art")
    kw = dict(res=64, weights="random", dataset_options=OPTS, root=root, progress=False, batch_size=8)
    train = cache_features("mosaic", "train", "efficientnet_lite0", **kw)
    val = cache_features("mosaic", "val", "efficientnet_lite0", **kw)
    with pytest.warns(UserWarning):  # k=30 neighbours on 8 images
        build_knn(train, protocol="original", progress=False)  # the feature stage's table
    args = dict(train_store=train, val_store=val, root=root, progress=False, steps=4, batch_size=4, val_freq=2)
    for method, dim in (("stego", 6), ("pca", 3), ("dino", None)):  # what chapters 02 / 03 would have trained
        cfg = runs.run_config("demo", train_store=train, method=method, code_dim=dim, steps=4, batch_size=4,
                              val_freq=2)
        training.train(cfg, train_store=train, val_store=val, root=root, progress=False)
    models = runs.require_runs("demo", [("stego", 6), ("pca", 3), ("dino", None)], **args)
    assert set(models) == {("stego", 6), ("pca", 3), ("dino", train.dim)}
    return dict(root=root, train=train, val=val, args=args, models=models)


def _decode(url: str) -> Image.Image:
    head, b64 = url.split(",", 1)
    assert head.startswith("data:image/")
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_require_run_reuses_finished_runs(setup):
    root, args = setup["root"], setup["args"]
    # (correspondence_weight 1: the probes-only control of the next test may already be there, tests run shuffled)
    found = runs.find_runs(root, method="stego", code_dim=6, correspondence_weight=1.0, train_store=setup["train"])
    assert len(found) == 1 and (found.loc[0, "run_dir"] / "DONE").exists()
    done = found.loc[0, "run_dir"] / "DONE"
    stamp = done.stat().st_mtime_ns
    again = runs.require_run("demo", method="stego", code_dim=6, **args)
    assert again.info["run_dir"] == str(found.loc[0, "run_dir"]) and done.stat().st_mtime_ns == stamp  # loaded
    assert runs.find_runs(root, method="stego", code_dim=12).empty
    assert runs.find_runs(root, method="stego", train_store="/elsewhere").empty
    assert len(runs.find_runs(root, method="dino", code_dim=999)) == 1  # DINO ignores the dim
    assert set(runs.find_runs(root)["method"]) == {"stego", "pca", "dino"}


def test_require_run_never_takes_a_probes_only_control_for_stego(setup):
    args = {k: v for k, v in setup["args"].items() if k not in ("train_store", "val_store", "root", "progress")}
    control = training.train(training.make_config("demo", method="stego", code_dim=6, correspondence_weight=0.0,
                                                  **args),
                             train_store=setup["train"], val_store=setup["val"], root=setup["root"], progress=False)
    newest = runs.find_runs(setup["root"], method="stego", code_dim=6, train_store=setup["train"])
    assert newest.loc[0, "run_dir"] == control.run_dir  # the control run is the newest STEGO-method run
    chosen = runs.require_run("demo", method="stego", code_dim=6, **setup["args"])
    assert chosen.info["run_dir"] == setup["models"][("stego", 6)].info["run_dir"] != str(control.run_dir)


def test_the_code_map_gives_the_runs_code(setup):
    feats = setup["val"].read(np.arange(3))["feats"].float()
    for (method, _), seg in setup["models"].items():
        if method == "dino":  # the DINO baseline is the identity
            assert isinstance(seg.code_map, torch.nn.Identity) and torch.equal(seg.code(feats), feats)
            continue
        with torch.no_grad():
            assert torch.allclose(seg.code_map(feats), seg.code(feats))
    pca = setup["models"][("pca", 3)].code_map.projection
    torch.testing.assert_close(setup["models"][("pca", 3)].code(feats), torch.as_tensor(pca.transform(feats)))


def test_predict_matches_a_direct_computation(setup):
    run = setup["models"][("stego", 6)]
    rec = setup["val"].read(np.arange(4))
    code = run.code(rec["feats"].float())
    up = F.interpolate(code, size=(64, 64), mode="bilinear", align_corners=False)
    cos = torch.einsum("bdhw,kd->bkhw", F.normalize(up, dim=1), F.normalize(run.cluster_probe.centres, dim=1))
    mapping = np.random.default_rng(0).permutation(run.cluster_probe.n_clusters).astype(np.int64)  # not identity
    mapped = Segmenter(run.code_map, run.cluster_probe, run.linear_probe, cluster_to_class=mapping)
    got = mapped.predict(code, (64, 64), "cluster").numpy()
    np.testing.assert_array_equal(got, mapping[cos.argmax(1).numpy()])
    lin = run.predict(code, (64, 64), "linear").numpy()
    np.testing.assert_array_equal(lin, run.linear_probe(up).argmax(1).numpy())
    refined = run.predict(code[:2], (64, 64), "cluster", crf=True, images=rec["image"][:2])
    assert refined.shape == (2, 64, 64) and refined.min() >= 0
    with pytest.raises(StegoError, match="images"):
        run.predict(code[:2], (64, 64), "cluster", crf=True, images=rec["image"])
    with pytest.raises(StegoError, match="probe"):
        run.predict(code, (64, 64), "kmeans")


def test_picture_encodings():
    palette = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255]], dtype=np.uint8)
    label = np.array([[0, 1], [2, -1]])
    im = _decode(widgets.label_data_url(label, palette)).convert("RGBA")
    px = np.asarray(im)
    assert px[0, 0].tolist() == [255, 0, 0, 255] and px[1, 0].tolist() == [0, 0, 255, 255]
    assert px[1, 1, 3] == 0  # ignore / unmatched: transparent, the photo shows through
    photo = (np.random.default_rng(0).random((16, 16, 3)) * 255).astype(np.uint8)
    jpg = _decode(widgets.jpeg_data_url(photo))
    assert jpg.format == "JPEG" and jpg.size == (16, 16)


def test_precompute_and_the_static_chart(setup):
    val, models = setup["val"], setup["models"]
    data = explorer.precompute(models, val, [1, 3], workers=1, progress=False)
    assert len(data.predictions) == 2 * len(models) * 2 * 2  # images x models x CRF x probes
    assert data.dims == [3, 6]
    # the mapping comes from the whole split: it equals evaluate_codes' Hungarian assignment on all items
    run = models[("stego", 6)]
    res = quirks.evaluate_run(run, val)
    assert data.metrics.query("method == 'stego' and probe == 'cluster'")["mIoU"].item() == pytest.approx(
        res["cluster/mIoU"])
    rows, cols = res["cluster"]["assignment"]
    to_class = data.models[("stego", 6)].cluster_to_class
    assert [to_class[r] for r in rows] == list(cols)
    with torch.no_grad():  # item 3 directly: head, upsampling, nearest centre, the split's cluster -> class map
        code = run.code_map(val.read(np.array([3]))["feats"].float())
        up = F.interpolate(code, size=(64, 64), mode="bilinear", align_corners=False)
        cos = torch.einsum("bdhw,kd->bkhw", F.normalize(up, dim=1), F.normalize(run.cluster_probe.centres, dim=1))
    np.testing.assert_array_equal(data.predictions[(3, "stego", 6, False, "cluster")], to_class[cos.argmax(1)[0]])

    table = widgets.explorer_table(data)
    assert len(table) == 2 * 2 + len(data.predictions)
    assert table["url"].str.startswith("data:image/").all()
    assert set(table.loc[table["kind"] == "prediction", "method"]) == {"STEGO", "PCA", "DINO"}
    assert (table.loc[table["method"] == "DINO", "dim"] == 0).all()  # DINO shows at every dim
    spec = widgets.explorer_chart(data, size=64).to_dict()
    params = {p["name"]: p for p in spec["params"]}
    assert set(params) == {"image_id", "method", "dim", "crf", "probe", "opacity"}
    assert params["image_id"]["bind"]["options"] == [1, 3] and params["dim"]["bind"]["options"] == [3, 6]
    assert params["crf"]["bind"]["input"] == "checkbox"
    text = json.dumps(spec)
    assert "datum.method === method" in text and "datum.crf === crf" in text
    n_rows = sum(len(v) for v in spec["datasets"].values())
    assert n_rows >= len(table)


def test_prepare_upload():
    buf = io.BytesIO()
    Image.fromarray(np.zeros((40, 80, 3), dtype=np.uint8) + 7).save(buf, format="PNG")
    out = widgets.prepare_upload(buf.getvalue(), 32)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8 and (out == 7).all()
    with pytest.raises(StegoError, match="upload"):
        widgets.prepare_upload(b"not an image", 32)


def test_live_explorer_recomputes(setup):
    pytest.importorskip("ipywidgets")
    data = explorer.precompute({("pca", 3): setup["models"][("pca", 3)]}, setup["val"], [0], crf=(False,),
                               progress=False)
    from stego_core.backbones import load_backbone

    panel = widgets.live_explorer(data, load_backbone("efficientnet_lite0", "random"), res=64)
    status = panel.children[-1]
    images = panel.children[3].children
    assert images[0].value and images[1].value and not status.value.startswith("error"), status.value
    buf = io.BytesIO()
    Image.fromarray(np.full((50, 70, 3), 120, dtype=np.uint8)).save(buf, format="PNG")
    before = images[0].value
    upload = panel.children[0].children[1]
    upload.value = ({"name": "x.png", "type": "image/png", "size": len(buf.getvalue()),
                     "content": memoryview(buf.getvalue()),
                     "last_modified": datetime.datetime(2024, 1, 1)},)
    assert images[0].value != before and not status.value.startswith("error"), status.value


# ------------------------------------------------------------------------------------------------ quirks
def test_knn_agreement_against_brute_force():
    rng = np.random.default_rng(0)
    hist = rng.random((6, 4))
    hist /= hist.sum(1, keepdims=True)
    table = np.stack([np.r_[i, rng.permutation([j for j in range(6) if j != i])] for i in range(6)])
    brute = np.mean([sum(min(a, b) for a, b in zip(hist[i], hist[table[i, r]])) for i in range(6) for r in (1, 2)])
    assert quirks.knn_agreement(hist, table, 2) == pytest.approx(100 * brute)
    assert quirks.knn_agreement(hist, np.tile(np.arange(6)[:, None], (1, 3)), 2) == pytest.approx(100)
    with pytest.raises(StegoError, match="n_neighbors"):
        quirks.knn_agreement(hist, table, 6)


def test_knn_quirk_on_a_store(setup):
    with pytest.warns(UserWarning):
        out = quirks.knn_quirk(setup["train"], n_neighbors=3)
    assert 0 <= out["agreement_original"] <= 100 and 0 <= out["agreement_corrected"] <= 100
    assert 0 <= out["changed"] <= 100


def test_byte_difference_and_pos_embed():
    rng = np.random.default_rng(1)
    imgs = (rng.random((2, 8, 8, 3)) * 255).astype(np.uint8)
    out = quirks.byte_difference(imgs)
    assert out["corrected_exact"] and 0 < out["changed"] <= 100 and -1 <= out["mean_change"] < 0
    same = quirks.pos_embed_difference(6, 6, 8)
    assert same["relative_difference"] == 0 and same["cosine"] == pytest.approx(1)
    diff = quirks.pos_embed_difference(6, 9, 8)
    assert diff["relative_difference"] > 0.1
    assert quirks.prediction_change(np.array([1, 2, 3, 4]), np.array([1, 0, 3, 0])) == 50
