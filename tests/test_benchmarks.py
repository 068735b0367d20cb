"""The scripts under benchmarks/ run: valid JSON, real training and export (no timing asserted)."""

import glob
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args):
    proc = subprocess.run(
        [sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def test_speed_prints_the_torch_script_schema():
    args = ["--batch", "4", "--sizes", "32,64", "--steps", "1", "--backends", "jax,onnx"]
    rows = _run("benchmarks/speed.py", *args)
    assert [(r["impl"], r["size"]) for r in rows] == [
        ("jax", 32),
        ("onnxruntime", 32),
        ("jax", 64),
        ("onnxruntime", 64),
    ]
    for r in rows:
        assert r["params"] == 1_206_129 and r["batch"] == 4 and r["infer_images_per_s"] > 0
    assert all(r["train_images_per_s"] > 0 for r in rows if r["impl"] == "jax")


def test_input_pipeline_benchmark_reports_images_per_second():
    (row,) = _run(
        "benchmarks/input_pipeline.py", "--image_size", "32", "--batch", "8", "--batches", "2"
    )
    assert row["images_per_s"] > 0 and row["image_size"] == 32


def _train_on_device():
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    import train_on_device

    return train_on_device


def test_train_on_device_augment_flips_image_and_mask_together(tiny_data, tmp_path):
    import jax
    import ml_collections
    import numpy as np
    import tensorflow as tf

    from resunet_jax import input_pipeline

    tod = _train_on_device()
    tod.pack(tiny_data, str(tmp_path), "tiny")
    data = tod.unpack(sorted(glob.glob(str(tmp_path / "*.npz"))))
    images, masks = data["images"][:16], data["masks"][:16]
    off = dict(flip=False, rotate_degrees=0.0, scale=0.0, intensity=0.0, gamma=0.0)
    out = tod.augment(jax.random.key(0), images, masks, ml_collections.ConfigDict(off))
    np.testing.assert_allclose(out["image"], images / 255.0, atol=1e-6)
    np.testing.assert_array_equal(out["mask"], masks)
    flip_only = ml_collections.ConfigDict({**off, "flip": True})
    out = tod.augment(jax.random.key(0), images, masks, flip_only)
    mirrored = [
        np.allclose(o, i[:, ::-1] / 255.0, atol=1e-6)
        for o, i in zip(out["image"], images, strict=True)
    ]
    assert 0 < sum(mirrored) < len(images)  # some slices flipped, some not
    for o, m, flipped in zip(out["mask"], masks, mirrored, strict=True):
        np.testing.assert_array_equal(o, m[:, ::-1] if flipped else m)
    # Every slice loses its pre-contrast, its post-contrast or both to the FLAIR.
    dropping = ml_collections.ConfigDict({**off, "missing_sequences": 1.0})
    out = np.asarray(tod.augment(jax.random.key(0), images, masks, dropping)["image"])
    flair = images[..., 1] / 255.0
    pre = [np.allclose(o[..., 0], f, atol=1e-6) for o, f in zip(out, flair, strict=True)]
    post = [np.allclose(o[..., 2], f, atol=1e-6) for o, f in zip(out, flair, strict=True)]
    np.testing.assert_allclose(out[..., 1], flair, atol=1e-6)
    assert all(np.logical_or(pre, post)) and sum(pre) < 16 and sum(post) < 16
    # Every slice receives the next one's tumour, as input_pipeline.paste_tumours does,
    # not on a background dimmer than the head level (the phantoms' is 0, real scans' not).
    assert tod.HEAD_LEVEL == input_pipeline.HEAD_LEVEL
    images = np.where(images == 0, np.uint8(tod.HEAD_LEVEL), images)
    pasting = ml_collections.ConfigDict({**off, "tumor_paste": 1.0})
    out = tod.augment(jax.random.key(0), images, masks, pasting)
    slices = np.concatenate([images, masks], -1).astype(np.float32)
    want = input_pipeline.paste_tumours(tf.constant(slices), tf.constant([True] * 16)).numpy()
    assert (want[..., -1] > masks[..., 0]).any()  # some slice gained tumour pixels
    np.testing.assert_allclose(out["image"], want[..., :-1] / 255.0, atol=1e-6)
    np.testing.assert_array_equal(out["mask"][..., 0], want[..., -1] >= 0.5)


def test_train_on_device_packs_losslessly_trains_and_exports(tiny_data, tmp_path):
    import argparse

    import numpy as np

    from resunet_jax import checkpointing
    from resunet_jax.data import lgg

    tod = _train_on_device()
    tod.pack(tiny_data, str(tmp_path / "pack"), "tiny")
    data = tod.unpack(sorted(glob.glob(str(tmp_path / "pack" / "*.npz"))))
    slices = lgg.discover(tiny_data)
    assert len(data["images"]) == len(slices) and sorted(set(data["fold"])) == [0, 1, 2]
    for s, image, mask in zip(slices, data["images"], data["masks"], strict=True):
        np.testing.assert_array_equal(image, lgg.read_image(s.image_path))
        np.testing.assert_array_equal(mask[..., 0], lgg.read_mask(s.mask_path))

    weights = str(tmp_path / "fold0.npz")
    tod.train(
        argparse.Namespace(
            pack=str(tmp_path / "pack"), config="tiny", fold=0, seconds=2.0, val_seconds=1.0,
            batch=4, lr=1e-3, dtype="float32", out=weights, log="", last=False,
            # One level deeper than configs/tiny.py, with 2.5-D input.
            set=["model.features=(8,16,16)", "data.context_slices=1"],
        )
    )  # fmt: skip
    meta = json.loads(str(np.load(weights)["meta"]))
    assert not [k for k in np.load(weights).files if k.startswith("last.")]  # --no-last
    assert meta["steps"] > 0 and 0.0 <= meta["best"]["dice_mean"] <= 1.0
    export_args = argparse.Namespace(
        weights=weights, which="best", data_dir=tiny_data, out=str(tmp_path / "model")
    )
    with pytest.raises(SystemExit, match="holds no 'last' weights"):
        tod.export(argparse.Namespace(**{**vars(export_args), "which": "last"}))
    tod.export(export_args)
    with pytest.raises(SystemExit, match="already exists"):
        tod.export(export_args)  # an earlier export is never overwritten
    variables, saved = checkpointing.restore_model(str(tmp_path / "model"))
    assert saved["step"] == meta["best_step"] and saved["val_metrics"]["num_patients"] == 2
    np.testing.assert_array_equal(
        variables["params"]["head"]["kernel"], np.load(weights)["best.params.head.kernel"]
    )
    assert "encoder2" in variables["params"]  # the overrides travelled to the export
    assert saved["config"]["model"]["features"] == [8, 16, 16]
    assert saved["config"]["data"]["context_slices"] == 1
    assert variables["params"]["stem_conv1"]["kernel"].shape[2] == 9


def test_train_on_device_set_refuses_unknown_fields_and_wrong_types():
    tod = _train_on_device()
    config = tod._config("tiny", ["model.features=(8,16,16)", "augment.rotate_degrees=30"])
    assert config.model.features == (8, 16, 16) and config.augment.rotate_degrees == 30.0
    with pytest.raises(SystemExit, match="no field model.featurez"):
        tod._config("tiny", ["model.featurez=(8,)"])
    with pytest.raises(SystemExit, match="augment.flip=3"):
        tod._config("tiny", ["augment.flip=3"])
    with pytest.raises(SystemExit, match="expected FIELD=VALUE"):
        tod._config("tiny", ["seed"])
