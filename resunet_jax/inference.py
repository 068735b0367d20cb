"""Inference: the predict step, its JAX and ONNX Runtime backends, and a trained model
as a Python object (slices in, probabilities and masks out). No TensorFlow.

    from resunet_jax import inference

    predictor = inference.Predictor.from_checkpoint("pretrained/resunet_lgg")
    result = predictor.predict(images)  # one patient's [N, H, W, 3] uint8 slices, in order
    result.masks, result.probabilities, result.tumor_probabilities

`predict` brings the slices to the model's input exactly as evaluation does, with the
same functions (`preprocess`, `inputs`): each slice resized to `data.image_size`, normalised as
the checkpoint's `data.normalization` says ("volume" statistics over the slices passed
together), its neighbouring slices added for a 2.5-D model; the probabilities are
resized back to each slice's size, thresholded at 0.5 and gated by the checkpoint's
detection threshold, and with `eval.postprocess=largest_component` the largest 3D
component is kept. A joined model (`model.no_contrast_expert`, the shipped one) routes
each slice whose pre-contrast is a FLAIR copy to its no-contrast network.
`--mode=predict` and evaluation are built on this module; `batch_probabilities` runs
either backend (`inference.backend`: the JAX model or ONNX Runtime, `restore`).

Several checkpoints (comma-separated, or a folder of runs: `model_paths`) restore as an
`Ensemble`: each member routes and predicts the slices as it would alone, and the
probabilities are averaged over the members (and flips, `eval.flip_tta`) before the
0.5 threshold and the detection gate (at `Ensemble.meta`'s threshold); their standard
deviation is the pixel uncertainty (`Prediction.uncertainty`).
"""

import concurrent.futures
import dataclasses
import functools
import json
import os
from collections.abc import Callable

import jax
import ml_collections
import numpy as np
from absl import logging

from resunet_jax import (
    checkpointing,
    config_schema,
    errors,
    inputs,
    models,
    parallel,
    postprocess,
    preprocess,
)

# The exported graph (export.py writes it, OnnxModel reads it): file name, metadata_props
# keys, input and output names.
ONNX_NAME = "model.onnx"
META_KEY = "resunet_jax.meta"
CARD_KEY = "resunet_jax.card"
INPUT_NAME = "image"
OUTPUT_NAMES = ("mask", "tumor")


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


class OnnxModel:
    """An exported model on ONNX Runtime, called like the JAX model in `infer`.

    Args:
        path: the .onnx file (`export.export`).
        threads: ONNX Runtime's intra-op threads; 0 = its default (one per core).

    Attributes:
        meta: the checkpoint's meta (config, step, val_metrics, ...).
        card: the model card (`export.model_card`).
    """

    def __init__(self, path: str, threads: int = 0):
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
        self.session = ort.InferenceSession(path, options, providers=providers)
        props = self.session.get_modelmeta().custom_metadata_map
        if META_KEY not in props:
            raise errors.CheckpointError(
                f"{path}: not exported by resunet_jax (no {META_KEY} in its metadata)"
            )
        self.meta = json.loads(props[META_KEY])
        self.card = json.loads(props[CARD_KEY])

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


def _is_model(path: str, backend: str) -> bool:
    """Whether `path` is one model for `backend` (not a folder of runs)."""
    if backend == "jax":
        return checkpointing.holds_checkpoint(path)
    try:
        find_onnx(path)
    except errors.CheckpointError:
        return False
    return True


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
    paths = []
    for path in filter(None, (p.strip() for p in checkpoint.split(","))):
        runs = []
        if os.path.isdir(path) and not _is_model(path, backend):
            runs = [
                os.path.join(path, name)
                for name in sorted(os.listdir(path))
                if _is_model(os.path.join(path, name), backend)
            ]
        paths += runs or [path]
    return paths


@dataclasses.dataclass(frozen=True)
class Member:
    """One model of an `Ensemble`.

    Attributes:
        path: where it was restored from.
        model: as `restore` returns one model: {"params", "batch_stats"} or an `OnnxModel`.
        meta: its checkpoint's meta; its `config["model"]` builds its network, so
            members may differ in architecture (a joined no-contrast pair among them).
    """

    path: str
    model: object
    meta: dict


@dataclasses.dataclass(frozen=True)
class Ensemble:
    """Several models predicting together: `batch_probabilities` averages their pixel
    and slice tumour probabilities (and the flipped slices' with `eval.flip_tta`), and
    gives the standard deviation across them as the pixel uncertainty.

    Attributes:
        members: the models; they read the same input (`config_schema.INPUT_FIELDS`).
    """

    members: tuple[Member, ...]

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
                "checkpoint": os.path.abspath(m.path),
                "step": int(m.meta["step"]),
                "detection_threshold": _threshold(m.meta),
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


def _threshold(meta: dict) -> float:
    """A checkpoint's detection threshold, chosen on its validation patients (0.5 if none)."""
    return meta.get("val_metrics", {}).get("detection_threshold", 0.5)


def _restore_one(path: str, backend: str):
    if backend == "jax":
        return checkpointing.restore_model(path)
    model = OnnxModel(find_onnx(path))
    logging.info("Predicting with %s on ONNX Runtime (step %d)", model.path, model.meta["step"])
    return model, model.meta


def restore(path: str, backend: str = "jax"):
    """The model that eval and predict run on `backend`, and its meta.

    Args:
        path: `config.checkpoint`: a workdir or checkpoint (jax); an .onnx file, or a
            folder or workdir holding one (`find_onnx`; onnx); or several models, as a
            comma-separated list or a folder of runs (`model_paths`).
        backend: `config.inference.backend`, "jax" or "onnx".

    Returns:
        (model, meta): model is {"params", "batch_stats"} (jax) or an `OnnxModel`
        (onnx), or an `Ensemble` of them for several models (meta: `Ensemble.meta`);
        what `batch_probabilities`' call takes in place of the JAX variables.

    Raises:
        errors.CheckpointError: a model cannot be restored, or two members read
            different inputs (the message names both and the field).
    """
    paths = model_paths(path, backend)
    if len(paths) == 1:
        return _restore_one(paths[0], backend)
    members = tuple(Member(p, *_restore_one(p, backend)) for p in paths)
    first = members[0]
    for member in members[1:]:
        differ = config_schema.input_differences(first.meta, member.meta)
        if differ:
            raise errors.CheckpointError(
                f"{first.path} and {member.path} read different inputs ({'; '.join(differ)}); "
                f"the members of an ensemble must agree on {', '.join(config_schema.INPUT_FIELDS)}"
            )
    ensemble = Ensemble(members)
    logging.info("Predicting with an ensemble of %d models: %s", len(members), ", ".join(paths))
    return ensemble, ensemble.meta


def spread(views: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The ensemble's probability and its uncertainty from the views' probabilities.

    Args:
        views: [V, ...] probabilities of V views of the same slices (members, and each
            member's mirrored slices with `eval.flip_tta`).

    Returns:
        (mean [...], standard deviation [...]) over the views, float32; the s.d. is the
        population one (ddof 0): 0 for a single view, and where all views agree.
    """
    views = np.asarray(views, np.float32)
    return views.mean(axis=0), views.std(axis=0)


def batch_probabilities(config: ml_collections.ConfigDict) -> Callable:
    """The model call of either backend, of one model or an ensemble, with flip TTA: the
    one place that tells them apart.

    Args:
        config: a run config with the checkpoint's `model.*` fields (`checkpoint_config`)
            and `eval.batch_size`, `eval.flip_tta`.

    Returns:
        probabilities(model, images) -> (mask [N, S, S], tumor [N], mask_std [N, S, S])
        float32 numpy: the pixel and slice tumour probabilities of images [N, S, S, C]
        float32 model inputs, each the mean over the views (`spread`: every member of an
        `Ensemble`, and with `eval.flip_tta` each one's prediction of the left-right
        mirrored slices mirrored back), and the pixel probabilities' s.d. over the views
        (0 for one model without flip TTA). `model` is as `restore` returns it. JAX
        variables run by `pmapped_predict_step` (built from `config.model`; an ensemble
        member's from its own meta) over the local devices in batches of
        `eval.batch_size` rounded up to a multiple of the devices, the last one padded:
        one compilation per architecture; an `OnnxModel` runs on the host in batches of
        the same size (it holds its weights).
    """
    flip_tta = config.eval.flip_tta
    devices = jax.local_device_count()
    batch_size = -(-config.eval.batch_size // devices) * devices
    steps = {}  # one compiled step per architecture among the members

    def view(model, model_config, images):
        if isinstance(model, OnnxModel):
            return model(images)
        key = json.dumps(config_schema.plain(model_config), sort_keys=True)
        if key not in steps:
            steps[key] = pmapped_predict_step(models.create_model(model_config))
        padded, n = parallel.pad_batch({"image": images}, batch_size)
        _, out = jax.device_get(steps[key](model, parallel.split_for_devices(padded)))
        return out["mask"].reshape(-1, *out["mask"].shape[2:])[:n], out["tumor"].reshape(-1)[:n]

    def run(model, images):
        members = [(model, config.model)]
        if isinstance(model, Ensemble):
            members = [(m.model, m.meta["config"]["model"]) for m in model.members]
        masks, tumors = [], []
        for member, model_config in members:
            mask, tumor = view(member, model_config, images)
            masks.append(mask)
            tumors.append(tumor)
            if flip_tta:  # brains are roughly left-right symmetric
                mask, tumor = view(member, model_config, np.ascontiguousarray(images[:, :, ::-1]))
                masks.append(mask[:, :, ::-1])
                tumors.append(tumor)
        (mask, mask_std), (tumor, _) = spread(masks), spread(tumors)
        return mask, tumor, mask_std

    def probabilities(model, images):
        outputs = [
            run(model, images[start : start + batch_size])
            for start in range(0, len(images), batch_size)
        ]
        return tuple(np.concatenate(parts) for parts in zip(*outputs, strict=True))

    return probabilities


@dataclasses.dataclass(frozen=True)
class Prediction:
    """A prediction of N slices; H x W the largest slice's, smaller ones in the top-left
    corner (0 and False beyond them).

    Attributes:
        probabilities: [N, H, W] float32 pixel tumour probabilities at each slice's size
            (before the detection gate).
        masks: [N, H, W] bool: probability >= 0.5 on slices called tumour
            (`tumor_probabilities` >= the detection threshold), post-processed.
        tumor_probabilities: [N] float32 slice tumour probabilities.
        uncertainty: [N, H, W] float32 pixel uncertainty: the s.d. of the pixel
            probability across an ensemble's members and flips (`batch_probabilities`),
            resized as the probabilities are; 0 for one model without `eval.flip_tta`.
    """

    probabilities: np.ndarray
    masks: np.ndarray
    tumor_probabilities: np.ndarray
    uncertainty: np.ndarray


class Predictor:
    """Runs a model on one patient's slices at a time.

    Args:
        model: as `restore` returns it: {"params", "batch_stats"}, an `OnnxModel` or an
            `Ensemble`.
        config: a run config with the model's `model.*` and `data.*` fields and
            `eval.batch_size`, `eval.flip_tta`, `eval.postprocess`.
        threshold: slice detection threshold (a slice below it gets an empty mask).
    """

    def __init__(self, model, config: ml_collections.ConfigDict, threshold: float):
        self.model = model
        self.config = config
        self.threshold = threshold
        self.postprocess = config.eval.postprocess
        self._run = batch_probabilities(config)

    @classmethod
    def from_checkpoint(
        cls, path: str, config: ml_collections.ConfigDict | None = None, backend: str = ""
    ):
        """Restores a workdir, checkpoint or exported model (`restore`).

        Args:
            path: the checkpoint; with the onnx backend an .onnx file or a folder holding
                `model.onnx` (`find_onnx`); several, comma-separated or a folder of runs,
                predict as an `Ensemble`.
            config: run config for the evaluation settings (`eval.*`); the model-defining
                fields always come from the checkpoint (`config_schema.checkpoint_config`).
                None: the checkpoint's own config.
            backend: "jax" or "onnx" (ONNX Runtime); "" = `config.inference.backend`, or
                "jax" without a config.
        """
        backend = backend or (config.inference.backend if config is not None else "jax")
        model, meta = restore(path, backend)
        config = config_schema.checkpoint_config(
            config or ml_collections.ConfigDict(meta["config"]), meta
        )
        return cls(model, config, _threshold(meta))

    def preprocess(self, slices: list) -> np.ndarray:
        """One patient's slices -> model inputs.

        Args:
            slices: N [H_i, W_i, 3] uint8 slices in slice order.

        Returns:
            [N, S, S, C] float32, S = `data.image_size`, C = `models.input_channels`.
        """
        size = self.config.data.image_size
        resized = np.concatenate([preprocess.resize_images(s[None], size) for s in slices])
        method = self.config.data.normalization
        # The slices passed together are one volume, in order along its axis.
        volume = np.zeros(len(slices))
        stats = inputs.volume_statistics(resized, volume) if method == "volume" else None
        k = self.config.data.get("context_slices", 0)
        image = inputs.stack_context(resized, inputs.neighbours(volume, np.arange(len(slices)), k))
        return inputs.model_input(image, stats, normalization=method)

    def _probabilities(self, inputs: np.ndarray) -> tuple[np.ndarray, ...]:
        """The model call (one method, so a test can stand in for the model).

        Args:
            inputs: [N, S, S, C] float32 model inputs (`preprocess`).

        Returns:
            ([N, S, S] float32 pixel probabilities, [N] float32 slice tumour probabilities,
            [N, S, S] float32 pixel probabilities' s.d.), as `batch_probabilities`.
        """
        return self._run(self.model, inputs)

    def predict(self, images) -> Prediction:
        """Predicts one patient's slices (or any slices, with a per-slice model).

        Args:
            images: the slices in slice order (the order matters for "volume"
                normalisation, 2.5-D models and the largest component): an [N, H, W, 3]
                uint8 array (pre-contrast, FLAIR, post-contrast), an [N, H, W] uint8
                array (FLAIR only: copied into the other two channels, as the LGG data
                fill a sequence that was not acquired), or a sequence of [H_i, W_i, 3]
                or [H_i, W_i] uint8 slices of any sizes.

        Returns:
            The `Prediction`.

        Raises:
            ValueError: no slices, or a slice that is not [H, W, 3] or [H, W] uint8.
        """
        slices = []
        for image in images:
            image = np.asarray(image)
            if image.ndim == 2:
                image = np.repeat(image[..., None], 3, axis=-1)
            if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
                raise ValueError(
                    f"slice {len(slices)}: expected [H, W, 3] or [H, W] uint8, got "
                    f"{image.shape} {image.dtype}"
                )
            slices.append(image)
        if not slices:
            raise ValueError("no slices to predict")
        small, tumor, small_std = self._probabilities(self.preprocess(slices))
        heights, widths = zip(*(s.shape[:2] for s in slices), strict=True)
        probabilities = postprocess.probabilities_at_original_size(small, heights, widths)
        uncertainty = postprocess.probabilities_at_original_size(small_std, heights, widths)
        masks = postprocess.decide(probabilities, tumor, self.threshold)
        if self.postprocess == "largest_component":  # as evaluation: after the gate
            masks = postprocess.largest_component_3d(masks)
        return Prediction(probabilities, masks, tumor, uncertainty)
