"""Checks a run's config before any work starts, so that a bad value costs one line.

Without these checks a bad value fails late and far from its cause: a batch size of 0
in a TensorFlow traceback, an image side the network cannot pool in a shape error
after the data are prepared, an unknown loss after the workdir is made.
"""

import os

import jax
import ml_collections

from resunet_jax import backends, losses, models, postprocess, preprocess, train
from resunet_jax.data import sources
from resunet_jax.errors import ConfigError

MODES = ("train", "eval", "predict", "export", "cv")


def validate(config: ml_collections.ConfigDict, mode: str) -> None:
    """Raises ConfigError naming the first field whose value the run cannot use.

    Fields left None take the data source's defaults (`sources.resolve_defaults`)
    first. Device counts come from JAX, so call this after `jax.distributed.initialize`.

    Args:
        config: the run config (configs/resunet.py's fields).
        mode: one of MODES.

    Raises:
        ConfigError: the message starts with the field and its value.
    """
    config = sources.resolve_defaults(config, synthetic=not config.data.dir)
    _choices(config, "loss", tuple(losses.LOSSES))
    _choices(config, "optimizer.name", train.OPTIMIZERS)
    _choices(config, "optimizer.schedule", train.SCHEDULES)
    _choices(config, "model.dtype", models.DTYPES)
    _choices(config, "data.normalization", preprocess.NORMALIZATIONS)
    _choices(config, "data.pipeline", train.PIPELINES)
    _choices(config, "eval.split", ("val", "all"))
    _choices(config, "eval.postprocess", postprocess.METHODS)
    _choices(config, "eval.missing_sequences", tuple(preprocess.MISSING_SEQUENCES))
    _choices(config, "inference.backend", backends.BACKENDS)

    for field in (
        "batch_size",
        "eval.batch_size",
        "log_every_steps",
        "eval_every_steps",
        "checkpoint_every_steps",
        "keep_checkpoints",
        "data.shuffle_buffer",
        "model.stem_features",
        "model.bottleneck_features",
        "synthetic.num_patients",
        "synthetic.slices_per_patient",
        "synthetic.size",
    ):
        _at_least(config, field, 1)
    for field in (
        "num_train_steps",
        "optimizer.warmup_steps",
        "optimizer.learning_rate",
        "optimizer.grad_clip_norm",
        "data.context_slices",
        "augment.rotate_degrees",
        "augment.scale",
        "augment.intensity",
        "augment.gamma",
    ):
        _at_least(config, field, 0)
    for field in ("augment.missing_sequences", "data.tumor_fraction"):
        _probability(config, field)
    if not 0 <= config.ema_decay < 1:
        _fail(config, "ema_decay", "must be in [0, 1)")
    if not all(isinstance(f, int) and f >= 1 for f in config.model.features):
        _fail(config, "model.features", "must be positive channel counts")
    _at_least(config, "data.num_folds", 2)
    if not 0 <= config.data.fold < config.data.num_folds:
        _fail(config, "data.fold", f"must be in [0, data.num_folds={config.data.num_folds})")

    # The network pools 2x2 once after the stem and once after each encoder block.
    depth = len(config.model.features) + 1
    side = 2**depth
    size = config.data.image_size
    if size is not None and (size < side or size % side):
        _fail(
            config,
            "data.image_size",
            f"must be a positive multiple of {side} (2 ** {depth} poolings)",
        )
    if not 0 <= config.model.deep_supervision < depth:
        _fail(config, "model.deep_supervision", f"must be in [0, {depth - 1}]")

    if mode == "train":
        devices = jax.process_count() * jax.local_device_count()
        if config.batch_size % devices:
            _fail(
                config,
                "batch_size",
                f"must divide over the {jax.process_count()} processes x "
                f"{jax.local_device_count()} devices ({devices})",
            )
        if config.model.no_contrast_expert:
            _fail(
                config,
                "model.no_contrast_expert",
                "is for evaluation and prediction: train the model for complete scans and "
                "the one for scans without the pre-contrast on their own and join them with "
                "checkpointing.join_no_contrast_expert",
            )
        if config.inference.backend != "jax":
            _fail(
                config,
                "inference.backend",
                "onnx runs an exported model in eval and predict; training validates its "
                "own weights with the jax backend",
            )
    out = config.export.path
    if mode == "export" and out and not out.endswith(".onnx") and os.path.exists(out):
        # A checkpoint folder is written whole; never over something already there.
        _fail(config, "export.path", "exists; a checkpoint export writes a new folder")
    if mode == "cv" and config.eval.split != "val":
        _fail(config, "eval.split", "--mode=cv scores each run on the patients it did not train on")
    if mode == "predict" and not config.predict.input:
        _fail(config, "predict.input", "--mode=predict needs a .tif, or a folder of them")


def _get(config, field: str):
    node = config
    for part in field.split("."):
        node = node[part]
    return node


def _fail(config, field: str, problem: str):
    raise ConfigError(f"config.{field}={_get(config, field)!r}: {problem}")


def _choices(config, field: str, choices: tuple):
    if _get(config, field) not in choices:
        _fail(config, field, f"must be one of {', '.join(repr(c) for c in choices)}")


def _at_least(config, field: str, low: float):
    value = _get(config, field)
    if value is not None and value < low:
        _fail(config, field, f"must be at least {low}")


def _probability(config, field: str):
    value = _get(config, field)
    if value is not None and not 0 <= value <= 1:
        _fail(config, field, "must be in [0, 1]")
