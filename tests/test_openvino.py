"""The OpenVINO backend (f32, bf16, INT8), backend "auto", and a routed pair's graph run
one network per slice: the probabilities, masks and reports of JAX."""

import csv
import json
import os

import numpy as np
import onnx
import pytest
from test_export import (
    _assert_same_predictions,
    _checkpoint,
    _export,
    _jax_probabilities,
    _predict_inputs,
    _read_predictions,
    _slices,
)

from configs import tiny
from resunet_jax import backends, checkpointing, config_schema, errors, evaluate, export, predict
from resunet_jax.data import sources

# Tolerances on the probabilities of the tiny test models (perturbed random weights),
# against JAX in f32. f32: OpenVINO's kernels sum in another order, ~1e-6 measured.
# bf16: 8 mantissa bits round each convolution's inputs by up to 2^-9 relative; on three
# tiny models the largest pixel difference measured was 0.018 and the mean 0.002
# (phantom and random slices), hence 0.05 and 0.005.
BF16_MAX, BF16_MEAN = 0.05, 0.005
# INT8 rounds every activation to one of 256 levels of its tensor's calibrated range,
# coarse for networks of 4 to 16 channels with random weights: on the phantom slices of
# three such (calibrated on their own training patients) the mean pixel difference
# measured was 0.0035-0.0099 and single pixels up to 0.10, hence 0.025 for the mean.
# It checks that the quantized graph is this model's; its accuracy is measured on the
# shipped model (benchmarks/README.md: per-volume Dice within 0.0015 of f32).
INT8_MEAN = 0.025


def _train_ids(tiny_data):
    return sorted(d for d in os.listdir(tiny_data) if os.path.isdir(os.path.join(tiny_data, d)))


def _routed(tmp_path, train_ids=("a",)):
    """A routed pair of two tiny networks (seeds 0 and 1), its graph, and the two."""
    complete, _ = _checkpoint(tmp_path / "complete", 0, list(train_ids))
    no_contrast, _ = _checkpoint(tmp_path / "no_contrast", 1, list(train_ids))
    variables, meta = checkpointing.join_no_contrast_expert(complete, no_contrast)
    checkpointing.export_model(str(tmp_path / "joined"), variables, meta)
    return str(tmp_path / "joined"), complete, no_contrast


def test_openvino_f32_and_bf16_give_the_jax_probabilities(tiny_data, tmp_path):
    checkpoint, _ = _checkpoint(tmp_path / "ckpt")
    path = _export(checkpoint, tmp_path / "work")
    images = _slices(tiny_data)
    want_mask, want_tumor = _jax_probabilities(checkpoint, images)
    f32 = backends.OpenvinoModel(path, "f32")
    assert f32.precision == "f32" and f32.backend == "openvino" and f32.meta["step"] == 10
    for batch in (1, 5, len(images)):  # dynamic batch, split over the streams
        mask, tumor = f32(images[:batch])
        assert mask.shape == want_mask[:batch].shape and tumor.shape == (batch,)
        np.testing.assert_allclose(mask, want_mask[:batch], rtol=0, atol=1e-4)
        np.testing.assert_allclose(tumor, want_tumor[:batch], rtol=0, atol=1e-4)
    if backends.cpu_float_precision() != "bf16":
        with pytest.raises(errors.ConfigError, match="no bfloat16"):
            backends.OpenvinoModel(path, "bf16")
        assert backends.OpenvinoModel(path, "auto").precision == "f32"
        return
    bf16 = backends.OpenvinoModel(path, "auto")
    assert bf16.precision == "bf16"
    mask, tumor = bf16(images)
    assert np.abs(mask - want_mask).max() <= BF16_MAX
    assert np.abs(mask - want_mask).mean() <= BF16_MEAN
    assert np.abs(tumor - want_tumor).max() <= BF16_MAX


def test_routed_pair_runs_each_network_on_its_own_slices(tiny_data, tmp_path, monkeypatch):
    joined, complete, no_contrast = _routed(tmp_path)
    path = _export(joined, tmp_path / "work")
    images = _slices(tiny_data)
    images[::2, ..., 0] = images[::2, ..., 1]  # every other slice without its pre-contrast
    routed = np.arange(len(images)) % 2 == 0
    alone_mask, alone = _jax_probabilities(complete, images)
    expert_mask, expert = _jax_probabilities(no_contrast, images)
    # The graph of each network has one network's convolutions: half of the joined graph's.
    proto = onnx.load(path)
    networks = backends.routed_networks(proto)
    convolutions = {k: [n.op_type for n in g.graph.node].count("Conv") for k, g in networks.items()}
    joined_convolutions = [n.op_type for n in proto.graph.node].count("Conv")
    assert convolutions == {
        "complete": joined_convolutions // 2,
        "no_contrast": joined_convolutions // 2,
    }
    for model in (backends.OnnxModel(path), backends.OpenvinoModel(path, "f32")):
        ran = []
        infer = model._infer
        monkeypatch.setattr(
            model, "_infer", lambda name, x, f=infer, ran=ran: ran.append((name, x)) or f(name, x)
        )
        mask, tumor = model(images)
        # Each slice runs once, in its own network: the cost of one network per slice.
        assert [name for name, _ in ran] == ["complete", "no_contrast"]
        np.testing.assert_array_equal(ran[0][1], images[~routed])
        np.testing.assert_array_equal(ran[1][1], images[routed])
        np.testing.assert_allclose(tumor[routed], expert[routed], atol=1e-4)
        np.testing.assert_allclose(tumor[~routed], alone[~routed], atol=1e-4)
        np.testing.assert_allclose(mask[routed], expert_mask[routed], atol=1e-4)
        np.testing.assert_allclose(mask[~routed], alone_mask[~routed], atol=1e-4)
        ran.clear()
        model(images[1::2])  # no slice routed to the expert: it does not run
        assert [name for name, _ in ran] == ["complete"]
    assert np.abs(expert - alone).max() > 1e-2


def test_int8_export_calibrates_on_training_patients_and_runs(tiny_data, tmp_path, monkeypatch):
    train_ids = _train_ids(tiny_data)[:4]
    joined, _, _ = _routed(tmp_path, train_ids)
    config = tiny.get_config()
    config.checkpoint = joined
    config.data.dir = tiny_data
    config.data.prepared_dir = str(tmp_path / "prepared")
    config.export.int8 = True
    config.export.calibration_slices = 10
    calibrated = []
    write_int8 = export.write_int8
    monkeypatch.setattr(export, "write_int8", lambda p, x: calibrated.append(x) or write_int8(p, x))
    path = export.export(config, str(tmp_path / "work"))
    quantized = backends.find_onnx(str(tmp_path / "work"), int8=True)
    assert quantized == backends.int8_path(path) and os.path.isfile(quantized)
    # The calibration slices are the training patients' (never the two scored ones),
    # every other one without its pre-contrast, for the no-contrast network.
    _, meta = checkpointing.restore_model(joined)
    run_config = config_schema.checkpoint_config(config, meta)
    source = sources.open_source(run_config, str(tmp_path / "work"), split=False)
    evaluator = evaluate.Evaluator(source, run_config, train_ids)
    (images,) = calibrated
    assert sorted(images) == ["complete", "no_contrast"]
    rows = np.linspace(0, len(evaluator.slices["image"]) - 1, 10).round().astype(int)
    np.testing.assert_array_equal(images["complete"], evaluator.inputs(rows))
    no_contrast = images["no_contrast"]
    np.testing.assert_array_equal(no_contrast[..., 0], no_contrast[..., 1])
    np.testing.assert_array_equal(no_contrast[..., 1:], images["complete"][..., 1:])
    model = backends.restore(str(tmp_path / "work"), "openvino", precision="int8")
    assert model.precision == "int8" and model.meta == meta
    assert "INT8" in model.card["quantization"] and "routing" in model.card
    # Each network quantized: OpenVINO runs every convolution of both in 8-bit integers.
    for network in model.networks.values():
        runtime = network[0].get_compiled_model().get_runtime_model()
        info = [op.get_rt_info() for op in runtime.get_ops()]
        precisions = {
            i["runtimePrecision"].astype(str)
            for i in info
            if i["layerType"].astype(str) == "Convolution"
        }
        assert precisions <= {"u8", "i8"}, precisions
    # precision auto takes the INT8 model where it was exported.
    assert backends.restore(str(tmp_path / "work"), "openvino").precision == "int8"
    slices = _slices(tiny_data)[6:]  # phantoms: inputs like the calibration slices
    slices[::2, ..., 0] = slices[::2, ..., 1]  # routed to the no-contrast network
    want, _ = backends.OpenvinoModel(path, "f32")(slices)
    got, _ = model(slices)
    assert np.abs(got - want).mean() <= INT8_MEAN


def test_int8_and_precision_errors_name_the_fix(tiny_data, tmp_path):
    checkpoint, config = _checkpoint(tmp_path / "ckpt", train_patients=["nobody"])
    path = _export(checkpoint, tmp_path / "work")
    with pytest.raises(errors.CheckpointError, match=r"model.int8.xml.*export.int8=True"):
        backends.restore(path, "openvino", precision="int8")
    with pytest.raises(errors.ConfigError, match="runs on inference.backend=openvino"):
        backends.restore(path, "onnx", precision="int8")
    config.inference.backend, config.inference.precision = "onnx", "bf16"
    with pytest.raises(errors.ConfigError, match="inference.precision='bf16': runs on"):
        config_schema.validate(config, "eval")
    config.inference.backend = "openvino"
    with pytest.raises(errors.ConfigError, match="training validates its own weights"):
        config_schema.validate(config, "train")
    config.checkpoint, config.data.dir, config.export.int8 = checkpoint, tiny_data, True
    config.data.prepared_dir = str(tmp_path / "prepared")
    with pytest.raises(errors.DataError, match="none of the checkpoint's 1 training patients"):
        export.export(config, str(tmp_path / "work2"))
    garbled = tmp_path / "garbled.onnx"
    garbled.write_bytes(b"\x08\x07garbage")
    with pytest.raises(errors.CheckpointError, match=f"{garbled}: not a readable ONNX model"):
        backends.OpenvinoModel(str(garbled))


def test_auto_is_openvino_where_there_is_a_graph_else_jax(tmp_path):
    checkpoint, _ = _checkpoint(tmp_path / "ckpt")
    assert backends.resolve_backend("auto", checkpoint) == "jax"  # no graph to run
    assert backends.restore(checkpoint, "auto").backend == "jax"
    _export(checkpoint, tmp_path / "ckpt")  # the workdir's export/model.onnx
    assert backends.resolve_backend("auto", checkpoint) == "openvino"
    assert backends.resolve_backend("onnx", checkpoint) == "onnx"
    model = backends.restore(checkpoint, "auto")
    assert model.backend == "openvino" and model.precision == backends.cpu_float_precision()
    # A graph of another step than the checkpoint's (training went on) is not run.
    with open(tmp_path / "ckpt" / "export" / "model.json") as f:
        card = json.load(f)
    card["meta"]["step"] += 1
    with open(tmp_path / "ckpt" / "export" / "model.json", "w") as f:
        json.dump(card, f)
    assert backends.resolve_backend("auto", checkpoint) == "jax"


def test_predict_and_eval_on_openvino_write_the_jax_masks_csv_and_metrics(tiny_data, tmp_path):
    checkpoint, _ = _checkpoint(tmp_path / "ckpt", 2)  # threshold 0.6: some slices gated
    _export(checkpoint, tmp_path / "ckpt")
    _predict_inputs(tmp_path / "in")
    results, summaries = {}, {}
    for backend in ("jax", "openvino"):
        config = tiny.get_config()
        config.checkpoint = checkpoint
        config.inference.backend, config.inference.precision = backend, "f32"
        config.predict.input = str(tmp_path / "in")
        predict.predict(config, str(tmp_path / backend))
        results[backend] = _read_predictions(tmp_path / backend)
        with open(tmp_path / backend / "predict" / "patients.csv") as f:
            (patient,) = list(csv.DictReader(f))
        assert (patient["backend"], patient["precision"]) == (backend, "f32")
        with open(tmp_path / backend / "predict" / "patients.json") as f:
            assert json.load(f)[0]["backend"] == backend
        config.data.dir = tiny_data
        config.data.prepared_dir = str(tmp_path / "prepared")
        config.eval.split = "all"
        summaries[backend] = evaluate.evaluate_checkpoint(config, str(tmp_path / backend))
        with open(tmp_path / backend / "eval" / "metrics.json") as f:
            written = json.load(f)
        assert (written["backend"], written["precision"]) == (backend, "f32")
    _assert_same_predictions(results["jax"], results["openvino"])
    assert summaries["openvino"].pop("backend") == "openvino"
    assert summaries["jax"].pop("backend") == "jax"
    assert summaries["openvino"] == summaries["jax"]
