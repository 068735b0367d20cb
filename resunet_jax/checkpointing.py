"""Orbax checkpoints: the latest few for resuming and the best by validation Dice, exports.

A checkpoint step holds up to four items:
  model: {"params", "batch_stats"}      what evaluation and prediction need (the
                                        TrainState's moving average `ema`)
  train: {"opt_state", "step",          the raw weights and optimizer state, only in
          "params", "batch_stats"}      training checkpoints
  meta:  JSON {"step", "config", ...}   the run config (model, image size, normalisation)
  metrics: JSON {"dice_per_volume_mean"} orbax's own item; only in steps that were validated
So an exported model (`pretrained/...`) is a checkpoint without `train`, and
evaluation restores the model from the checkpoint's own config.

Crash consistency. A workdir's checkpoints are one orbax folder, `checkpoints/`, and the
best checkpoint is not a second copy but the validated step with the highest Dice
among those kept (orbax keeps the newest `keep` steps and the best one). So each save
is one atomic step commit and there is no second save for a crash to fall between.
Orbax guarantees relied on (synchronous saves, local or POSIX file systems):
  1. a step's items, its validation metrics included, are written into
     `<step>.orbax-checkpoint-tmp-*` and renamed to `<step>` only when all are on
     disk, so a step folder exists complete or not at all;
  2. old steps are deleted only after the new step's rename;
  3. folders that are not `<int>` (temporary ones, our `<step>.damaged`) are not steps.
What (1)-(3) leave open is handled here: a step cut short afterwards (a crash while
orbax deletes an old step, a damaged disk) is set aside, never deleted; and a workdir
whose steps are all damaged refuses to start instead of training from step 0 over them.
The states of a workdir when training starts (`Checkpointer.restore_latest`):
  no step, nothing set aside  -> start at step 0
  a readable step             -> resume from the newest readable one (newer damaged
                                 ones are set aside as `<step>.damaged`)
  steps, none readable        -> set them aside and refuse; so does every later start
                                 until the user moves `checkpoints/` away deliberately
"""

import contextlib
import errno
import json
import logging as logging_lib
import os
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from flax import traverse_util
from jax.experimental import multihost_utils

from resunet_jax import config_schema
from resunet_jax.errors import CheckpointError

LATEST_DIR = "checkpoints"
DAMAGED_SUFFIX = ".damaged"
# The validation figure that ranks checkpoints (orbax's `metrics` item of a step).
BEST_METRIC = "dice_per_volume_mean"


def _score(metrics: dict) -> float:
    return metrics[BEST_METRIC]


def _manager(directory, keep: int | None = None, create: bool = True, cleanup: bool = False):
    """An orbax manager of `directory`; `keep` None keeps every step.

    Saves are synchronous: when `save` returns the step is on disk, so a crash right after
    it loses at most `checkpoint_every_steps` steps. `best_fn` ranks the steps saved with
    metrics, for `best_step` and for the preservation policy.
    """
    policy = None
    if keep is not None:
        policy = ocp.checkpoint_managers.AnyPreservationPolicy(
            [
                ocp.checkpoint_managers.LatestN(n=keep),
                ocp.checkpoint_managers.BestN(
                    get_metric_fn=_score, n=1, keep_checkpoints_without_metrics=False
                ),
            ]
        )
    options = ocp.CheckpointManagerOptions(
        create=create,
        enable_async_checkpointing=False,
        best_fn=_score,
        best_mode="max",
        preservation_policy=policy,
        cleanup_tmp_directories=cleanup,
    )
    _hide_closed_loop_errors()
    return ocp.CheckpointManager(epath.Path(directory).absolute(), options=options)


class Checkpointer:
    """A training run's checkpoints: the latest `keep` steps plus the best validated one.

    Args:
        workdir: run directory; checkpoints go to `workdir/checkpoints`.
        keep: how many of the latest steps to keep (the best is kept besides).
    """

    def __init__(self, workdir: str, keep: int):
        # The folder appears with the first save, so a run refused before its first step
        # (bad data, a fine-tuning split with no patient left) leaves no empty one.
        # Temporary folders of a save cut short are never a step; they are removed.
        self.directory = os.path.join(workdir, LATEST_DIR)
        self.manager = _manager(self.directory, keep=keep, create=False, cleanup=True)

    def save(self, state, meta: dict, val_metrics: dict | None = None):
        """Saves a TrainState with JSON `meta`; returns once the step is on disk.

        Args:
            state: the TrainState (replicated or host arrays).
            meta: JSON metadata; "step" is the state's step.
            val_metrics: the validation metrics of this step, if it was validated; they
                go into `meta["val_metrics"]` and rank the step for the best checkpoint.

        The state is saved as host numpy arrays: pmap returns it replicated on each
        process's own devices, which orbax cannot write as one global array across
        processes; numpy arrays count as replicated and process 0 writes them.

        Raises:
            CheckpointError: the step could not be written (disk full, read-only, ...).
        """
        state = jax.device_get(state)
        step = int(state.step)
        metrics = None
        if val_metrics is not None:
            meta = dict(meta, val_metrics=val_metrics)
            metrics = {BEST_METRIC: float(val_metrics[BEST_METRIC] or 0.0)}
        try:
            with _orbax_failures_quiet():
                self.manager.save(step, args=_save_args(state, meta), metrics=metrics, force=True)
        except Exception as e:
            cause = _os_error(e)
            if cause is None:
                raise
            raise CheckpointError(
                f"{self.directory}: cannot write checkpoint step {step} ({cause}); the "
                "checkpoints already there are kept: free space or fix the folder, then "
                "run the same command to resume"
            ) from e

    def best_step(self) -> int | None:
        """The kept step with the best validation Dice (None: none validated yet)."""
        return self.manager.best_step()

    def restore_latest(self, abstract_state):
        """Restores the newest readable training checkpoint (see the module docstring).

        A damaged step (say, files cut short by a crash) is set aside with a warning
        naming it; interrupted saves (`*.orbax-checkpoint-tmp*`) are never candidates.

        Args:
            abstract_state: TrainState of jax.ShapeDtypeStructs (from jax.eval_shape).

        Returns:
            (state, meta), or None when the workdir has no checkpoint.

        Raises:
            CheckpointError: the checkpoint was written by a different model or optimizer
                config (the message lists the mismatched parameter shapes), or there
                are checkpoints and none is readable.
        """
        steps = sorted(self.manager.all_steps(), reverse=True)
        for step in steps:
            try:
                with _orbax_failures_quiet():
                    saved = self.manager.restore(
                        step,
                        args=ocp.args.Composite(
                            model=ocp.args.StandardRestore(), train=ocp.args.StandardRestore()
                        ),
                    )
            except Exception as e:  # damaged files: fall back to the step before
                logging.warning(
                    "Checkpoint step %d in %s is unreadable (%s: %s); trying an older one",
                    step,
                    self.directory,
                    type(e).__name__,
                    _first_line(e),
                )
                self._set_aside(step)
                continue
            # Readable: from here on a failure means another config, not damage.
            check_compatible(saved["model"], _model_tree(abstract_state), step)
            try:
                with _orbax_failures_quiet():
                    restored = self.manager.restore(step, args=_restore_args(abstract_state))
            except Exception as e:
                raise CheckpointError(
                    f"checkpoint step {step} in {self.directory} does not fit this "
                    f"config's optimizer state ({type(e).__name__}: {str(e)[:300]}). Use the "
                    "optimizer settings it was trained with, or a new --workdir."
                ) from e
            train = restored["train"]
            state = abstract_state.replace(
                step=train["step"],
                params=train["params"],
                batch_stats=train["batch_stats"],
                opt_state=train["opt_state"],
                ema=restored["model"],
            )
            return state, restored["meta"]
        damaged = damaged_steps(self.directory)
        if damaged:
            # Starting at step 0 here would let the new run's saves delete what may still
            # be recovered, and would silently throw away the run.
            raise CheckpointError(
                f"{self.directory}: no readable checkpoint; the damaged ones are kept as "
                f"{', '.join(damaged)}. To train afresh deliberately, move {self.directory} "
                "away (or pass another --workdir)"
            )
        return None

    def _set_aside(self, step: int):
        """Renames a damaged step to `<step>.damaged` (kept for inspection, never deleted)
        so that training can write that step again."""
        if jax.process_index() == 0:
            path = os.path.join(self.directory, str(step))
            target = path + DAMAGED_SUFFIX
            while os.path.exists(target):
                target += "+"
            os.rename(path, target)
            logging.warning("Moved the damaged checkpoint to %s", target)
        multihost_utils.sync_global_devices("resunet_jax damaged checkpoint set aside")
        self.manager.reload()

    def close(self):
        self.manager.close()


def damaged_steps(directory: str) -> list[str]:
    """The names of the steps set aside as damaged in a checkpoint folder, sorted."""
    if not os.path.isdir(directory):
        return []
    return sorted(n for n in os.listdir(directory) if DAMAGED_SUFFIX in n)


class _DropOrbaxRecords(logging_lib.Filter):
    def filter(self, record):
        return "orbax" not in record.pathname


class _DropUnretrieved(logging_lib.Filter):
    def filter(self, record):
        return "exception was never retrieved" not in record.getMessage()


def _closed_loop(error) -> bool:
    return isinstance(error, RuntimeError) and "Event loop is closed" in str(error)


_closed_loop_errors_hidden = False


def _hide_closed_loop_errors():
    """Drops tensorstore's "Event loop is closed" reports from this process's output.

    After an orbax read or write fails (a damaged step, a full disk), tensorstore's
    pending callbacks raise that RuntimeError through `sys.excepthook` and
    `sys.unraisablehook`, hundreds of times, until the process ends (and asyncio logs
    their futures' exceptions as never retrieved); the failure itself
    is reported once, by us. Installed with the first checkpoint manager, for good,
    since the callbacks outlive the call that failed; every other error still shows.
    """
    global _closed_loop_errors_hidden
    if _closed_loop_errors_hidden:
        return
    _closed_loop_errors_hidden = True
    excepthook, unraisablehook = sys.excepthook, sys.unraisablehook

    def filtered_excepthook(kind, value, traceback):
        if not _closed_loop(value):
            excepthook(kind, value, traceback)

    def filtered_unraisablehook(unraisable):
        if not _closed_loop(unraisable.exc_value):
            unraisablehook(unraisable)

    sys.excepthook, sys.unraisablehook = filtered_excepthook, filtered_unraisablehook
    # The failed read's orbax futures, collected later, log "Task exception was never
    # retrieved" through asyncio (which nothing else here uses).
    logging_lib.getLogger("asyncio").addFilter(_DropUnretrieved())


@contextlib.contextmanager
def _orbax_failures_quiet():
    """Keeps orbax's own reports of a failed read or write out of the log.

    A read or write that fails makes orbax log the error with its traceback, from each
    of its threads; we report the failure once (a warning naming the step, or one
    CheckpointError), so those records are noise.
    """
    absl_logger = logging_lib.getLogger("absl")
    quiet = _DropOrbaxRecords()
    absl_logger.addFilter(quiet)
    try:
        yield
    finally:
        absl_logger.removeFilter(quiet)


def _first_line(error: BaseException, limit: int = 200) -> str:
    """An exception's message cut to its first line (tensorstore's run to pages)."""
    return (str(error).splitlines() or [""])[0][:limit]


def _os_error(error: BaseException) -> str | None:
    """The file-system fault behind `error` ("No space left on device: PATH"), if any.

    Orbax and tensorstore re-raise I/O faults as their own types, so the cause chain
    and the message are searched.
    """
    seen = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno is not None:
            return f"{os.strerror(seen.errno)}: {seen.filename or ''}".rstrip(": ")
        seen = seen.__cause__ or seen.__context__
    text = str(error)
    for errno_name in ("ENOSPC", "EROFS", "EACCES", "EDQUOT"):
        message = os.strerror(getattr(errno, errno_name))
        if message in text:
            return message
    return None


def check_compatible(saved: dict, expected: dict, step: int):
    """Raises CheckpointError naming every parameter whose shape differs.

    Args:
        saved: the checkpoint's {"params", "batch_stats"} (arrays).
        expected: the model's tree (arrays or ShapeDtypeStructs).
        step: the checkpoint's step, for the message.
    """
    saved = traverse_util.flatten_dict(saved, sep="/")
    expected = traverse_util.flatten_dict(expected, sep="/")
    problems = [f"{k}: missing in the checkpoint" for k in sorted(expected.keys() - saved.keys())]
    problems += [f"{k}: not in the model" for k in sorted(saved.keys() - expected.keys())]
    problems += [
        f"{k}: checkpoint {tuple(saved[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(saved.keys() & expected.keys())
        if tuple(saved[k].shape) != tuple(expected[k].shape)
    ]
    if problems:
        shown = "; ".join(problems[:8]) + (
            f"; ... {len(problems) - 8} more" if len(problems) > 8 else ""
        )
        raise CheckpointError(
            f"checkpoint step {step} was written by a different model config ({shown}). "
            "Use the model config it was trained with (when resuming: or a new --workdir)."
        )


def _model_tree(state):
    return state.ema


def _train_tree(state):
    return {
        "opt_state": state.opt_state,
        "step": state.step,
        "params": state.params,
        "batch_stats": state.batch_stats,
    }


def _save_args(state, meta):
    return ocp.args.Composite(
        model=ocp.args.StandardSave(_model_tree(state)),
        train=ocp.args.StandardSave(_train_tree(state)),
        meta=ocp.args.JsonSave(meta),
    )


def _restore_args(abstract_state):
    # numpy targets: restore to host arrays, which every process then broadcasts to its
    # devices (the mirror image of `Checkpointer.save`).
    abstract_state = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract_state)
    return ocp.args.Composite(
        model=ocp.args.StandardRestore(_model_tree(abstract_state)),
        train=ocp.args.StandardRestore(_train_tree(abstract_state)),
        meta=ocp.args.JsonRestore(),
    )


def export_model(directory: str, variables: dict, meta: dict):
    """Writes model variables (no optimizer state) as a one-step checkpoint directory."""
    manager = _manager(directory, keep=1)
    manager.save(
        int(meta["step"]),
        args=ocp.args.Composite(
            model=ocp.args.StandardSave(variables), meta=ocp.args.JsonSave(meta)
        ),
        force=True,
    )
    manager.wait_until_finished()
    manager.close()


def join_no_contrast_expert(complete: str, no_contrast: str) -> tuple[dict, dict]:
    """Joins two trained models into one that routes slices by their pre-contrast.

    The joined model (`model.no_contrast_expert`, models.NoContrastRouted) predicts
    slices whose pre-contrast is a FLAIR copy with `no_contrast` and all others with
    `complete`. Export it with `export_model`.

    Args:
        complete: workdir or checkpoint of the model for complete slices; the joined
            model keeps its config, step and detection threshold.
        no_contrast: workdir or checkpoint of the model for slices without their
            pre-contrast (e.g. trained with `augment.missing_sequences`).

    Returns:
        (variables {"params", "batch_stats"}, each {"complete", "no_contrast"}; meta,
        listing the patients either model trained on and where `no_contrast` came from).

    Raises:
        CheckpointError: either is joined already, or they differ in architecture or
            in the input they read (image size, normalisation, context slices).
    """
    (v_complete, m_complete), (v_expert, m_expert) = map(restore_model, (complete, no_contrast))
    for path, meta in ((complete, m_complete), (no_contrast, m_expert)):
        if meta["config"]["model"]["no_contrast_expert"]:
            raise CheckpointError(f"{path}: already a joined model (model.no_contrast_expert)")
    try:
        check_compatible(v_expert, v_complete, int(m_expert["step"]))
    except CheckpointError as e:
        raise CheckpointError(f"{no_contrast} is not the architecture of {complete}: {e}") from e
    differ = config_schema.input_differences(m_complete, m_expert)
    if differ:
        raise CheckpointError(
            f"{complete} and {no_contrast} read different inputs ({'; '.join(differ)})"
        )
    config = json.loads(json.dumps(m_complete["config"]))
    config["model"]["no_contrast_expert"] = True
    meta = dict(
        m_complete,
        config=config,
        no_contrast_expert={
            "checkpoint": no_contrast,
            "step": int(m_expert["step"]),
            "val_metrics": m_expert.get("val_metrics", {}),
        },
    )
    # Evaluation must skip the patients either model saw.
    meta["train_patients"] = sorted(
        set(m_complete["train_patients"]) | set(m_expert["train_patients"])
    )
    variables = {
        k: {"complete": v_complete[k], "no_contrast": v_expert[k]}
        for k in ("params", "batch_stats")
    }
    return variables, meta


def holds_checkpoint(path: str) -> bool:
    """Whether `path` is laid out as `restore_model` reads it: a workdir (with
    `checkpoints/`), a checkpoint folder (with step folders, as an exported model) or
    one step's folder."""
    if not os.path.isdir(path):
        return False
    if os.path.isdir(os.path.join(path, LATEST_DIR)):
        return True
    if os.path.isdir(os.path.join(path, "meta")) and os.path.basename(path).isdigit():
        return True
    return any(n.isdigit() and os.path.isdir(os.path.join(path, n)) for n in os.listdir(path))


def _candidates(path: str) -> list[tuple[str, int]]:
    """(checkpoint folder, step) pairs to try for `path`, most preferred first.

    `path` may be a workdir or a checkpoint folder (the best validated step, then the
    others newest first) or one step's folder.
    """
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such checkpoint or workdir")
    if os.path.isdir(os.path.join(path, "meta")) and os.path.basename(path).isdigit():
        return [(os.path.dirname(path), int(os.path.basename(path)))]
    if os.path.isdir(os.path.join(path, LATEST_DIR)):
        path = os.path.join(path, LATEST_DIR)
    steps = sorted((int(n) for n in os.listdir(path) if n.isdigit()), reverse=True)
    if not steps:
        return []
    manager = _manager(path, create=False)
    best = manager.best_step()
    manager.close()
    if best is not None:
        steps.remove(best)
        steps.insert(0, best)
    return [(path, s) for s in steps]


def preferred_step(path: str) -> int | None:
    """The step `restore_model` tries first at `path` (None: no step there)."""
    candidates = _candidates(path)
    return candidates[0][1] if candidates else None


def restore_model(path: str) -> tuple[dict, dict]:
    """Restores model variables and metadata from a workdir or checkpoint path.

    Prefers the best checkpoint, then the newest; an unreadable step is skipped with
    a warning naming it.

    Returns:
        ({"params", "batch_stats"} as arrays, meta dict with "step" and "config").

    Raises:
        CheckpointError: nothing restorable at `path`.
    """
    for directory, step in _candidates(path):
        manager = _manager(directory, create=False)
        try:
            with _orbax_failures_quiet():
                restored = manager.restore(
                    step,
                    args=ocp.args.Composite(
                        model=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()
                    ),
                )
        except Exception as e:  # a damaged step: fall back to the next candidate
            logging.warning(
                "Checkpoint %s step %d unreadable (%s); skipped", directory, step, _first_line(e)
            )
            continue
        finally:
            manager.close()
        logging.info("Restored model from %s step %d", directory, step)
        return dict(restored["model"]), dict(restored["meta"])
    raise CheckpointError(f"{path}: no readable checkpoint found")
