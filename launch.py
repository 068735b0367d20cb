"""Trains, evaluates or predicts with a ResUNet; main is intentionally short.

python launch.py --config=configs/resunet.py --workdir=DIR [--mode=train|eval|predict|export|cv]
    [--config.KEY=VALUE ...]
"""

import logging as pylogging
import sys

import jax
from absl import app, flags, logging
from jax.experimental import multihost_utils
from ml_collections import config_flags

from resunet_jax import calibrate, config_schema, errors, evaluate, export, predict, train

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (ml_collections).")
flags.DEFINE_string("workdir", None, "Run directory: checkpoints, logs, reports.")
flags.DEFINE_enum(
    "mode",
    "train",
    list(config_schema.MODES),
    "train (resumes by itself), eval (restores the best checkpoint, writes WORKDIR/eval/), "
    "predict (--config.predict.input=PATH -> WORKDIR/predict/), export (the checkpoint "
    "as ONNX -> WORKDIR/export/model.onnx), cv (the runs of k folds in --config.checkpoint, "
    "each scored on its own fold -> WORKDIR/cv/) or calibrate (thresholds and the review "
    "rule chosen out-of-fold -> calibration.json beside the model, WORKDIR/calibrate/).",
)
flags.mark_flags_as_required(["config", "workdir"])


class _QuietOrbax(pylogging.Filter):
    """Drops orbax's per-save INFO chatter; its warnings and errors still show."""

    def filter(self, record):
        return record.levelno >= pylogging.WARNING or "orbax" not in record.pathname


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.get_absl_handler().addFilter(_QuietOrbax())
    # Defaults are resolved once: the config validated is the config that runs.
    config = config_schema.resolve_defaults(FLAGS.config)
    if config.distributed.enabled:
        dist = config.distributed
        jax.distributed.initialize(
            dist.coordinator_address or None,
            dist.num_processes or None,
            None if dist.process_id < 0 else dist.process_id,
        )
    logging.info(
        "JAX process %d/%d, devices: %s", jax.process_index(), jax.process_count(), jax.devices()
    )
    run = {
        "train": train.train_and_evaluate,
        "eval": evaluate.evaluate_checkpoint,
        "predict": predict.predict,
        "export": export.export,
        "cv": evaluate.cross_validate,
        "calibrate": calibrate.calibrate,
    }[FLAGS.mode]
    try:
        # Before anything is written: a bad value costs one line, not a run.
        config_schema.validate(config, FLAGS.mode)
        run(config, FLAGS.workdir)
    except errors.UserError as e:
        # Bad data, checkpoints or settings: one clear message, no traceback (see it
        # with --verbosity=1). Any other exception is a bug and keeps its traceback.
        logging.debug("Traceback", exc_info=True)
        logging.error("%s", e)
        sys.exit(1)
    if config.distributed.enabled:
        # Leave together: a process whose coordinator has already gone aborts.
        multihost_utils.sync_global_devices("resunet_jax done")
        jax.distributed.shutdown()


def parse_flags(argv):
    """absl's flag parsing, after a check of the --config.KEY overrides: a mistyped key
    gets one line naming it and the nearest valid one (ml_collections would raise)."""
    try:
        config_schema.check_overrides(argv)
    except errors.ConfigError as e:
        print(f"launch.py: {e}", file=sys.stderr)
        sys.exit(2)
    return app.parse_flags_with_usage(argv)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
