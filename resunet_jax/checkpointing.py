"""Orbax checkpoints: the latest few for resuming, the best by validation Dice, exports.

A checkpoint step holds up to three items:
  model: {"params", "batch_stats"}      what evaluation and prediction need (the
                                        TrainState's moving average `ema`)
  train: {"opt_state", "step",          the raw weights and optimizer state, only in
          "params", "batch_stats"}      training checkpoints
  meta:  JSON {"step", "config", ...}   the run config (model, image size, normalisation)
So an exported model (`pretrained/...`) is a checkpoint without `train`, and
evaluation restores the model from the checkpoint's own config.
"""

import contextlib
import fcntl
import json
import os
import socket
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from flax import traverse_util
from jax.experimental import multihost_utils

from resunet_jax.errors import CheckpointError  # also importable from here

LATEST_DIR = "checkpoints"
BEST_DIR = "checkpoints_best"
LOCK_FILE = "train.lock"


def _manager(directory, max_to_keep: int | None = None, create: bool = True):
    # Synchronous saves: when `save` returns the step is on disk, so a crash right after
    # it loses at most `checkpoint_every_steps` steps. A save takes well under a second.
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=create, enable_async_checkpointing=False
    )
    return ocp.CheckpointManager(epath.Path(directory).absolute(), options=options)


class Checkpointer:
    """The latest `keep` training checkpoints of a workdir, plus the best one.

    Args:
        workdir: run directory; checkpoints go to `workdir/checkpoints` and
            `workdir/checkpoints_best`.
        keep: how many of the latest checkpoints to keep.
    """

    def __init__(self, workdir: str, keep: int):
        # The folders appear with the first save, so a run refused before its first step
        # (bad data, a fine-tuning split with no patient left) leaves no empty ones.
        self.latest = _manager(os.path.join(workdir, LATEST_DIR), max_to_keep=keep, create=False)
        self.best = _manager(os.path.join(workdir, BEST_DIR), max_to_keep=1, create=False)

    def save(self, state, meta: dict, best: bool = False):
        """Saves a TrainState with JSON metadata `meta`; returns once it is on disk.

        The state is saved as host numpy arrays: pmap returns it replicated on each
        process's own devices, which orbax cannot write as one global array across
        processes; numpy arrays count as replicated and process 0 writes them.
        """
        manager = self.best if best else self.latest
        state = jax.device_get(state)
        manager.save(int(state.step), args=_save_args(state, meta), force=True)

    def restore_latest(self, abstract_state):
        """Restores the newest readable training checkpoint.

        A damaged step (say, files cut short by a crash) is skipped with a warning
        naming it; interrupted saves (`*.orbax-checkpoint-tmp*`) are never candidates.

        Args:
            abstract_state: TrainState of jax.ShapeDtypeStructs (from jax.eval_shape).

        Returns:
            (state, meta), or None when the workdir has no checkpoint.

        Raises:
            CheckpointError: the checkpoint was written by a different model (the
                message lists the mismatched parameter shapes), or no step is readable.
        """
        steps = sorted(self.latest.all_steps(), reverse=True)
        for step in steps:
            try:
                saved = self.latest.restore(
                    step,
                    args=ocp.args.Composite(
                        model=ocp.args.StandardRestore(), train=ocp.args.StandardRestore()
                    ),
                )
            except Exception as e:  # damaged files: fall back to the step before
                logging.warning(
                    "Checkpoint step %d in %s is unreadable (%s: %s); trying an older one",
                    step,
                    self.latest.directory,
                    type(e).__name__,
                    str(e)[:200],
                )
                self._set_aside(step)
                continue
            # Readable: from here on a failure means another config, not damage.
            check_compatible(saved["model"], _model_tree(abstract_state), step)
            try:
                restored = self.latest.restore(step, args=_restore_args(abstract_state))
            except Exception as e:
                raise CheckpointError(
                    f"checkpoint step {step} in {self.latest.directory} does not fit this "
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
        if steps:
            raise CheckpointError(
                f"{self.latest.directory}: none of the checkpoints {steps} is readable; "
                "move the folder away to start afresh"
            )
        return None

    def _set_aside(self, step: int):
        """Renames a damaged step to `<step>.damaged` (kept for inspection, never deleted)
        so that training can write that step again."""
        if jax.process_index() == 0:
            path = os.path.join(self.latest.directory, str(step))
            target = f"{path}.damaged"
            while os.path.exists(target):
                target += "+"
            os.rename(path, target)
            logging.warning("Moved the damaged checkpoint to %s", target)
        multihost_utils.sync_global_devices("resunet_jax damaged checkpoint set aside")
        self.latest.reload()

    def close(self):
        self.latest.close()
        self.best.close()


@contextlib.contextmanager
def workdir_lock(workdir: str):
    """Holds `workdir` for one training run; a second one started there stops at once.

    Two runs in one workdir would write the same checkpoint steps over each other. The
    lock is an flock on `workdir/train.lock`, which the kernel releases when its process
    ends however it ends (kill -9 included), so no stale lock is ever left to clear; the
    file names the holder for the error. Where the file system has no flock (some Lustre
    mounts) the run goes on with a warning. Multi-host: process 0 locks for all.

    Raises:
        CheckpointError: another process holds the lock.
    """
    holder, lock = None, None
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        path = os.path.join(workdir, LOCK_FILE)
        lock = open(path, "a+")  # noqa: SIM115 (held until the run ends)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "holder unknown"
        except OSError as e:
            logging.warning("Cannot lock %s (%s): nothing stops a second run here", path, e)
        else:
            lock.truncate(0)
            lock.write(
                f"pid {os.getpid()} on {socket.gethostname()}, "
                f"since {time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n"
            )
            lock.flush()
    if jax.process_count() > 1:
        busy = multihost_utils.broadcast_one_to_all(np.int32(holder is not None))
        holder = holder or ("see process 0's log" if busy else None)
    try:
        if holder is not None:
            raise CheckpointError(
                f"{os.path.abspath(workdir)} is in use by another training run ({holder}); "
                "wait for it, stop it (SIGTERM saves its step) or pass another --workdir"
            )
        yield
    finally:
        if lock is not None:
            lock.close()


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
    manager = _manager(directory, max_to_keep=1)
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
    data_complete, data_expert = m_complete["config"]["data"], m_expert["config"]["data"]
    differ = [
        f"data.{k}: {data_complete[k]!r} vs {data_expert[k]!r}"
        for k in ("image_size", "normalization", "context_slices")
        if data_complete[k] != data_expert[k]
    ]
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


def _candidates(path: str) -> list[tuple[str, int]]:
    """(manager directory, step) pairs to try for `path`, most preferred first.

    `path` may be a workdir (best checkpoint, then the latest ones), a checkpoint
    directory (its steps, newest first) or one step's directory.
    """
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such checkpoint or workdir")
    if os.path.isdir(os.path.join(path, "meta")) and os.path.basename(path).isdigit():
        return [(os.path.dirname(path), int(os.path.basename(path)))]
    if os.path.isdir(os.path.join(path, LATEST_DIR)) or os.path.isdir(os.path.join(path, BEST_DIR)):
        dirs = [os.path.join(path, BEST_DIR), os.path.join(path, LATEST_DIR)]
    else:
        dirs = [path]
    pairs = []
    for d in dirs:
        if os.path.isdir(d):
            steps = sorted((int(n) for n in os.listdir(d) if n.isdigit()), reverse=True)
            pairs += [(d, s) for s in steps]
    return pairs


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
            restored = manager.restore(
                step,
                args=ocp.args.Composite(
                    model=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()
                ),
            )
        except Exception as e:  # a damaged step: fall back to the next candidate
            logging.warning("Checkpoint %s step %d unreadable (%s); skipped", directory, step, e)
            continue
        finally:
            manager.close()
        logging.info("Restored model from %s step %d", directory, step)
        return dict(restored["model"]), dict(restored["meta"])
    raise CheckpointError(f"{path}: no readable checkpoint found")


def config_json(config) -> dict:
    """The run config as a JSON-compatible dict (stored in every checkpoint's meta)."""
    return json.loads(config.to_json())
