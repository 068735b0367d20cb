"""Models that eval and predict run: one interface (`Model`), its backends, and the one
`restore` that everything calls. No TensorFlow.

    from resunet_jax import backends

    model = backends.restore("pretrained/resunet_lgg", "jax", config)
    mask, tumor, mask_std = model.probabilities(images)  # [N, S, S, C] float32 inputs
    model.meta, model.threshold

A backend is a `Model` subclass with `holds(path)` and `load(path, batch_size)`, named in
`REGISTRY` (`config.inference.backend`): "jax" (`JaxModel`, the checkpoint's variables
on the local devices), "onnx" (`OnnxModel`, the exported graph on ONNX Runtime) and
"openvino" (`OpenvinoModel`, the same graph on OpenVINO, in bf16 where the CPU has it,
or its INT8 quantization); "auto" (`resolve_backend`) is the fastest of them installed
for the model on a CPU, JAX on accelerators. A graph of a routed pair
(`model.no_contrast_expert`) runs each of its networks only on the slices routed to it
(`routed_networks`).
Several models (comma-separated, or a folder of runs: `model_paths`) restore as an
`Ensemble`, and `eval.flip_tta` wraps each model in `FlipTTA`: a model's probabilities
are the mean over its views (each member's prediction, and its prediction of the
mirrored slices mirrored back), their standard deviation the pixel uncertainty.
"""

import concurrent.futures
import functools
import importlib.util
import json
import os

import jax
import ml_collections
import numpy as np
from absl import logging

from resunet_jax import checkpointing, config_schema, errors, models, parallel, postprocess

# The exported graph (export.py writes it, OnnxModel reads it): file name, metadata_props
# keys, input and output names.
ONNX_NAME = "model.onnx"
# Its INT8 post-training quantization (export.write_int8), beside it: OpenVINO IR (.xml
# and .bin), its meta and card in the model's rt_info under these keys, and for a routed
# pair each network's input and outputs named with a "." and the network's name.
INT8_NAME = "model.int8.xml"
IR_META_KEY = ("resunet_jax", "meta")
IR_CARD_KEY = ("resunet_jax", "card")
META_KEY = "resunet_jax.meta"
CARD_KEY = "resunet_jax.card"
INPUT_NAME = "image"
OUTPUT_NAMES = ("mask", "tumor")
# The thresholds `--mode=calibrate` chose out-of-fold, beside the model (calibrate.py).
CALIBRATION_NAME = "calibration.json"


def detection_threshold(meta: dict) -> float:
    """A checkpoint's detection threshold, chosen on its validation patients (0.5 if none):
    a slice whose tumour probability is below it is called tumour-free."""
    return meta.get("val_metrics", {}).get("detection_threshold", 0.5)


def eval_batch_size(config) -> int:
    """`eval.batch_size` of a config (or its dict) rounded up to a multiple of the local
    devices: the slices a model predicts at a time."""
    devices = jax.local_device_count()
    return -(-config["eval"]["batch_size"] // devices) * devices


def spread(views) -> tuple[np.ndarray, np.ndarray]:
    """The probability and its uncertainty from the views' probabilities.

    Args:
        views: [V, ...] probabilities of V views of the same slices (ensemble members,
            and each one's mirrored slices with `eval.flip_tta`).

    Returns:
        (mean [...], standard deviation [...]) over the views, float32; the s.d. is the
        population one (ddof 0): 0 for a single view, and where all views agree.
    """
    views = np.asarray(views, np.float32)
    return views.mean(axis=0), views.std(axis=0)


class Model:
    """The interface of every backend: probabilities of normalised model inputs.

    Attributes:
        meta: the checkpoint meta that eval and predict read: "step", "config",
            "val_metrics", "train_patients" (and "members" for an `Ensemble`).
        paths: where it was restored from, one per model.
        batch_size: the slices it predicts at a time (`eval_batch_size`).
        backend: what runs it (a key of `REGISTRY`), as metrics.json and patients.json
            record it.
        precision: the arithmetic it runs in: "f32", "bf16" or "int8".
        calibration: the model folder's calibration.json (`calibrate.py`) when eval and
            predict use it (`read_calibration`), else None.

    A backend implements `views`; `probabilities` and `threshold` follow from it and
    `meta`. A registered backend (`REGISTRY`) also has the classmethods `holds(path)`
    (whether `path` is one such model) and `load(path, batch_size)`.
    """

    meta: dict
    paths: tuple[str, ...]
    batch_size: int
    backend: str
    precision: str
    calibration: dict | None = None

    def views(self, images: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        """The pixel [b, S, S] and slice [b] float32 tumour probabilities of each view of
        one batch of `images` [b, S, S, C], b <= batch_size."""
        raise NotImplementedError

    @property
    def threshold(self) -> float:
        """The detection threshold: the calibrated one, else `meta`'s (chosen on the
        validation patients)."""
        if self.calibration:
            return self.calibration["detection_threshold"]
        return detection_threshold(self.meta)

    @property
    def pixel_threshold(self) -> float:
        """The pixel probability from which a pixel is tumour: the calibrated one, else
        `postprocess.PIXEL_THRESHOLD`."""
        if self.calibration:
            return self.calibration["pixel_threshold"]
        return postprocess.PIXEL_THRESHOLD

    def postprocess(self, configured: str) -> str:
        """The 3D post-processing to apply: the calibrated one, else `configured`
        (`eval.postprocess`)."""
        return self.calibration["postprocess"] if self.calibration else configured

    @property
    def review_threshold(self) -> float | None:
        """The patient uncertainty above which a result is flagged for review (the
        calibrated rule), None without a calibration."""
        return self.calibration["review"]["uncertainty_threshold"] if self.calibration else None

    def probabilities(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Pixel and slice tumour probabilities of model inputs.

        Args:
            images: [N, S, S, C] float32 model inputs.

        Returns:
            (mask [N, S, S], tumor [N], mask_std [N, S, S]) float32 numpy: the mean over
            the views (`spread`) of each batch of `batch_size` slices, and the pixel
            probabilities' s.d. over them (0 for one model without flip TTA).
        """
        outputs = []
        for start in range(0, len(images), self.batch_size):
            masks, tumors = zip(*self.views(images[start : start + self.batch_size]), strict=True)
            (mask, mask_std), (tumor, _) = spread(masks), spread(tumors)
            outputs.append((mask, tumor, mask_std))
        return tuple(np.concatenate(parts) for parts in zip(*outputs, strict=True))


def infer(model, variables, images):
    """Pixel and slice tumour probabilities of one view of the slices.

    Args:
        model: the ResUNet.
        variables: {"params", "batch_stats"}.
        images: [b, S, S, C] model inputs.

    Returns:
        (mask probabilities [b, S, S, 1], tumour probabilities [b]), float32.
    """
    out = model.apply(variables, images, train=False)
    return jax.nn.sigmoid(out["mask"]), jax.nn.sigmoid(out["tumor"])


def predict_step(variables, batch, *, model):
    """Pixel and slice tumour probabilities for one batch (run under pmap).

    Returns:
        (None, {"mask": [b, S, S] float32, "tumor": [b] float32}).
    """
    mask, tumor = infer(model, variables, batch["image"])
    return None, {"mask": mask[..., 0], "tumor": tumor}


def pmapped_predict_step(model):
    return parallel.pmap_step(functools.partial(predict_step, model=model))


@functools.cache
def _compiled_step(architecture: str):
    """The pmap-ed predict step of a `config.model` (as sorted JSON): one per
    architecture, shared by all models of it (ensemble members, training's evaluations)."""
    return pmapped_predict_step(models.create_model(json.loads(architecture)))


# model.dtype -> the precision a JaxModel computes in.
PRECISION_OF_DTYPE = {"float32": "f32", "bfloat16": "bf16"}


class JaxModel(Model):
    """A checkpoint's variables on the local devices: its network (built from
    `meta["config"]["model"]`) runs pmap-ed, each batch padded to `batch_size`, so one
    compilation serves all batches.

    Args:
        variables: {"params", "batch_stats"}.
        meta: the checkpoint's meta (at least its "config").
        paths: where it was restored from.
        batch_size: slices per call; None = `eval_batch_size` of its own config.
    """

    backend = "jax"

    def __init__(self, variables, meta: dict, paths=(), batch_size: int | None = None):
        self.variables = variables
        self.meta = meta
        self.precision = PRECISION_OF_DTYPE[meta["config"]["model"]["dtype"]]
        self.paths = tuple(paths)
        self.batch_size = batch_size or eval_batch_size(meta["config"])
        architecture = config_schema.plain(meta["config"]["model"])
        self._step = _compiled_step(json.dumps(architecture, sort_keys=True))

    @classmethod
    def holds(cls, path: str) -> bool:
        return checkpointing.holds_checkpoint(path)

    @classmethod
    def load(cls, path: str, batch_size: int | None = None, precision: str = "auto") -> "JaxModel":
        del precision  # the checkpoint's model.dtype (restore allows auto and f32 alone)
        return cls(*checkpointing.restore_model(path), (path,), batch_size)

    def views(self, images):
        padded, n = parallel.pad_batch({"image": images}, self.batch_size)
        _, out = jax.device_get(self._step(self.variables, parallel.split_for_devices(padded)))
        return [(out["mask"].reshape(-1, *out["mask"].shape[2:])[:n], out["tumor"].reshape(-1)[:n])]


def from_variables(variables, config: ml_collections.ConfigDict) -> Model:
    """The model of `variables` of `config`'s network (training's evaluations), batched
    and flipped as `config.eval` says."""
    meta = {"config": config_schema.config_json(config)}
    return _with_views(JaxModel(variables, meta, batch_size=eval_batch_size(config)), config)


def int8_path(path: str) -> str:
    """Where the INT8 quantization of the graph `path` (.onnx) is (`export.write_int8`):
    model.int8.xml (and .bin) for model.onnx."""
    return path[: -len(".onnx")] + ".int8.xml"


def find_onnx(path: str, int8: bool = False) -> str:
    """The exported model that `path` names: an .onnx file, a folder holding model.onnx
    (pretrained/resunet_lgg), or a workdir holding export/model.onnx; with `int8`, the
    INT8 quantization beside it (model.int8.xml, `export.write_int8`).

    Raises:
        errors.CheckpointError: none of these.
    """
    name = INT8_NAME if int8 else ONNX_NAME
    candidates = [os.path.join(path, name), os.path.join(path, "export", name)]
    if path.endswith(".int8.xml"):
        candidates = [path]
    elif path.endswith(".onnx"):
        candidates = [int8_path(path) if int8 else path]
    for candidate in candidates:
        if os.path.isfile(candidate):
            return candidate
    fix = (
        "write one with --mode=export --config.export.int8=True, or use another inference.precision"
        if int8
        else "write one with --mode=export, or use --config.inference.backend=jax"
    )
    raise errors.CheckpointError(
        f"{path}: no {'INT8 ' if int8 else ''}ONNX model (looked for "
        f"{' and '.join(candidates)}); {fix}"
    )


# The networks of a routed pair's graph, and which input of each routing `Where` (cond,
# X, Y) is theirs: models.NoContrastRouted selects where(routed, no_contrast, complete).
ROUTED_BRANCHES = {"complete": 2, "no_contrast": 1}


def routed_networks(proto) -> dict:
    """Each network of a routed pair's graph as a graph of its own.

    The graph of a routed pair (`model.no_contrast_expert`) computes both networks on
    every slice, and a `Where` per output picks each slice's from the network it is
    routed to. A network's own graph is that graph with each `Where` replaced by its
    input from that network, less everything only the routing and the other network
    used: it costs one network's convolutions.

    Args:
        proto: the exported ModelProto of a routed pair (its card has "routing").

    Returns:
        {"complete": ModelProto, "no_contrast": ModelProto}, each from the input
        [b, S, S, C] to the outputs "mask" [b, S, S] and "tumor" [b].

    Raises:
        ValueError: the graph has not one `Where` per output.
    """
    import onnx

    wheres = [i for i, node in enumerate(proto.graph.node) if node.op_type == "Where"]
    if len(wheres) != len(proto.graph.output):
        raise ValueError(
            f"a routed pair's graph has one Where per output ({len(proto.graph.output)}), "
            f"this one {len(wheres)}"
        )
    networks = {}
    for name, branch in ROUTED_BRANCHES.items():
        graph = onnx.GraphProto()
        graph.CopyFrom(proto.graph)
        for i in wheres:
            node = graph.node[i]
            graph.node[i].CopyFrom(
                onnx.helper.make_node("Identity", [node.input[branch]], list(node.output))
            )
        whole = onnx.helper.make_model(graph, opset_imports=proto.opset_import)
        whole.ir_version = proto.ir_version
        networks[name] = onnx.utils.Extractor(whole).extract_model(
            [i.name for i in graph.input], [o.name for o in graph.output]
        )
    return networks


class GraphModel(Model):
    """An exported graph on a host inference engine (`OnnxModel`, `OpenvinoModel`): its
    meta and card from the graph's metadata_props, and a routed pair's networks each on
    the slices routed to it (`routed_networks`; the slices are routed by the rule the
    graph holds, `models.lacks_pre_contrast`). Called (`__call__`) like the JAX model in
    `infer`.

    A subclass sets `backend` and `precision` and implements `_compile(graph)` (a
    ModelProto, or what its own `_read` gives -> what its `_infer` runs) and
    `_infer(name, images)`.

    Args:
        path: the .onnx file (`export.export`).
        batch_size: slices per call; None = `eval_batch_size` of its own config.

    Attributes:
        meta: the checkpoint's meta (config, step, val_metrics, ...).
        card: the model card (`export.model_card`).
        networks: what `_infer` runs, by name: "complete" and "no_contrast" for a routed
            pair, else "network".

    Raises:
        errors.CheckpointError: `path` is not a graph exported by resunet_jax.
    """

    def __init__(self, path: str, batch_size: int | None = None):
        self.meta, self.card, graphs = self._read(path)
        self.path = path
        self.paths = (path,)
        self.batch_size = batch_size or eval_batch_size(self.meta["config"])
        self.networks = {name: self._compile(graph) for name, graph in graphs.items()}

    def _read(self, path: str) -> tuple[dict, dict, dict]:
        """The meta, card and networks (ModelProtos by name, as `networks`) of the .onnx
        `path`."""
        import onnx

        try:
            proto = onnx.load(path)
        except Exception as e:  # protobuf's DecodeError and the like: a damaged file
            raise errors.CheckpointError(f"{path}: not a readable ONNX model ({e})") from e
        props = {p.key: p.value for p in proto.metadata_props}
        if META_KEY not in props:
            raise errors.CheckpointError(
                f"{path}: not exported by resunet_jax (no {META_KEY} in its metadata)"
            )
        card = json.loads(props[CARD_KEY])
        if "routing" not in card:
            return json.loads(props[META_KEY]), card, {"network": proto}
        try:
            return json.loads(props[META_KEY]), card, routed_networks(proto)
        except ValueError as e:
            raise errors.CheckpointError(f"{path}: {e}") from e

    def _compile(self, graph):
        raise NotImplementedError

    def _infer(self, name: str, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The outputs (mask [b, S, S], tumor [b]) of network `name` on `images`
        [b, S, S, C], b >= 1."""
        raise NotImplementedError

    def __call__(self, images) -> tuple[np.ndarray, np.ndarray]:
        """Pixel and slice tumour probabilities, as `infer` computes them.

        Args:
            images: [b, S, S, C] float32 model inputs.

        Returns:
            (mask probabilities [b, S, S], tumour probabilities [b]), float32.
        """
        images = np.ascontiguousarray(images, np.float32)
        if "network" in self.networks:
            return self._infer("network", images)
        routed = np.asarray(models.lacks_pre_contrast(images))
        mask = np.empty(images.shape[:3], np.float32)
        tumor = np.empty(len(images), np.float32)
        for name, rows in (("complete", ~routed), ("no_contrast", routed)):
            if rows.any():
                mask[rows], tumor[rows] = self._infer(name, images[rows])
        return mask, tumor

    def views(self, images):
        return [self(images)]

    @classmethod
    def holds(cls, path: str) -> bool:
        try:
            find_onnx(path)
        except errors.CheckpointError:
            return False
        return True


class OnnxModel(GraphModel):
    """An exported model on ONNX Runtime (f32), in batches of `batch_size` on the host.

    Args:
        path: the .onnx file (`export.export`).
        threads: ONNX Runtime's intra-op threads; 0 = its default (one per core).
        batch_size: slices per call; None = `eval_batch_size` of its own config.
    """

    backend = "onnx"
    precision = "f32"

    def __init__(self, path: str, threads: int = 0, batch_size: int | None = None):
        import onnxruntime as ort

        # CUDA where onnxruntime-gpu provides it, else the CPU. Not all that are available:
        # the CPU wheel lists AzureExecutionProvider (remote endpoints) first.
        available = ort.get_available_providers()
        self.providers = [
            p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available
        ]
        self._options = ort.SessionOptions()
        # On CPUs a batch is split into one part per thread, run at once with one thread
        # each: no synchronisation inside each of the ~60 operators (about 5-10% more
        # images/s on 2 cores than 2 intra-op threads, the same results).
        self._workers = threads or os.cpu_count() or 1
        self._pool = None
        if self.providers[0] == "CPUExecutionProvider" and self._workers > 1:
            self._pool = concurrent.futures.ThreadPoolExecutor(self._workers)
            self._options.intra_op_num_threads = 1
        else:
            self._options.intra_op_num_threads = threads
        # Idle threads wait instead of spinning, which would take the cores from the work
        # running alongside (eval's input pipeline, other jobs).
        self._options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        super().__init__(path, batch_size)

    def _compile(self, proto):
        import onnxruntime as ort

        return ort.InferenceSession(proto.SerializeToString(), self._options, self.providers)

    @classmethod
    def load(cls, path: str, batch_size: int | None = None, precision: str = "auto") -> "OnnxModel":
        del precision  # f32 alone (restore allows auto and f32 alone)
        model = cls(find_onnx(path), batch_size=batch_size)
        logging.info("Predicting with %s on ONNX Runtime (step %d)", model.path, model.meta["step"])
        model.paths = (path,)
        return model

    def _infer(self, name, images):
        session = self.networks[name]

        def run(part):
            return session.run(list(OUTPUT_NAMES), {INPUT_NAME: part})

        if self._pool is None or len(images) < 2:
            return tuple(run(images))
        parts = np.array_split(images, min(self._workers, len(images)))
        outputs = list(self._pool.map(run, parts))
        return tuple(np.concatenate(o) for o in zip(*outputs, strict=True))


def cpu_float_precision() -> str:
    """The float precision OpenVINO runs in on this CPU by default: "bf16" where the CPU
    has bfloat16 arithmetic (AVX512-BF16, AMX), else "f32"."""
    import openvino as ov

    capabilities = ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    return "bf16" if "BF16" in capabilities else "f32"


class OpenvinoModel(GraphModel):
    """An exported model on OpenVINO's CPU plugin, in batches of `batch_size`.

    OpenVINO compiles the graph for this CPU and runs its convolutions in the precision
    asked for: bf16 where the CPU has it ("auto"), f32, or the INT8 graph's quantized
    convolutions (`export.write_int8`, model.int8.xml; its other operators in the CPU's
    float precision). A batch is split into one part per OpenVINO stream (one per core pair or
    core), run at once, as OnnxModel splits it over threads.

    Args:
        path: the .onnx file (`export.export`), or its INT8 quantization (model.int8.xml)
            for precision "int8".
        precision: "auto" (bf16 where the CPU has it, else f32), "f32", "bf16" or "int8"
            (`load` makes "auto" int8 where the INT8 model is there).
        threads: CPU threads; 0 = one per core.
        batch_size: slices per call; None = `eval_batch_size` of its own config.

    Raises:
        errors.ConfigError: precision "bf16" on a CPU without bfloat16 arithmetic.
    """

    backend = "openvino"

    def __init__(
        self, path: str, precision: str = "auto", threads: int = 0, batch_size: int | None = None
    ):
        import openvino as ov

        available = cpu_float_precision()
        if precision == "bf16" and available != "bf16":
            raise errors.ConfigError(
                "inference.precision='bf16': this CPU has no bfloat16 arithmetic "
                "(OpenVINO finds none); use auto or f32"
            )
        self.precision = available if precision == "auto" else precision
        float_precision = "f32" if precision == "f32" else available
        self._core = ov.Core()
        self._properties = {
            "INFERENCE_PRECISION_HINT": float_precision,
            "PERFORMANCE_HINT": "THROUGHPUT",
            "INFERENCE_NUM_THREADS": threads or os.cpu_count() or 1,
        }
        super().__init__(path, batch_size)

    def _read(self, path):
        if not path.endswith(".xml"):
            return super()._read(path)
        import openvino as ov

        try:
            model = self._core.read_model(path)
            meta, card = (
                model.get_rt_info(list(k)).astype(str) for k in (IR_META_KEY, IR_CARD_KEY)
            )
        except RuntimeError as e:  # unreadable, or without its rt_info
            raise errors.CheckpointError(
                f"{path}: not an INT8 model exported by resunet_jax ({e})"
            ) from e
        card = json.loads(card)
        if "routing" not in card:
            return json.loads(meta), card, {"network": model}
        # Each network alone: its input and its outputs, nothing of the other's.
        networks = {
            name: ov.Model(
                [model.output(f"{output}.{name}").get_node() for output in OUTPUT_NAMES],
                [model.input(f"{INPUT_NAME}.{name}").get_node()],
                name,
            )
            for name in ROUTED_BRANCHES
        }
        return json.loads(meta), card, networks

    def _compile(self, graph):
        if not hasattr(graph, "get_parameters"):  # an ONNX ModelProto, not an ov.Model
            graph = self._core.read_model(graph.SerializeToString())
        compiled = self._core.compile_model(graph, "CPU", self._properties)
        streams = compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")
        return [compiled.create_infer_request() for _ in range(streams)]

    @classmethod
    def load(
        cls, path: str, batch_size: int | None = None, precision: str = "auto"
    ) -> "OpenvinoModel":
        if precision == "auto":
            # The INT8 model where it was exported (as accurate as f32 for the shipped
            # model: benchmarks/README.md), else bf16 or f32.
            try:
                find_onnx(path, int8=True)
                precision = "int8"
            except errors.CheckpointError:
                pass
        model = cls(find_onnx(path, int8=precision == "int8"), precision, batch_size=batch_size)
        logging.info(
            "Predicting with %s on OpenVINO in %s (step %d)",
            model.path,
            model.precision,
            model.meta["step"],
        )
        model.paths = (path,)
        return model

    def _infer(self, name, images):
        requests = self.networks[name]
        parts = np.array_split(images, min(len(requests), len(images)))
        for request, part in zip(requests, parts, strict=False):
            request.start_async({0: part})
        results = []
        for request, _ in zip(requests, parts, strict=False):
            request.wait()
            # Outputs in graph order: mask, tumor (OUTPUT_NAMES).
            results.append([tensor.data.copy() for tensor in request.output_tensors])
        return tuple(np.concatenate(o) for o in zip(*results, strict=True))


class FlipTTA(Model):
    """A model's views followed by its views of the left-right mirrored slices, mirrored
    back (brains are roughly left-right symmetric): `eval.flip_tta`.

    Args:
        model: the model whose views are taken; its meta, paths, batch size, backend and
            precision are this one's.
    """

    def __init__(self, model: Model):
        self.model = model
        self.meta, self.paths, self.batch_size = model.meta, model.paths, model.batch_size
        self.backend, self.precision = model.backend, model.precision

    def views(self, images):
        mirrored = self.model.views(np.ascontiguousarray(images[:, :, ::-1]))
        return [*self.model.views(images), *((mask[:, :, ::-1], tumor) for mask, tumor in mirrored)]


class Ensemble(Model):
    """Several models predicting together: its views are its members' views, in order, so
    its probabilities are their mean and the pixel uncertainty their s.d.

    Args:
        members: the models (with flip TTA, each wrapped in `FlipTTA`); they read the
            same input (`config_schema.INPUT_FIELDS`) and share `batch_size`, backend
            and precision (`restore` restores them all with the same).
    """

    def __init__(self, members, batch_size: int):
        self.members = tuple(members)
        self.paths = tuple(p for m in self.members for p in m.paths)
        self.batch_size = batch_size
        self.backend, self.precision = self.members[0].backend, self.members[0].precision

    def views(self, images):
        return [view for member in self.members for view in member.views(images)]

    @property
    def meta(self) -> dict:
        """The meta that eval and predict read, as one model's.

        config: the first member's (the input fields are every member's); step: the
        newest member's; val_metrics.detection_threshold: the mean of the members' (0.5
        for one without), the decision boundary of the mean slice tumour probability
        when each member's sits at its own threshold; it is not chosen again, since
        that would take patients some member did not validate on; train_patients: the
        union of the members', so eval.split=val scores only patients none of them saw;
        members: each one's checkpoint, step and detection threshold.
        """
        members = [
            {
                "checkpoint": os.path.abspath(m.paths[0]),
                "step": int(m.meta["step"]),
                "detection_threshold": m.threshold,
            }
            for m in self.members
        ]
        return {
            "step": max(m["step"] for m in members),
            "config": self.members[0].meta["config"],
            "val_metrics": {
                "detection_threshold": float(np.mean([m["detection_threshold"] for m in members]))
            },
            "train_patients": sorted(
                set().union(*(m.meta["train_patients"] for m in self.members))
            ),
            "members": members,
        }


# config.inference.backend -> its Model class. A new backend is a Model subclass with
# `holds` and `load(path, batch_size, precision)`, and one entry here.
REGISTRY = {"jax": JaxModel, "onnx": OnnxModel, "openvino": OpenvinoModel}
# The backends that run an exported graph, fastest first on CPUs (benchmarks/README.md),
# with the module each needs: what backend "auto" picks from.
GRAPH_BACKENDS = (("openvino", "openvino"), ("onnx", "onnxruntime"))


def graph_is_current(path: str) -> bool:
    """Whether `path` holds an exported graph (`find_onnx`) of the step its checkpoint, if
    it has one, would restore: a graph exported before training went on is not."""
    try:
        graph = find_onnx(path)
    except errors.CheckpointError:
        return False
    if not checkpointing.holds_checkpoint(path):
        return True
    step = checkpointing.preferred_step(path)
    try:  # the JSON written with it (export.write_onnx), small
        with open(graph[: -len(".onnx")] + ".json") as f:
            exported = json.load(f)["meta"]["step"]
    except (OSError, ValueError, KeyError):
        import onnx

        props = {p.key: p.value for p in onnx.load(graph).metadata_props}
        exported = json.loads(props.get(META_KEY, "{}")).get("step")
    if step is not None and step != exported:
        logging.warning(
            "%s: the exported graph %s is of step %d, the checkpoint's is %d; "
            "inference.backend=auto runs the checkpoint on JAX (export it again for the "
            "faster CPU backends)",
            path,
            graph,
            exported,
            step,
        )
        return False
    return True


def resolve_backend(backend: str, checkpoint: str, precision: str = "auto") -> str:
    """The backend that `config.inference.backend` names for `config.checkpoint`.

    "auto" is JAX on accelerators (GPU, TPU), and on CPUs the fastest installed engine
    for exported graphs (OpenVINO, else ONNX Runtime) where every model `checkpoint`
    names has its graph, of the checkpoint's step (`graph_is_current`), else JAX. A
    precision other than auto and f32 needs OpenVINO.

    Raises:
        errors.ConfigError: precision bf16 or int8 where OpenVINO cannot run it.
    """
    if backend != "auto":
        return backend
    needs_openvino = precision not in config_schema.FLOAT32_PRECISIONS
    if jax.default_backend() == "cpu" and all(
        map(graph_is_current, model_paths(checkpoint, "onnx"))
    ):
        for name, module in GRAPH_BACKENDS:
            if importlib.util.find_spec(module) and (name == "openvino" or not needs_openvino):
                return name
    if needs_openvino:
        raise errors.ConfigError(
            f"inference.precision={precision!r} runs on OpenVINO, on a CPU, from the graph "
            f"--mode=export writes: install it (pip install -e '.[openvino]') and export "
            f"{checkpoint}, or use precision auto"
        )
    return "jax"


def model_paths(checkpoint: str, backend: str = "jax") -> list[str]:
    """The models that `config.checkpoint` names, in order.

    `checkpoint` is one path or several separated by commas; each is a model (a workdir,
    a checkpoint or an exported model; with the onnx and openvino backends an .onnx file
    or a folder holding one) or a folder of runs: a folder that is not itself a model and
    whose sub-folders, taken in sorted order, are (others among them, such as a report's
    folder, are skipped). A path that is neither is kept, so that restoring it names it.

    Args:
        checkpoint: `config.checkpoint`.
        backend: a key of `REGISTRY`, or "auto" (`resolve_backend`).

    Returns:
        The paths, one per model.
    """
    holds = REGISTRY[resolve_backend(backend, checkpoint)].holds
    paths = []
    for path in filter(None, (p.strip() for p in checkpoint.split(","))):
        runs = []
        if os.path.isdir(path) and not holds(path):
            runs = [
                os.path.join(path, name)
                for name in sorted(os.listdir(path))
                if holds(os.path.join(path, name))
            ]
        paths += runs or [path]
    return paths


def _with_views(model: Model, config) -> Model:
    return FlipTTA(model) if config["eval"]["flip_tta"] else model


def read_calibration(path: str, config) -> dict | None:
    """The calibration.json beside a model (in its folder, or the ensemble's folder of
    runs) if eval and predict should use it: `eval.calibration` is on and it was chosen
    with the same `eval.flip_tta` (its thresholds fit those probabilities only).

    Raises:
        errors.CheckpointError: the file is not a calibration.
    """
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    file = os.path.join(folder, CALIBRATION_NAME)
    if "," in path or not config["eval"].get("calibration", True) or not os.path.isfile(file):
        return None
    try:
        with open(file) as f:
            calibration = json.load(f)
        keys = ("detection_threshold", "pixel_threshold", "postprocess", "flip_tta", "review")
        missing = [k for k in keys if k not in calibration]
    except (OSError, ValueError) as e:
        raise errors.CheckpointError(f"{file}: unreadable calibration ({e})") from e
    if missing:
        raise errors.CheckpointError(f"{file}: not a calibration (no {', '.join(missing)})")
    if calibration["flip_tta"] != bool(config["eval"]["flip_tta"]):
        logging.warning(
            "%s was chosen with eval.flip_tta=%s and is not used with eval.flip_tta=%s",
            file,
            calibration["flip_tta"],
            config["eval"]["flip_tta"],
        )
        return None
    logging.info(
        "Calibrated (%s): detection threshold %s, pixel threshold %s, post-processing %s",
        file,
        calibration["detection_threshold"],
        calibration["pixel_threshold"],
        calibration["postprocess"],
    )
    return calibration


def restore(
    path: str,
    backend: str = "jax",
    config: ml_collections.ConfigDict | None = None,
    precision: str | None = None,
) -> Model:
    """The model that eval and predict run: what everything restores through.

    Args:
        path: `config.checkpoint`: a workdir or checkpoint (jax); an .onnx file, or a
            folder or workdir holding one (`find_onnx`; onnx, openvino); or several
            models, as a comma-separated list or a folder of runs (`model_paths`): an
            `Ensemble`.
        backend: `config.inference.backend`: a key of `REGISTRY`, or "auto"
            (`resolve_backend`).
        config: the run config whose `eval.batch_size` and `eval.flip_tta` it runs
            with; None = the (first) model's own config.
        precision: `config.inference.precision` ("auto", "f32", "bf16", "int8"; bf16 and
            int8 on OpenVINO); None = the config's, else "auto".

    Raises:
        errors.CheckpointError: a model cannot be restored, or two members read
            different inputs (the message names both and the field).
        errors.ConfigError: the precision cannot run on the backend.
    """
    if precision is None:
        precision = config["inference"].get("precision", "auto") if config else "auto"
    backend = resolve_backend(backend, path, precision)
    if backend != "openvino" and precision not in config_schema.FLOAT32_PRECISIONS:
        raise errors.ConfigError(
            f"inference.precision={precision!r}: runs on inference.backend=openvino (or "
            f"auto), not {backend}"
        )
    paths = model_paths(path, backend)
    load = REGISTRY[backend].load
    members = []
    for member_path in paths:
        member = load(member_path, None if config is None else eval_batch_size(config), precision)
        if config is None:
            config = member.meta["config"]
        members.append(member)
    first = members[0]
    for member in members[1:]:
        differ = config_schema.input_differences(first.meta, member.meta)
        if differ:
            raise errors.CheckpointError(
                f"{first.paths[0]} and {member.paths[0]} read different inputs "
                f"({'; '.join(differ)}); the members of an ensemble must agree on "
                f"{', '.join(config_schema.INPUT_FIELDS)}"
            )
    members = [_with_views(m, config) for m in members]
    if len(members) == 1:
        model = members[0]
    else:
        logging.info("Predicting with an ensemble of %d models: %s", len(members), ", ".join(paths))
        model = Ensemble(members, eval_batch_size(config))
    model.calibration = read_calibration(path, config)
    return model
