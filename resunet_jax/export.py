"""ONNX export of a checkpoint's inference network, and ONNX Runtime as a predict backend.

`--mode=export` writes the model of a checkpoint (`config.checkpoint`, else the
workdir's best) to `WORKDIR/export/model.onnx` (or `export.path`; a path without .onnx
gets the variables alone, as an orbax checkpoint folder): one graph from
normalised model inputs [b, S, S, C] float32 (NHWC, batch dynamic) to the pixel tumour
probabilities [b, S, S] ("mask") and the slice tumour probabilities [b] ("tumor"),
BatchNorm in inference form, and with `model.no_contrast_expert` both networks and
their per-slice routing by the pre-contrast channel (models.NoContrastRouted). What the
graph expects and how to read its outputs (input size and channels, normalisation,
detection threshold) and the checkpoint's meta (config, step, validation metrics,
training patients) are in its metadata_props, and in a JSON beside it for reading
without ONNX.

With `export.int8`, it also writes that graph's INT8 post-training quantization
(NNCF), `model.int8.xml` (OpenVINO IR) beside it (`write_int8`), calibrated on slices
of the checkpoint's training patients.

With `inference.backend=onnx`, eval and predict run that graph on ONNX Runtime instead
of the JAX model (`backends.OnnxModel`); with `inference.backend=openvino` on OpenVINO,
in bf16 where the CPU has it, f32, or (`inference.precision=int8`) the INT8 graph
(`backends.OpenvinoModel`).
"""

import contextlib
import io
import json
import logging as pylogging
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from resunet_jax import backends, checkpointing, config_schema, errors, evaluate, inputs, models
from resunet_jax.data import sources
from resunet_jax.workdir import atomic_write

CHANNELS = ("pre-contrast", "FLAIR", "post-contrast")
NORMALIZATION = {
    "scale": "x / 255 per channel",
    "slice": "each channel z-scored by the slice's mean and std",
    "volume": "each channel z-scored by its patient's brain-pixel mean and std",
}


def model_card(meta: dict) -> dict:
    """What a user of the exported graph needs besides it: preprocessing, outputs, rules.

    Args:
        meta: the checkpoint's meta ("config", "step", "val_metrics", ...).
    """
    data, model = meta["config"]["data"], meta["config"]["model"]
    size, k = data["image_size"], data.get("context_slices", 0)
    card = {
        "input": {
            "name": backends.INPUT_NAME,
            "shape": ["batch", size, size, models.input_channels(data)],
            "dtype": "float32",
            "layout": "NHWC",
            "channels": list(CHANNELS) * (2 * k + 1),
            "context_slices": k,
            "image_size": size,
            "resize": f"each slice bilinearly resized to {size}x{size}; the mask "
            "probabilities bilinearly resized back to the slice's size",
            "normalization": data["normalization"],
            "normalization_rule": NORMALIZATION[data["normalization"]],
            "missing_sequence": "a sequence not acquired is filled with the FLAIR",
        },
        "outputs": {
            "mask": "[batch, S, S] float32 pixel tumour probability; tumour where >= 0.5",
            "tumor": "[batch] float32 slice tumour probability",
        },
        "detection_threshold": backends.detection_threshold(meta),
        "detection_rule": "a slice whose tumor probability is below detection_threshold "
        "gets an empty mask",
        "step": int(meta["step"]),
    }
    if model.get("no_contrast_expert", False):
        card["routing"] = (
            "two networks; a slice whose pre-contrast channel equals its FLAIR (to 1e-3 of "
            "its scale) is predicted by the no-contrast network, every other by the "
            "complete network (both inside the graph)"
        )
    return card


def export(config, workdir: str) -> str:
    """Writes the checkpoint's model for sharing (`--mode=export`).

    The checkpoint is `config.checkpoint`, else the workdir's best (else latest). An
    `export.path` ending in .onnx (the default, WORKDIR/export/model.onnx) gets the ONNX
    graph and a JSON beside it (`write_onnx`), and with `export.int8` its INT8
    quantization beside it (`write_int8`, calibrated on `calibration_inputs`); any other
    path is a folder that gets the model's variables and meta alone, without optimizer
    state or other steps, as pretrained/ holds them (a third of a training checkpoint's
    size; restorable wherever `config.checkpoint` is read).

    Returns:
        The path written.

    Raises:
        errors.CheckpointError: no checkpoint at the path.
        errors.DataError: with `export.int8`, no training patient of the checkpoint under
            `data.dir` to calibrate on.
    """
    path = config.checkpoint or workdir
    out = config.export.path or os.path.join(workdir, "export", backends.ONNX_NAME)
    variables, meta = checkpointing.restore_model(path)
    if out.endswith(".onnx"):
        write_onnx(variables, meta, out)
        if config.export.get("int8", False):
            write_int8(out, calibration_inputs(config, workdir, meta))
    else:
        checkpointing.export_model(out, variables, meta)
    logging.info("Exported %s step %d to %s", path, int(meta["step"]), out)
    return out


def write_onnx(variables: dict, meta: dict, path: str):
    """Writes a model as `path` (.onnx, `to_onnx`) with its meta and card in the
    metadata_props, and both as JSON beside it (`path` with .json for .onnx).

    Args:
        variables: {"params", "batch_stats"}.
        meta: the checkpoint's meta; its "config" defines the model and its input.
        path: the .onnx to write.
    """
    import onnx

    proto = to_onnx(variables, meta)
    card = model_card(meta)
    onnx.helper.set_model_props(
        proto, {backends.META_KEY: json.dumps(meta), backends.CARD_KEY: json.dumps(card)}
    )
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_write(path, "wb") as f:
        onnx.save(proto, f)
    with atomic_write(path[: -len(".onnx")] + ".json") as f:
        json.dump({"model_card": card, "meta": meta}, f, indent=2)


def calibration_inputs(config, workdir: str, meta: dict) -> dict:
    """Model inputs of the checkpoint's training patients, to calibrate its quantization.

    Never the patients it is scored on: the slices are `export.calibration_slices` of
    its training patients' (`meta["train_patients"]`) found under `data.dir`, evenly
    spaced over them in patient then slice order (tumour and tumour-free slices alike),
    made as eval makes them (`evaluate.Evaluator`). A routed pair's no-contrast network
    is calibrated on the same slices routed to it: their pre-contrast replaced by the
    FLAIR (`eval.missing_sequences=pre`).

    Args:
        config: the run config (`data.dir`, `export.calibration_slices`).
        workdir: the run directory (synthetic data are generated there).
        meta: the checkpoint's meta.

    Returns:
        {network name: [n, S, S, C] float32 model inputs}, the names of
        `backends.GraphModel.networks` ("network", or "complete" and "no_contrast").

    Raises:
        errors.DataError: none of the training patients is under `data.dir`.
    """
    config = config_schema.checkpoint_config(config, meta)
    source = sources.open_source(config, workdir, split=False)
    train_ids = sorted(set(meta.get("train_patients", ())) & set(source.patient_ids))
    if not train_ids:
        raise errors.DataError(
            f"{source.data_dir}: none of the checkpoint's {len(meta.get('train_patients', ()))} "
            "training patients is here; --config.export.int8 calibrates on them, so "
            "--config.data.dir must be the data it was trained on"
        )
    evaluator = evaluate.Evaluator(source, config, train_ids)
    count = len(evaluator.slices["image"])
    rows = np.unique(np.linspace(0, count - 1, min(config.export.calibration_slices, count)))
    rows = rows.round().astype(int)
    logging.info(
        "Calibrating the INT8 quantization on %d slices of %d training patients",
        len(rows),
        len(train_ids),
    )
    if not meta["config"]["model"].get("no_contrast_expert", False):
        return {"network": evaluator.inputs(rows)}
    images = {"complete": evaluator.inputs(rows)}
    evaluator.missing = np.array(inputs.MISSING_SEQUENCES["pre"])
    images["no_contrast"] = evaluator.inputs(rows)
    return images


def write_int8(path: str, calibration: dict) -> str:
    """Writes the INT8 post-training quantization of the exported graph `path`.

    Each network (both of a routed pair, `backends.routed_networks`, each calibrated on
    its own slices) is quantized by NNCF on OpenVINO (its ONNX backend's results were
    several times further from f32 here): the mixed preset, weights per channel
    (symmetric) and activations per tensor (asymmetric) in INT8, ranges from the
    activations on the calibration slices, each convolution's bias corrected for the
    shift quantization causes. Written as OpenVINO IR (FakeQuantize before each convolution, which
    OpenVINO's CPU plugin runs as INT8 convolutions), the graph's meta and card in its
    rt_info (`backends.IR_META_KEY`), the card noting the quantization; a routed pair's
    networks side by side in one model, each with its own input and outputs named
    "<name>.<network>" (`backends.OpenvinoModel` runs each on its own slices).

    Args:
        path: the .onnx that `write_onnx` wrote.
        calibration: {network name: [n, S, S, C] float32 inputs} (`calibration_inputs`).

    Returns:
        The path written (`backends.int8_path`; a .bin beside it holds the weights).
    """
    import nncf
    import onnx
    import openvino as ov

    proto = onnx.load(path)
    props = {p.key: p.value for p in proto.metadata_props}
    card = json.loads(props[backends.CARD_KEY])
    graphs = backends.routed_networks(proto) if "routing" in card else {"network": proto}
    core = ov.Core()
    quantized = {}
    for name, graph in graphs.items():
        images = calibration[name]
        dataset = nncf.Dataset(images, lambda image: image[None])
        network = core.read_model(graph.SerializeToString())
        # Mixed: activations asymmetric (post-ReLU ranges are one-sided); on the shipped
        # model it lost 0.0014 per-volume Dice against 0.0053 with the default symmetric.
        preset = nncf.QuantizationPreset.MIXED
        quantized[name] = nncf.quantize(network, dataset, preset=preset, subset_size=len(images))
        if len(graphs) > 1:
            network = quantized[name]
            network.input(0).get_tensor().set_names({f"{backends.INPUT_NAME}.{name}"})
            for output, output_name in zip(network.outputs, backends.OUTPUT_NAMES, strict=True):
                output.get_tensor().set_names({f"{output_name}.{name}"})
    model = quantized.get("network") or ov.Model(
        [r for m in quantized.values() for r in m.get_results()],
        [p for m in quantized.values() for p in m.get_parameters()],
        "resunet",
    )
    slices = ", ".join(f"{len(images)} for {name}" for name, images in calibration.items())
    card["quantization"] = (
        f"INT8 (NNCF {nncf.__version__} post-training quantization on OpenVINO, "
        f"calibrated on training slices: {slices})"
    )
    model.set_rt_info(props[backends.META_KEY], list(backends.IR_META_KEY))
    model.set_rt_info(json.dumps(card), list(backends.IR_CARD_KEY))
    out = backends.int8_path(path)
    # Written in a temporary folder beside it and moved, .bin first: a reader never
    # finds an .xml without its weights.
    with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(out))) as tmp:
        ov.save_model(model, os.path.join(tmp, "model.xml"), compress_to_fp16=False)
        os.replace(os.path.join(tmp, "model.bin"), out[: -len(".xml")] + ".bin")
        os.replace(os.path.join(tmp, "model.xml"), out)
    logging.info("Wrote the INT8 quantization of %s to %s", path, out)
    return out


def to_onnx(variables: dict, meta: dict):
    """The inference network of a checkpoint as an ONNX ModelProto (no metadata).

    The network computes in float32 whatever `model.dtype` (ONNX Runtime's CPU kernels
    have no bfloat16 convolution). jax2onnx traces `backends.infer` (the probabilities eval
    and predict use) with the variables as constants and a symbolic batch dimension.
    ONNX Runtime's basic graph optimisation (hardware-independent, standard ONNX
    operators only) then folds the BatchNorms that follow a convolution into its
    weights, folds constants and removes most of the layout Transposes jax2onnx puts
    around NHWC operations; on its shapes the nearest 2x upsamplings then become ONNX
    `Resize` (`_upsampling_as_resize`).

    Args:
        variables: {"params", "batch_stats"}.
        meta: the checkpoint's meta; its "config" defines the model and its input.
    """
    import jax2onnx
    import onnx
    import onnxruntime as ort

    model_config = dict(meta["config"]["model"], dtype="float32")
    data_config = meta["config"]["data"]
    # The decoder's concatenating form: ONNX Runtime folds its BatchNorms (models.ResUNet).
    model = models.create_model(model_config, axis_name=None, concat_skips=True)
    size = data_config["image_size"]
    variables = jax.tree.map(jnp.asarray, variables)

    def probabilities(images):
        mask, tumor = backends.infer(model, variables, images)
        return mask[..., 0], tumor

    # jax2onnx 0.12 prints debug lines from its flax.linen Conv plugin, warns with a
    # traceback about plugins of other libraries (dm_pix) it cannot load under this jax,
    # and onnx_ir warns once per shape-only value it leaves untyped (harmless: ONNX infers
    # them). None of it concerns this graph.
    quiet = [pylogging.getLogger(n) for n in ("onnx_ir.serde", "jax2onnx.plugins.plugin_system")]
    levels = [log.level for log in quiet]
    for log in quiet:
        log.setLevel(pylogging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            proto = jax2onnx.to_onnx(
                probabilities,
                [("B", size, size, models.input_channels(data_config))],
                model_name="resunet",
                input_names=[backends.INPUT_NAME],
                output_names=list(backends.OUTPUT_NAMES),
            )
    finally:
        for log, level in zip(quiet, levels, strict=True):
            log.setLevel(level)
    # jax2onnx annotates some NHWC intermediates with NCHW shapes, which ONNX Runtime
    # warns about; the shapes are inferred again from the graph.
    del proto.graph.value_info[:]
    with tempfile.TemporaryDirectory(prefix="resunet_onnx_") as tmp:
        basic = _ort_optimised(proto, ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, tmp)
        proto = _transposes_cancelled(_upsampling_as_resize(basic), tmp)
    # ONNX Runtime declares all its operator domains; keep those the graph uses.
    used = {node.domain for node in proto.graph.node}
    kept = [o for o in proto.opset_import if o.domain in used]
    del proto.opset_import[:]
    proto.opset_import.extend(kept)
    proto = onnx.shape_inference.infer_shapes(proto)
    onnx.checker.check_model(proto)
    return proto


def _ort_optimised(proto, level, tmp: str, disabled=()):
    """The graph as ONNX Runtime's CPU optimisation at `level` leaves it (written to and
    read from the folder `tmp`), without the optimisers named in `disabled`."""
    import onnx
    import onnxruntime as ort

    raw, optimized = os.path.join(tmp, "in.onnx"), os.path.join(tmp, "optimized.onnx")
    onnx.save(proto, raw)
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    options.optimized_model_filepath = optimized
    ort.InferenceSession(raw, options, ["CPUExecutionProvider"], disabled_optimizers=disabled)
    return onnx.load(optimized)


def _transposes_cancelled(proto, tmp: str):
    """The graph with the layout Transposes that jax2onnx writes around NHWC operations
    moved through the elementwise operators, Resizes and Concats and cancelled, as ONNX
    Runtime's extended optimisation does, leaving one at the input and one at the
    output. ONNX Runtime does this again at load, but OpenVINO does not, and ran the
    graph at half the speed of the same network exported from PyTorch. The fusion that
    would write ONNX Runtime's own operator (FusedConv) is left out, so any ONNX runtime
    reads the graph; should another such operator appear, the graph is returned as it
    came.
    """
    import onnxruntime as ort

    level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    out = _ort_optimised(proto, level, tmp, disabled=["ConvActivationFusion"])
    if any(node.domain not in ("", "ai.onnx") for node in out.graph.node):
        logging.warning("ONNX Runtime's extended optimisation wrote its own operators; not used")
        return proto
    return out


def _upsampling_as_resize(proto):
    """Replaces each nearest 2x upsampling (`models.upsample2x`) by one ONNX `Resize`.

    jax2onnx writes the broadcast + reshape of `upsample2x` as Reshape -> Expand ->
    Reshape on NHWC tensors, with Shape/Gather/Concat for the dynamic batch. ONNX
    Runtime cannot move its layout Transposes through a Reshape, so each decoder level
    would keep a Transpose pair and NHWC copies; through a `Resize` it can, and the whole
    network then runs in its blocked NCHW layout, as a graph exported from PyTorch does.
    (jax2onnx cannot trace `jax.image.resize` with a symbolic batch, so the model itself
    keeps the broadcast.) The results are identical: nearest 2x with floor rounding is
    the same copy of each pixel into a 2x2 block.

    Args:
        proto: a jax2onnx ModelProto after ONNX Runtime's basic optimisation (which
            annotates the shapes of the values the Reshapes compute).

    Returns:
        The ModelProto with the upsamplings replaced and the nodes only they used removed.
    """
    import numpy as np
    import onnx

    inferred = onnx.shape_inference.infer_shapes(proto)
    shapes = {
        v.name: [d.dim_value or None for d in v.type.tensor_type.shape.dim]
        for v in (*inferred.graph.value_info, *inferred.graph.input)
    }
    producer = {out: node for node in proto.graph.node for out in node.output}
    scales = "upsample2x_scales"
    nodes, replaced = [], 0
    for node in proto.graph.node:
        source = node.input[0] if node.op_type == "Reshape" else None
        if source in producer and producer[source].op_type == "Expand":
            while source in producer and producer[source].op_type in ("Expand", "Reshape"):
                source = producer[source].input[0]
            before, after = shapes.get(source), shapes.get(node.output[0])
            if (
                before and after and len(before) == len(after) == 4
                and after[1:] == [2 * before[1], 2 * before[2], before[3]]
            ):  # fmt: skip
                node = onnx.helper.make_node(
                    "Resize",
                    [source, "", scales],
                    list(node.output),
                    name=f"upsample2x_{replaced}",
                    mode="nearest",
                    coordinate_transformation_mode="asymmetric",
                    nearest_mode="floor",
                )
                replaced += 1
        nodes.append(node)
    if not replaced:
        return proto
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    proto.graph.initializer.append(
        onnx.numpy_helper.from_array(np.array([1, 2, 2, 1], np.float32), scales)
    )
    # Keep only what the outputs need: the Shape/Gather/Concat/Expand of the broadcasts go.
    graph = proto.graph
    extracted = onnx.utils.Extractor(proto).extract_model(
        [i.name for i in graph.input], [o.name for o in graph.output]
    )
    extracted.ir_version, extracted.graph.name = proto.ir_version, graph.name
    del extracted.opset_import[:]
    extracted.opset_import.extend(proto.opset_import)
    del extracted.graph.value_info[:]
    return extracted
