"""ONNX export and the ONNX Runtime backend: the probabilities, masks and reports of JAX."""

import csv
import json
import os

import jax
import numpy as np
import pytest
import tifffile
from flax import traverse_util

from configs import tiny
from resunet_jax import (
    backends,
    checkpointing,
    config_schema,
    errors,
    evaluate,
    export,
    models,
    predict,
    train,
)
from resunet_jax.data import lgg

SHIPPED = os.path.join(os.path.dirname(__file__), "..", "pretrained", "resunet_lgg")


def _perturbed(variables, seed):
    """`variables` with every parameter jittered and BatchNorm statistics made non-trivial
    (at initialisation they are the identity, which would hide a wrong BN folding)."""
    rng = np.random.default_rng(seed)
    flat = traverse_util.flatten_dict(jax.device_get(variables))
    for path, value in flat.items():
        if path[-1] == "var":
            flat[path] = rng.uniform(0.3, 2.0, value.shape).astype(np.float32)
        elif path[-1] == "mean":
            flat[path] = rng.normal(0.0, 0.3, value.shape).astype(np.float32)
        else:
            flat[path] = value + rng.normal(0.0, 0.1, value.shape).astype(np.float32)
    return traverse_util.unflatten_dict(flat)


def _checkpoint(path, seed=0, train_patients=("a",), data=None, **model):
    """Writes a tiny model like the shipped weights (params + BN statistics + meta).

    Args:
        path: checkpoint directory.
        seed: weights; also meta's step (10 + seed) and threshold (0.4 + seed / 10).
        train_patients: meta's training patients.
        data: `config.data` overrides.
        **model: `config.model` overrides.

    Returns:
        (`path` as a string, the run config).
    """
    config = tiny.get_config()
    config.model.detection_head = False
    config.model.update(model)
    config.data.update(data or {})
    state = train.create_train_state(
        jax.random.key(seed), config, models.create_model(config.model)
    )
    variables = _perturbed({"params": state.params, "batch_stats": state.batch_stats}, seed)
    meta = {
        "step": 10 + seed,
        "config": config_schema.config_json(config),
        "val_metrics": {"detection_threshold": 0.4 + seed / 10},
        "train_patients": list(train_patients),
    }
    checkpointing.export_model(str(path), variables, meta)
    return str(path), config


def _export(checkpoint, workdir, onnx_path=""):
    config = tiny.get_config()
    config.checkpoint = checkpoint
    config.export.path = onnx_path
    return export.export(config, str(workdir))


def _slices(tiny_data, n=6, channels=3):
    """Random slices and synthetic phantom slices (as model inputs, "scale"), [2n, 32, 32, C]."""
    rng = np.random.default_rng(0)
    random = rng.uniform(0.0, 1.0, (n, 32, 32, channels)).astype(np.float32)
    phantoms = [lgg.read_slice(s)[0] for s in lgg.discover(tiny_data)[:n]]
    phantoms = np.stack(phantoms).astype(np.float32) / 255.0
    return np.concatenate([random, np.tile(phantoms, (1, 1, 1, channels // 3))])


def _jax_probabilities(checkpoint, images):
    variables, meta = checkpointing.restore_model(checkpoint)
    model = models.create_model(meta["config"]["model"], axis_name=None)
    mask, tumor = jax.jit(lambda x: backends.infer(model, variables, x))(images)
    return np.asarray(mask[..., 0]), np.asarray(tumor)


def _assert_same_probabilities(onnx_path, checkpoint, images):
    model = backends.OnnxModel(onnx_path)
    want_mask, want_tumor = _jax_probabilities(checkpoint, images)
    for batch in (1, len(images)):  # the batch dimension is dynamic
        mask, tumor = model(images[:batch])
        assert mask.shape == want_mask[:batch].shape and tumor.shape == (batch,)
        np.testing.assert_allclose(mask, want_mask[:batch], rtol=0, atol=1e-4)
        np.testing.assert_allclose(tumor, want_tumor[:batch], rtol=0, atol=1e-4)
    return model


def test_exported_network_gives_the_jax_probabilities_and_its_card(tiny_data, tmp_path):
    checkpoint, _ = _checkpoint(tmp_path / "ckpt")
    path = _export(checkpoint, tmp_path / "work")
    assert path == str(tmp_path / "work" / "export" / "model.onnx")
    model = _assert_same_probabilities(path, checkpoint, _slices(tiny_data))
    assert model.meta["step"] == 10 and model.meta["train_patients"] == ["a"]
    assert model.card["input"]["shape"] == ["batch", 32, 32, 3]
    assert model.card["input"]["normalization"] == "scale"
    assert model.card["detection_threshold"] == 0.4 and "routing" not in model.card
    with open(tmp_path / "work" / "export" / "model.json") as f:
        assert json.load(f)["model_card"] == model.card
    # BatchNorm is folded into the convolutions it follows (inference form).
    import onnx

    ops = [n.op_type for n in onnx.load(path).graph.node]
    assert ops.count("BatchNormalization") == 2  # the stem's, after a ReLU
    # Each decoder level's nearest 2x upsampling is one Resize, not broadcast + reshape.
    assert ops.count("Resize") == len(tiny.get_config().model.features) + 1
    assert not {"Expand", "Reshape", "Shape"} & set(ops), sorted(set(ops))
    # The NHWC layout Transposes around each operation cancelled (OpenVINO runs the graph
    # twice as fast without them): one at the input, one before the outputs; and only
    # standard operators, none of ONNX Runtime's own.
    assert ops.count("Transpose") == 2
    assert {n.domain for n in onnx.load(path).graph.node} <= {"", "ai.onnx"}
    # On CPUs a batch runs as one part per thread: the probabilities of one run.
    images = _slices(tiny_data)[:5]
    whole, parts = backends.OnnxModel(path, threads=1), backends.OnnxModel(path, threads=3)
    for a, b in zip(whole(images), parts(images), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def test_exported_routed_pair_gives_the_jax_probabilities(tiny_data, tmp_path):
    complete, _ = _checkpoint(tmp_path / "complete", 0, ["a"])
    no_contrast, _ = _checkpoint(tmp_path / "no_contrast", 1, ["b"])
    variables, meta = checkpointing.join_no_contrast_expert(complete, no_contrast)
    checkpointing.export_model(str(tmp_path / "joined"), variables, meta)
    path = _export(str(tmp_path / "joined"), tmp_path / "work")
    images = _slices(tiny_data)
    images[::2, ..., 0] = images[::2, ..., 1]  # every other slice without its pre-contrast
    model = _assert_same_probabilities(path, str(tmp_path / "joined"), images)
    assert "routing" in model.card and model.meta["train_patients"] == ["a", "b"]
    # Both networks are in the graph: the routed slices get the no-contrast network's.
    _, alone = _jax_probabilities(complete, images)
    _, expert = _jax_probabilities(no_contrast, images)
    _, joined = model(images)
    np.testing.assert_allclose(joined[::2], expert[::2], atol=1e-4)
    np.testing.assert_allclose(joined[1::2], alone[1::2], atol=1e-4)
    assert np.abs(expert - alone).max() > 1e-2


def test_another_config_exports_detection_head_deep_supervision_context(tiny_data, tmp_path):
    checkpoint, _ = _checkpoint(
        tmp_path / "ckpt", data={"context_slices": 1}, detection_head=True, deep_supervision=1
    )
    path = _export(checkpoint, tmp_path / "work")
    model = _assert_same_probabilities(path, checkpoint, _slices(tiny_data, channels=9))
    assert model.card["input"]["shape"] == ["batch", 32, 32, 9]
    assert model.card["input"]["channels"][3:6] == ["pre-contrast", "FLAIR", "post-contrast"]


def _predict_inputs(folder):
    rng = np.random.default_rng(1)
    os.makedirs(folder / "patient")
    tifffile.imwrite(folder / "patient" / "gray_2.tif", rng.integers(0, 256, (32, 32), np.uint8))
    tifffile.imwrite(folder / "patient" / "rgb_3.tif", rng.integers(0, 256, (32, 32, 3), np.uint8))
    tifffile.imwrite(folder / "patient" / "odd_4.tif", rng.integers(0, 256, (50, 37, 3), np.uint8))
    (folder / "patient" / "broken_5.tif").write_bytes(b"II*\x00garbage")


def _read_predictions(workdir):
    out = workdir / "predict"
    with open(out / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    masks = {r["file"]: tifffile.imread(r["mask_file"]) for r in rows if r["mask_file"]}
    for r in rows:
        r["mask_file"] = os.path.relpath(r["mask_file"], out) if r["mask_file"] else ""
    return rows, masks


def _assert_same_predictions(expected, got):
    """Two `_read_predictions` results agree: rows equal (tumour probabilities within
    1e-5), masks identical."""
    (expected_rows, expected_masks), (rows, masks) = expected, got
    for a, b in zip(expected_rows, rows, strict=True):
        assert float(a.pop("tumor_probability") or 0) == pytest.approx(
            float(b.pop("tumor_probability") or 0), abs=1e-5
        )
        assert a == b
    assert expected_masks.keys() == masks.keys()
    for name, mask in expected_masks.items():
        np.testing.assert_array_equal(masks[name], mask)


def test_predict_on_onnx_runtime_writes_the_masks_and_csv_of_jax(tmp_path):
    checkpoint, _ = _checkpoint(tmp_path / "ckpt", 2)  # threshold 0.6: some slices gated
    _export(checkpoint, tmp_path / "unused", str(tmp_path / "ckpt" / "model.onnx"))
    _predict_inputs(tmp_path / "in")
    results = {}
    for backend in ("jax", "onnx"):
        config = tiny.get_config()
        config.checkpoint = checkpoint  # the folder holds both the checkpoint and model.onnx
        config.predict.input = str(tmp_path / "in")
        config.inference.backend = backend
        predict.predict(config, str(tmp_path / backend))
        results[backend] = _read_predictions(tmp_path / backend)
    jax_rows = results["jax"][0]
    assert len(jax_rows) == 4 and sum(bool(r["error"]) for r in jax_rows) == 1
    _assert_same_predictions(results["jax"], results["onnx"])


def test_eval_on_onnx_runtime_gives_the_jax_metrics(tiny_data, tmp_path):
    checkpoint, _ = _checkpoint(tmp_path / "ckpt")
    _export(checkpoint, tmp_path / "ckpt")  # a workdir's export/model.onnx
    summaries = {}
    for backend in ("jax", "onnx"):
        config = tiny.get_config()
        config.data.dir = tiny_data
        config.data.prepared_dir = str(tmp_path / "prepared")
        config.eval.split = "all"
        config.checkpoint = checkpoint
        config.inference.backend = backend
        summaries[backend] = evaluate.evaluate_checkpoint(config, str(tmp_path / backend))
        assert os.path.exists(tmp_path / backend / "eval" / "metrics.json")
    assert summaries["onnx"].pop("backend") == "onnx"
    assert summaries["jax"].pop("backend") == "jax"
    assert summaries["onnx"] == summaries["jax"]  # both f32


def test_onnx_backend_errors_name_the_fix(tmp_path):
    checkpoint, config = _checkpoint(tmp_path / "ckpt")
    config.checkpoint = checkpoint
    config.inference.backend = "onnx"
    with pytest.raises(errors.CheckpointError, match="--mode=export"):
        backends.restore(checkpoint, "onnx")
    config.inference.backend = "tensorrt"
    with pytest.raises(errors.ConfigError, match="inference.backend='tensorrt': must be one of"):
        config_schema.validate(config, "eval")
    config.inference.backend = "onnx"
    with pytest.raises(errors.ConfigError, match="training validates its own weights"):
        config_schema.validate(config, "train")


def test_export_to_a_folder_keeps_the_weights_and_meta_alone(tmp_path):
    """A training checkpoint (weights, their average, optimizer state) exported to a
    folder restores the same model variables and meta, without the rest, and is one
    model where `config.checkpoint` is read."""
    config = tiny.get_config()
    state = train.create_train_state(jax.random.key(0), config, models.create_model(config.model))
    saver = checkpointing.Checkpointer(str(tmp_path / "run"), keep=1)
    saver.save(state, {"step": 0, "config": config_schema.config_json(config)})
    saver.close()
    out = str(tmp_path / "shared" / "fold_1")
    config.export.path = out
    config_schema.validate(config, "export")
    assert export.export(config, str(tmp_path / "run")) == out
    (want, want_meta), (got, got_meta) = map(
        checkpointing.restore_model, (str(tmp_path / "run"), out)
    )
    assert got_meta == want_meta
    jax.tree.map(np.testing.assert_array_equal, got, want)

    def size(folder):
        return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())

    assert size(tmp_path / "shared") < size(tmp_path / "run") / 2  # no optimizer state
    assert backends.model_paths(str(tmp_path / "shared")) == [out]
    with pytest.raises(errors.ConfigError, match="exists; a checkpoint export writes a new"):
        config_schema.validate(config, "export")


def test_shipped_onnx_is_the_shipped_checkpoint(tiny_data):
    """pretrained/resunet_lgg/model.onnx is the export of the checkpoint beside it."""
    model = backends.OnnxModel(backends.find_onnx(SHIPPED))
    _, meta = checkpointing.restore_model(SHIPPED)
    assert model.meta == meta
    assert model.card["detection_threshold"] == meta["val_metrics"]["detection_threshold"]
    phantoms = np.stack([lgg.read_slice(s)[0] for s in lgg.discover(tiny_data)[:4]])
    images = np.asarray(jax.image.resize(phantoms / 255.0, (4, 128, 128, 3), "linear"))
    images = images.astype(np.float32)
    images[2:, ..., 0] = images[2:, ..., 1]  # routed to the no-contrast network
    _assert_same_probabilities(model.path, SHIPPED, images)
