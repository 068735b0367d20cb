"""Inference: a trained model as a Python object (slices in, probabilities and masks
out), on any backend (`backends`). No TensorFlow.

    from resunet_jax import inference

    predictor = inference.Predictor.from_checkpoint("pretrained/resunet_lgg")
    result = predictor.predict(images)  # one patient's [N, H, W, 3] uint8 slices, in order
    result.masks, result.probabilities, result.tumor_probabilities

`predict` brings the slices to the model's input exactly as evaluation does, with the
same functions (`preprocess`): each slice resized to `data.image_size`, normalised as
the checkpoint's `data.normalization` says ("volume" statistics over the slices passed
together), its neighbouring slices added for a 2.5-D model; the probabilities are
resized back to each slice's size, thresholded at 0.5 and gated by the checkpoint's
detection threshold, and with `eval.postprocess=largest_component` the largest 3D
component is kept. A joined model (`model.no_contrast_expert`, the shipped one) routes
each slice whose pre-contrast is a FLAIR copy to its no-contrast network.
`--mode=predict` is built on this module; the model is what `backends.restore` gives
(`inference.backend`: the JAX model, ONNX Runtime or OpenVINO).

Several checkpoints (comma-separated, or a folder of runs: `backends.model_paths`)
restore as a `backends.Ensemble`: each member routes and predicts the slices as it
would alone, and the probabilities are averaged over the members (and flips,
`eval.flip_tta`) before the 0.5 threshold and the detection gate (at the ensemble's
threshold); their standard deviation is the pixel uncertainty (`Prediction.uncertainty`).
"""

import dataclasses

import ml_collections
import numpy as np

from resunet_jax import backends, config_schema, inputs, postprocess, preprocess


@dataclasses.dataclass(frozen=True)
class Prediction:
    """A prediction of N slices; H x W the largest slice's, smaller ones in the top-left
    corner (0 and False beyond them).

    Attributes:
        probabilities: [N, H, W] float32 pixel tumour probabilities at each slice's size
            (before the detection gate).
        masks: [N, H, W] bool: probability >= the pixel threshold (0.5 unless
            calibrated) on slices called tumour
            (`tumor_probabilities` >= the detection threshold), post-processed.
        tumor_probabilities: [N] float32 slice tumour probabilities.
        uncertainty: [N, H, W] float32 pixel uncertainty: the s.d. of the pixel
            probability across an ensemble's members and flips (`backends.Model`),
            resized as the probabilities are; 0 for one model without `eval.flip_tta`.
    """

    probabilities: np.ndarray
    masks: np.ndarray
    tumor_probabilities: np.ndarray
    uncertainty: np.ndarray


class Predictor:
    """Runs a model on one patient's slices at a time.

    Args:
        model: a `backends.Model` (as `backends.restore` returns it).
        config: a run config with the model's `data.*` fields and `eval.postprocess`.
        threshold: slice detection threshold (a slice below it gets an empty mask).
    """

    def __init__(self, model, config: ml_collections.ConfigDict, threshold: float):
        self.model = model
        self.config = config
        self.threshold = threshold
        # A calibrated model (backends.read_calibration) brings its own pixel threshold,
        # post-processing and review rule.
        self.pixel_threshold = model.pixel_threshold
        self.postprocess = model.postprocess(config.eval.postprocess)
        self.review_threshold = model.review_threshold

    @classmethod
    def from_checkpoint(
        cls,
        path: str,
        config: ml_collections.ConfigDict | None = None,
        backend: str = "",
        precision: str = "",
    ):
        """Restores a workdir, checkpoint or exported model (`backends.restore`).

        Args:
            path: the checkpoint; with the onnx backend an .onnx file or a folder holding
                `model.onnx` (`backends.find_onnx`); several, comma-separated or a folder
                of runs, predict as a `backends.Ensemble`.
            config: run config for the evaluation settings (`eval.*`); the model-defining
                fields always come from the checkpoint (`config_schema.checkpoint_config`).
                None: the checkpoint's own config.
            backend: "jax", "onnx" (ONNX Runtime), "openvino" or "auto" (the fastest
                installed for the model: `backends.resolve_backend`); "" =
                `config.inference.backend`, or "jax" without a config.
            precision: "auto", "f32", "bf16" or "int8" (bf16 and int8 on OpenVINO); "" =
                `config.inference.precision`, or "auto" without a config.
        """
        backend = backend or (config.inference.backend if config is not None else "jax")
        model = backends.restore(path, backend, config, precision or None)
        config = config_schema.checkpoint_config(
            config or ml_collections.ConfigDict(model.meta["config"]), model.meta
        )
        return cls(model, config, model.threshold)

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
        rows = inputs.neighbours(volume, np.arange(len(slices)), k)
        return inputs.model_input(inputs.stack_context(resized, rows), stats, normalization=method)

    def _probabilities(self, inputs: np.ndarray) -> tuple[np.ndarray, ...]:
        """The model call (one method, so a test can stand in for the model).

        Args:
            inputs: [N, S, S, C] float32 model inputs (`preprocess`).

        Returns:
            ([N, S, S] float32 pixel probabilities, [N] float32 slice tumour probabilities,
            [N, S, S] float32 pixel probabilities' s.d.), as `backends.Model`.
        """
        return self.model.probabilities(inputs)

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
        masks = postprocess.decide(probabilities, tumor, self.threshold, self.pixel_threshold)
        if self.postprocess == "largest_component":  # as evaluation: after the gate
            masks = postprocess.largest_component_3d(masks)
        return Prediction(probabilities, masks, tumor, uncertainty)
