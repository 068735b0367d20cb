"""The config schema: allowed values, defaults, validation, and the fields a checkpoint
fixes. Imports no training code, so every module can read it.

Validation runs before any work starts, so that a bad value costs one line: without it
a batch size of 0 fails in a TensorFlow traceback, an image side the network cannot
pool in a shape error after the data are prepared, an unknown loss after the workdir
is made.
"""

import difflib
import importlib.util
import json
import os

import jax
import ml_collections
from absl import logging

from resunet_jax.errors import ConfigError

MODES = ("train", "eval", "predict", "export", "cv", "calibrate")  # launch.py --mode
# The allowed values of each choice field; the modules that act on them read them here.
LOSSES = ("focal_tversky", "dice", "bce", "dice_bce", "slice_dice_bce")  # losses.LOSSES
OPTIMIZERS = ("adam", "adamw", "sgd")  # optimizer.name
SCHEDULES = ("cosine", "constant")  # optimizer.schedule
DTYPES = ("float32", "bfloat16")  # model.dtype
NORMALIZATIONS = ("scale", "slice", "volume")  # data.normalization
PIPELINES = ("tfdata", "device")  # data.pipeline
EVAL_SPLITS = ("val", "all")  # eval.split
POSTPROCESS = ("none", "largest_component")  # eval.postprocess
MISSING_SEQUENCES = ("", "pre", "post", "both")  # eval.missing_sequences (inputs.py)
# inference.backend: backends.REGISTRY, and "auto" (backends.resolve_backend)
BACKENDS = ("jax", "onnx", "openvino", "auto")
PRECISIONS = ("auto", "f32", "bf16", "int8")  # inference.precision
FLOAT32_PRECISIONS = ("auto", "f32")  # what jax and onnx run; the others need openvino


def resolve_defaults(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Fills fields left None with the data source's defaults (`config.defaults`).

    The synthetic demo needs a smaller image size and schedule than the real recipe;
    a value given explicitly (config file or command line) always wins. launch.py calls
    this once, before `validate`, and runs the config it returns; resolving a resolved
    config changes nothing.

    Args:
        config: the run config; `data.dir` empty means the synthetic data.

    Returns:
        A copy with the fields left None filled.
    """
    synthetic = not config.data.dir
    config = config.copy_and_resolve_references()

    def fill(node, defaults):
        for key, value in defaults.items():
            if isinstance(value, ml_collections.ConfigDict):
                fill(node[key], value)
            elif node[key] is None:
                node[key] = value

    with config.unlocked():
        fill(config, config.defaults.synthetic if synthetic else config.defaults.lgg)
    return config


def validate(config: ml_collections.ConfigDict, mode: str) -> None:
    """Raises ConfigError naming the first field whose value the run cannot use.

    `config` is resolved (`resolve_defaults`) first; fields still None are not checked.
    Device counts come from JAX, so call this after `jax.distributed.initialize`.

    Args:
        config: the run config (configs/resunet.py's fields).
        mode: one of MODES.

    Raises:
        ConfigError: the message starts with the field and its value.
    """
    _choices(config, "loss", LOSSES)
    _choices(config, "optimizer.name", OPTIMIZERS)
    _choices(config, "optimizer.schedule", SCHEDULES)
    _choices(config, "model.dtype", DTYPES)
    _choices(config, "data.normalization", NORMALIZATIONS)
    _choices(config, "data.pipeline", PIPELINES)
    _choices(config, "eval.split", EVAL_SPLITS)
    _choices(config, "eval.postprocess", POSTPROCESS)
    _choices(config, "eval.missing_sequences", MISSING_SEQUENCES)
    _choices(config, "inference.backend", BACKENDS)
    _choices(config, "inference.precision", PRECISIONS)
    precision = config.inference.precision
    if config.inference.backend in ("jax", "onnx") and precision not in FLOAT32_PRECISIONS:
        _fail(
            config,
            "inference.precision",
            f"runs on inference.backend=openvino (or auto), not {config.inference.backend}",
        )

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
        "export.calibration_slices",
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
        "augment.bias_field",
    ):
        _at_least(config, field, 0)
    for field in (
        "augment.missing_sequences",
        "augment.blur",
        "augment.skull_strip",
        "data.tumor_fraction",
    ):
        _probability(config, field)
    if not 0 <= config.augment.fov < 1:
        _fail(config, "augment.fov", "must be in [0, 1): the lowest zoom, 0 = off")
    if not 0 <= config.augment.window < 0.5:
        _fail(config, "augment.window", "must be in [0, 0.5), a share of the intensity range")
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
        if config.inference.backend not in ("jax", "auto"):
            _fail(
                config,
                "inference.backend",
                f"{config.inference.backend} runs an exported model in eval and predict; "
                "training validates its own weights with the jax backend",
            )
    out = config.export.path
    if mode == "export" and out and not out.endswith(".onnx") and os.path.exists(out):
        # A checkpoint folder is written whole; never over something already there.
        _fail(config, "export.path", "exists; a checkpoint export writes a new folder")
    if not 0 < config.calibrate.review_rate < 1:
        _fail(config, "calibrate.review_rate", "must be in (0, 1): the share of patients flagged")
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


def config_json(config) -> dict:
    """The run config as a JSON-compatible dict (stored in every checkpoint's meta)."""
    return json.loads(config.to_json())


# Config fields that define what a checkpoint's model expects; evaluation takes them
# from the checkpoint, not from the command line (`checkpoint_config`).
MODEL_FIELDS = (
    "model.stem_features",
    "model.features",
    "model.bottleneck_features",
    "model.dtype",
    "model.detection_head",
    "model.deep_supervision",
    "model.no_contrast_expert",
    "data.image_size",
    "data.normalization",
    "data.context_slices",
)


# The MODEL_FIELDS that define what a model reads: models joined into one, or predicting
# together as an ensemble, must agree on them.
INPUT_FIELDS = ("data.image_size", "data.normalization", "data.context_slices")


def _field(config: dict, field: str):
    for part in field.split("."):
        config = config[part]
    return config


def input_differences(meta_a: dict, meta_b: dict) -> list[str]:
    """The INPUT_FIELDS two checkpoints' configs disagree on, as "field: a vs b" lines."""
    a, b = meta_a["config"], meta_b["config"]
    return [
        f"{f}: {_field(a, f)!r} vs {_field(b, f)!r}"
        for f in INPUT_FIELDS
        if plain(_field(a, f)) != plain(_field(b, f))
    ]


def checkpoint_config(config: ml_collections.ConfigDict, meta: dict):
    """`config` with the model-defining fields (MODEL_FIELDS) of the checkpoint's config."""
    saved = ml_collections.ConfigDict(meta["config"])
    config = config.copy_and_resolve_references()
    with config.unlocked():
        for field in MODEL_FIELDS:
            *parents, leaf = field.split(".")
            dst, src = config, saved
            for p in parents:
                dst, src = dst[p], src[p]
            wanted, saved_value = plain(dst[leaf]), plain(src[leaf])
            if wanted is not None and wanted != saved_value:
                logging.warning(
                    "Using the checkpoint's %s=%s (the config had %s)", field, saved_value, wanted
                )
            dst[leaf] = src[leaf]
    return config


def plain(value):
    """A config value as JSON types, so tuples and lists compare equal."""
    if isinstance(value, ml_collections.ConfigDict):
        value = value.to_dict()
    return json.loads(json.dumps(value))


def config_keys(config) -> list[str]:
    """Every leaf key of a config (or dict), dotted: ["seed", "data.dir", ...]."""
    keys = []
    for name, value in config.items():
        if isinstance(value, (dict, ml_collections.ConfigDict)) and value:
            keys += [f"{name}.{k}" for k in config_keys(value)]
        else:
            keys.append(name)
    return keys


def check_key(config, key: str) -> None:
    """Raises ConfigError naming `key` (dotted) and the nearest valid one if `config` has
    no such field: a mistyped override costs one line, not a traceback."""
    node = config
    for part in key.split("."):
        if not isinstance(node, (dict, ml_collections.ConfigDict)) or part not in node:
            keys = config_keys(config)
            near = difflib.get_close_matches(key, keys, n=1, cutoff=0.5)
            hint = f"; did you mean {near[0]}?" if near else ""
            raise ConfigError(f"config.{key}: no such config key{hint}")
        node = node[part]


def load_config_file(path: str) -> ml_collections.ConfigDict:
    """The config of a config file (`PATH[:ARG]`, as launch.py's --config takes it)."""
    path, _, arg = path.partition(":")
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: no such config file")
    spec = importlib.util.spec_from_file_location("_resunet_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def check_overrides(argv: list[str]) -> None:
    """Checks every `--config.KEY=...` of a launch.py command line against its config
    file (`--config=PATH[:ARG]`) before the flags are parsed.

    Raises:
        ConfigError: a key the config does not have (`check_key`), or no config file.
    """
    path = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    overrides = [a[len("--config.") :].split("=", 1)[0] for a in argv if a.startswith("--config.")]
    if path is None or not overrides:
        return  # absl names a missing --config
    config = load_config_file(path)
    for key in overrides:
        check_key(config, key)
