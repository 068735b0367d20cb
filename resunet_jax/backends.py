"""Models that eval and predict run: one interface (`Model`), its backends, and the one
`restore` that everything calls. No TensorFlow.

    from resunet_jax import backends

    model = backends.restore("pretrained/resunet_lgg", "jax", config)
    mask, tumor, mask_std = model.probabilities(images)  # [N, S, S, C] float32 inputs
    model.meta, model.threshold

A backend is a `Model` subclass with `holds(path)` and `load(path, batch_size)`, named in
`REGISTRY` (`config.inference.backend`): "jax" (`JaxModel`, the checkpoint's variables
on the local devices) and "onnx" (`OnnxModel`, the exported graph on ONNX Runtime).
Several models (comma-separated, or a folder of runs: `model_paths`) restore as an
`Ensemble`, and `eval.flip_tta` wraps each model in `FlipTTA`: a model's probabilities
are the mean over its views (each member's prediction, and its prediction of the
mirrored slices mirrored back), their standard deviation the pixel uncertainty.
"""

import concurrent.futures
import functools
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
        calibration: the model folder's calibration.json (`calibrate.py`) when eval and
            predict use it (`read_calibration`), else None.

    A backend implements `views`; `probabilities` and `threshold` follow from it and
    `meta`. A registered backend (`REGISTRY`) also has the classmethods `holds(path)`
    (whether `path` is one such model) and `load(path, batch_size)`.
    """

    meta: dict
    paths: tuple[str, ...]
    batch_size: int
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

    def __init__(self, variables, meta: dict, paths=(), batch_size: int | None = None):
        self.variables = variables
        self.meta = meta
        self.paths = tuple(paths)
        self.batch_size = batch_size or eval_batch_size(meta["config"])
        architecture = config_schema.plain(meta["config"]["model"])
        self._step = _compiled_step(json.dumps(architecture, sort_keys=True))

    @classmethod
    def holds(cls, path: str) -> bool:
        return checkpointing.holds_checkpoint(path)

    @classmethod
    def load(cls, path: str, batch_size: int | None = None) -> "JaxModel":
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


def find_onnx(path: str) -> str:
    """The exported model that `path` names: an .onnx file, a folder holding model.onnx
    (pretrained/resunet_lgg), or a workdir holding export/model.onnx.

    Raises:
        errors.CheckpointError: none of these.
    """
    candidates = [os.path.join(path, ONNX_NAME), os.path.join(path, "export", ONNX_NAME)]
    if path.endswith(".onnx"):
        candidates = [path]
    for candidate in candidates:
        if os.path.isfile(candidate):
            return candidate
    raise errors.CheckpointError(
        f"{path}: no ONNX model (looked for {' and '.join(candidates)}); write one with "
        "--mode=export, or use --config.inference.backend=jax"
    )


class OnnxModel(Model):
    """An exported model on ONNX Runtime, in batches of `batch_size` on the host (it
    holds its weights); called (`__call__`) like the JAX model in `infer`.

    Args:
        path: the .onnx file (`export.export`).
        threads: ONNX Runtime's intra-op threads; 0 = its default (one per core).
        batch_size: slices per call; None = `eval_batch_size` of its own config.

    Attributes:
        meta: the checkpoint's meta (config, step, val_metrics, ...).
        card: the model card (`export.model_card`).
    """

    def __init__(self, path: str, threads: int = 0, batch_size: int | None = None):
        import onnxruntime as ort

        # CUDA where onnxruntime-gpu provides it, else the CPU. Not all that are available:
        # the CPU wheel lists AzureExecutionProvider (remote endpoints) first.
        available = ort.get_available_providers()
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        options = ort.SessionOptions()
        # On CPUs a batch is split into one part per thread, run at once with one thread
        # each: no synchronisation inside each of the ~60 operators (about 5-10% more
        # images/s on 2 cores than 2 intra-op threads, the same results).
        self._workers = threads or os.cpu_count() or 1
        self._pool = None
        if providers[0] == "CPUExecutionProvider" and self._workers > 1:
            self._pool = concurrent.futures.ThreadPoolExecutor(self._workers)
            options.intra_op_num_threads = 1
        else:
            options.intra_op_num_threads = threads
        # Idle threads wait instead of spinning, which would take the cores from the work
        # running alongside (eval's input pipeline, other jobs).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.path = path
        self.paths = (path,)
        self.session = ort.InferenceSession(path, options, providers=providers)
        props = self.session.get_modelmeta().custom_metadata_map
        if META_KEY not in props:
            raise errors.CheckpointError(
                f"{path}: not exported by resunet_jax (no {META_KEY} in its metadata)"
            )
        self.meta = json.loads(props[META_KEY])
        self.card = json.loads(props[CARD_KEY])
        self.batch_size = batch_size or eval_batch_size(self.meta["config"])

    @classmethod
    def holds(cls, path: str) -> bool:
        try:
            find_onnx(path)
        except errors.CheckpointError:
            return False
        return True

    @classmethod
    def load(cls, path: str, batch_size: int | None = None) -> "OnnxModel":
        model = cls(find_onnx(path), batch_size=batch_size)
        logging.info("Predicting with %s on ONNX Runtime (step %d)", model.path, model.meta["step"])
        model.paths = (path,)
        return model

    def _run(self, images):
        return self.session.run(list(OUTPUT_NAMES), {INPUT_NAME: images})

    def __call__(self, images) -> tuple[np.ndarray, np.ndarray]:
        """Pixel and slice tumour probabilities, as `infer` computes them.

        Args:
            images: [b, S, S, C] float32 model inputs.

        Returns:
            (mask probabilities [b, S, S], tumour probabilities [b]), float32.
        """
        images = np.asarray(images, np.float32)
        if self._pool is None or len(images) < 2:
            return tuple(self._run(images))
        parts = np.array_split(images, min(self._workers, len(images)))
        outputs = list(self._pool.map(self._run, parts))
        return tuple(np.concatenate(o) for o in zip(*outputs, strict=True))

    def views(self, images):
        return [self(images)]


class FlipTTA(Model):
    """A model's views followed by its views of the left-right mirrored slices, mirrored
    back (brains are roughly left-right symmetric): `eval.flip_tta`.

    Args:
        model: the model whose views are taken; its meta, paths and batch size are this one's.
    """

    def __init__(self, model: Model):
        self.model = model
        self.meta, self.paths, self.batch_size = model.meta, model.paths, model.batch_size

    def views(self, images):
        mirrored = self.model.views(np.ascontiguousarray(images[:, :, ::-1]))
        return [*self.model.views(images), *((mask[:, :, ::-1], tumor) for mask, tumor in mirrored)]


class Ensemble(Model):
    """Several models predicting together: its views are its members' views, in order, so
    its probabilities are their mean and the pixel uncertainty their s.d.

    Args:
        members: the models (with flip TTA, each wrapped in `FlipTTA`); they read the
            same input (`config_schema.INPUT_FIELDS`) and share `batch_size`.
    """

    def __init__(self, members, batch_size: int):
        self.members = tuple(members)
        self.paths = tuple(p for m in self.members for p in m.paths)
        self.batch_size = batch_size

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
# `holds` and `load`, and one entry here.
REGISTRY = {"jax": JaxModel, "onnx": OnnxModel}


def model_paths(checkpoint: str, backend: str = "jax") -> list[str]:
    """The models that `config.checkpoint` names, in order.

    `checkpoint` is one path or several separated by commas; each is a model (a workdir,
    a checkpoint or an exported model; with the onnx backend an .onnx file or a folder
    holding one) or a folder of runs: a folder that is not itself a model and whose
    sub-folders, taken in sorted order, are (others among them, such as a report's
    folder, are skipped). A path that is neither is kept, so that restoring it names it.

    Returns:
        The paths, one per model.
    """
    holds = REGISTRY[backend].holds
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
    path: str, backend: str = "jax", config: ml_collections.ConfigDict | None = None
) -> Model:
    """The model that eval and predict run: what everything restores through.

    Args:
        path: `config.checkpoint`: a workdir or checkpoint (jax); an .onnx file, or a
            folder or workdir holding one (`find_onnx`; onnx); or several models, as a
            comma-separated list or a folder of runs (`model_paths`): an `Ensemble`.
        backend: `config.inference.backend`, a key of `REGISTRY`.
        config: the run config whose `eval.batch_size` and `eval.flip_tta` it runs
            with; None = the (first) model's own config.

    Raises:
        errors.CheckpointError: a model cannot be restored, or two members read
            different inputs (the message names both and the field).
    """
    paths = model_paths(path, backend)
    load = REGISTRY[backend].load
    members = []
    for member_path in paths:
        member = load(member_path, None if config is None else eval_batch_size(config))
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
