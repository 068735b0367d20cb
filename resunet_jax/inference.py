"""A trained model as a Python object: slices in, probabilities and masks out.

    from resunet_jax import inference

    predictor = inference.Predictor.from_checkpoint("pretrained/resunet_lgg")
    result = predictor.predict(images)  # one patient's [N, H, W, 3] uint8 slices, in order
    result.masks, result.probabilities, result.tumor_probabilities

`predict` brings the slices to the model's input exactly as `--mode=predict` does (which
is built on it): each slice resized to `data.image_size`, normalised as the checkpoint's
`data.normalization` says ("volume" statistics over the slices passed together), its
neighbouring slices added for a 2.5-D model; the probabilities are resized back to each
slice's size, thresholded at 0.5 and gated by the checkpoint's detection threshold, and
with `eval.postprocess=largest_component` the largest 3D component is kept. A joined
model (`model.no_contrast_expert`, the shipped one) routes each slice whose pre-contrast
is a FLAIR copy to its no-contrast network. The resizing and normalisation still use the
tf.data helpers (`input_pipeline`), imported on the first prediction: evaluation resizes
with them, and `jax.image.resize` (antialiased) differs from TF's by one grey level at 2
of 100,000 resized values (60 LGG slices, 256 -> 128), so predictions would not equal
evaluation's.
"""

import dataclasses
import functools

import jax
import ml_collections
import numpy as np

from resunet_jax import context, evaluate, export, models, parallel, postprocess, train


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
    """

    probabilities: np.ndarray
    masks: np.ndarray
    tumor_probabilities: np.ndarray


class Predictor:
    """Runs a model on one patient's slices at a time.

    Args:
        model: the Flax model (`models.create_model`).
        variables: {"params", "batch_stats"}.
        config: a run config with the model's `data.*` fields and `eval.batch_size`,
            `eval.flip_tta`, `eval.postprocess`.
        threshold: slice detection threshold (a slice below it gets an empty mask).
    """

    def __init__(self, model, variables, config: ml_collections.ConfigDict, threshold: float):
        self.config = config
        self.threshold = threshold
        self.batch_size = config.eval.batch_size
        self.postprocess = config.eval.postprocess
        self.flip_tta = config.eval.flip_tta
        self.onnx = None
        if isinstance(variables, export.OnnxModel):  # the graph holds its own weights
            self.onnx = variables
        else:
            self.variables = jax.device_put(variables)  # once, not with every batch
            self._infer = jax.jit(functools.partial(train.infer, model, flip_tta=self.flip_tta))

    @classmethod
    def from_checkpoint(
        cls, path: str, config: ml_collections.ConfigDict | None = None, backend: str = ""
    ):
        """Restores a workdir, checkpoint or exported model (`export.restore`).

        Args:
            path: the checkpoint; with the onnx backend an .onnx file or a folder holding
                `model.onnx` (`export.find_onnx`).
            config: run config for the evaluation settings (`eval.*`); the model-defining
                fields always come from the checkpoint (`evaluate.checkpoint_config`).
                None: the checkpoint's own config.
            backend: "jax" or "onnx" (ONNX Runtime); "" = `config.inference.backend`, or
                "jax" without a config.
        """
        backend = backend or (config.inference.backend if config is not None else "jax")
        variables, meta = export.restore(path, backend)
        config = evaluate.checkpoint_config(
            config or ml_collections.ConfigDict(meta["config"]), meta
        )
        threshold = meta.get("val_metrics", {}).get("detection_threshold", 0.5)
        return cls(models.create_model(config.model), variables, config, threshold)

    def preprocess(self, slices: list) -> np.ndarray:
        """One patient's slices -> model inputs.

        Args:
            slices: N [H_i, W_i, 3] uint8 slices in slice order.

        Returns:
            [N, S, S, C] float32, S = `data.image_size`, C = `models.input_channels`.
        """
        from resunet_jax import input_pipeline  # TensorFlow, only when predicting

        size = self.config.data.image_size
        resized = np.stack(
            [
                input_pipeline.resize_example(
                    {"image": s, "mask": np.zeros(s.shape[:2] + (1,), np.uint8)}, size
                )["image"]
                for s in slices
            ]
        )
        method = self.config.data.normalization
        stats = None
        if method == "volume":
            moments = np.asarray(input_pipeline.slice_moments(resized)).sum(axis=0)
            stats = input_pipeline.volume_stats(moments)
        k = self.config.data.get("context_slices", 0)
        if k:  # the slices in the given order are the volume's axis
            neighbours = context.context_rows(np.zeros(len(slices)), np.arange(len(slices)), k)
            resized = context.stack_context(resized, neighbours)
        return np.asarray(input_pipeline.normalize(resized, method, stats))

    def _probabilities(self, inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The model call (one method, so another backend can replace it).

        Args:
            inputs: [N, S, S, C] float32 model inputs (`preprocess`).

        Returns:
            ([N, S, S] float32 pixel probabilities, [N] float32 slice tumour probabilities).
        """
        masks, tumors = [], []
        for start in range(0, len(inputs), self.batch_size):
            # Every batch padded to one size: one compilation.
            batch, n = parallel.pad_batch(
                {"image": inputs[start : start + self.batch_size]}, self.batch_size
            )
            if self.onnx is not None:
                mask, tumor = self.onnx(batch["image"], self.flip_tta)
            else:
                mask, tumor = jax.device_get(self._infer(self.variables, batch["image"]))
                mask = mask[..., 0]
            masks.append(mask[:n])
            tumors.append(tumor[:n])
        return np.concatenate(masks), np.concatenate(tumors)

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
        small, tumor = self._probabilities(self.preprocess(slices))
        heights, widths = zip(*(s.shape[:2] for s in slices), strict=True)
        probabilities = postprocess.probabilities_at_original_size(small, heights, widths)
        masks = probabilities >= 0.5
        masks &= (tumor >= self.threshold)[:, None, None]  # called tumour-free: empty
        if self.postprocess == "largest_component":  # as evaluation: after the gate
            masks = postprocess.largest_component_3d(masks)
        return Prediction(probabilities, masks, tumor)
