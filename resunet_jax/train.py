"""Training: TrainState, the pmap-ed train step, and the training loop.

Both batch sources (`data.pipeline`) feed the one step: "tfdata" streams uint8 batches
from the host (`input_pipeline`, the only TensorFlow here, imported only for it),
"device" keeps the training split on the devices (`device_source`). The step samples
(device source), augments (`augment`), trains and averages the weights.
"""

import functools
import itertools
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax.training import train_state

from resunet_jax import (
    augment,
    backends,
    checkpointing,
    config_schema,
    device_source,
    errors,
    evaluate,
    losses,
    metrics,
    models,
    parallel,
    summaries,
)
from resunet_jax.data import arrays, sources
from resunet_jax.workdir import workdir_lock


class TrainState(train_state.TrainState):
    """Flax TrainState plus BatchNorm statistics and a moving average of the model.

    Attributes:
        batch_stats: BatchNorm running statistics of the trained `params`.
        ema: exponential moving average of {"params", "batch_stats"} over the steps
            (see `train_step`). Validation, the checkpoints' model item, eval and
            predict use it: it is less noisy from one evaluation to the next than the
            raw weights. With `ema_decay` 0 it equals the raw weights.
    """

    batch_stats: Any
    ema: Any


def create_learning_rate_fn(config: ml_collections.ConfigDict) -> optax.Schedule:
    """Linear warm-up to `optimizer.learning_rate`, then cosine decay or constant."""
    opt = config.optimizer
    warmup = optax.linear_schedule(0.0, opt.learning_rate, max(opt.warmup_steps, 1))
    if opt.schedule == "cosine":
        after = optax.cosine_decay_schedule(
            opt.learning_rate, max(config.num_train_steps - opt.warmup_steps, 1), alpha=0.01
        )
    elif opt.schedule == "constant":
        after = optax.constant_schedule(opt.learning_rate)
    else:
        raise ValueError(f"unknown optimizer.schedule {opt.schedule!r}; use cosine or constant")
    return optax.join_schedules([warmup, after], [opt.warmup_steps])


def create_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """Adam (the seed's), AdamW or SGD with momentum; the config's schedule and clipping."""
    opt = config.optimizer
    lr = create_learning_rate_fn(config)
    if opt.name == "adam":
        tx = optax.adam(lr, eps=opt.eps)
    elif opt.name == "adamw":
        tx = optax.adamw(lr, eps=opt.eps, weight_decay=opt.weight_decay)
    elif opt.name == "sgd":
        tx = optax.sgd(lr, momentum=opt.momentum, nesterov=True)
    else:
        raise ValueError(f"unknown optimizer.name {opt.name!r}; use adam, adamw or sgd")
    if opt.grad_clip_norm:
        tx = optax.chain(optax.clip_by_global_norm(opt.grad_clip_norm), tx)
    return tx


def create_train_state(rng, config: ml_collections.ConfigDict, model) -> TrainState:
    """Initialises parameters and BatchNorm statistics for [1, S, S, C] inputs
    (C = `models.input_channels`)."""
    shape = (1, config.data.image_size, config.data.image_size, models.input_channels(config.data))
    # Initialise outside pmap: BatchNorm in eval mode needs no axis name. Jitted, it is
    # one compilation; eagerly, each of its hundreds of ops would compile on its own.
    init = jax.jit(functools.partial(model.init, train=False))
    variables = init(rng, jnp.zeros(shape, jnp.float32))
    return TrainState.create(
        apply_fn=model.apply,
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        ema={"params": variables["params"], "batch_stats": variables["batch_stats"]},
        tx=create_optimizer(config),
    )


def init_from_checkpoint(state: TrainState, path: str) -> tuple[TrainState, dict]:
    """Starts training from a checkpoint's weights (fine-tuning), with a fresh optimizer.

    Args:
        state: a new TrainState (step 0), whose shapes the checkpoint must match.
        path: a workdir, checkpoint directory or exported model (`restore_model`).

    Returns:
        (`state` with the checkpoint's parameters and BatchNorm statistics as both the
        raw weights and their moving average, step and optimizer state unchanged; the
        checkpoint's meta).

    Raises:
        errors.CheckpointError: the checkpoint is of a different model config.
    """
    variables, meta = checkpointing.restore_model(path)
    expected = {"params": state.params, "batch_stats": state.batch_stats}
    checkpointing.check_compatible(variables, expected, int(meta["step"]))
    variables = jax.tree.map(jnp.asarray, variables)
    logging.info("Fine-tuning from %s (step %d)", path, int(meta["step"]))
    state = state.replace(
        params=variables["params"], batch_stats=variables["batch_stats"], ema=variables
    )
    return state, meta


def deep_supervision_loss(loss, aux_logits, masks, loss_fn, axis_name):
    """nnU-Net's deep supervision: the full-resolution loss and those of the coarser heads.

    Args:
        loss: the loss of the full-resolution logits.
        aux_logits: k logit maps [B, H/2**j, W/2**j, 1], j = 1..k.
        masks: [B, H, W, 1] ground truth; each head is scored against it average-pooled
            to the head's side (the share of tumour in each cell, a soft target).
        loss_fn: a `losses` function.
        axis_name: the pmap axis.

    Returns:
        The weighted mean of the k + 1 losses, weights 1, 1/2, ..., 1/2**k.
    """
    masks = masks.astype(jnp.float32)
    total, weights = loss, 1.0
    for j, logits in enumerate(aux_logits, start=1):
        window = (2**j, 2**j)
        total += 0.5**j * loss_fn(logits, nn.avg_pool(masks, window, window), axis_name)
        weights += 0.5**j
    return total / weights


def train_step(
    state: TrainState,
    batch,
    *,
    loss_fn,
    prepare=None,
    seed: int = 0,
    detection_weight: float = 0.0,
    ema_decay: float = 0.0,
    axis_name=parallel.AXIS_NAME,
):
    """One optimizer step on this device's share of the global batch (run under pmap).

    Args:
        state: TrainState, identical on all devices.
        batch: what the batch source yields for this device (`prepare` makes the model's
            batch of it), or with `prepare` None the model's batch itself: {"image":
            [b, S, S, C] float32, "mask": [b, S, S, 1] {0, 1}}.
        loss_fn: a `losses` function taking (logits, masks, axis_name).
        prepare: `prepare(key, batch) -> model batch`: sampling (device source) and
            augmentation (`batch_preparation`), with the step's key, which is `seed`
            folded with the step number, so that a resumed run draws what an
            uninterrupted one would.
        seed: `config.seed`.
        detection_weight: weight of the detection head's slice-level BCE (0: no head).
        ema_decay: decay of `state.ema`, capped early on at (1 + step) / (10 + step)
            (as tf.train.ExponentialMovingAverage's num_updates) so that the average
            forgets the random initialisation; 0 = the raw weights.
        axis_name: the pmap axis.

    Returns:
        (new state, metrics): metrics are global-batch scalars {"loss", "dice"}.
    """
    if prepare is not None:
        batch = prepare(jax.random.fold_in(jax.random.key(seed), state.step), batch)
    binary_mask = batch["mask"] >= 0.5
    has_tumor = jnp.any(binary_mask, axis=(1, 2, 3))

    def compute_loss(params):
        outputs, updates = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats},
            batch["image"],
            train=True,
            mutable=["batch_stats"],
        )
        loss = loss_fn(outputs["mask"], batch["mask"], axis_name)
        if "aux_masks" in outputs:
            loss = deep_supervision_loss(
                loss, outputs["aux_masks"], batch["mask"], loss_fn, axis_name
            )
        if detection_weight:
            loss += detection_weight * losses.binary_cross_entropy(
                outputs["tumor"], has_tumor, axis_name
            )
        return loss, (outputs["mask"], updates)

    (loss, (logits, updates)), grads = jax.value_and_grad(compute_loss, has_aux=True)(state.params)
    # Each device's gradient is its share of the global loss's gradient (see
    # losses.global_sum), so the global gradient is their sum.
    grads = jax.lax.psum(grads, axis_name)
    # BatchNorm already averaged batch statistics over `axis_name`; the pmean only
    # guards against float round-off differences between replicas.
    batch_stats = jax.lax.pmean(updates["batch_stats"], axis_name)
    new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    decay = jnp.minimum(ema_decay, (1.0 + state.step) / (10.0 + state.step))
    ema = optax.incremental_update(
        {"params": new_state.params, "batch_stats": batch_stats}, state.ema, 1.0 - decay
    )
    new_state = new_state.replace(ema=ema)
    counts = metrics.slice_counts(logits > 0, binary_mask)
    totals = jax.lax.psum({k: jnp.sum(v) for k, v in counts.items()}, axis_name)
    dice = 2 * totals["intersection"] / jnp.maximum(totals["pred_area"] + totals["true_area"], 1)
    return new_state, {"loss": loss, "dice": dice}


def batch_preparation(
    config: ml_collections.ConfigDict, num_devices: int | None = None, axis_name=parallel.AXIS_NAME
):
    """The train step's first stage for `config.data.pipeline`: source batch -> model batch.

    "tfdata": the device's uint8 slices are augmented and normalised. "device": the
    resident training split (`device_source.put`) is sampled first, each example by its
    own key, so the global batch is the same on any number of devices.

    Args:
        config: run config (batch_size, data.*, augment).
        num_devices: devices the global batch is split over (default: all).
        axis_name: the pmap axis.

    Returns:
        `prepare(key, batch)` for `train_step`.
    """
    per_device = config.batch_size // (num_devices or jax.device_count())

    # Device source: every device draws on its own, so the devices' order is the batch's.
    processes = 1 if config.data.pipeline == "device" else jax.process_count()

    def prepare(key, batch):
        keys = augment.example_keys(key, per_device, axis_name, processes)
        if config.data.pipeline == "device":
            pick = jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys)
            batch = device_source.sample(pick, batch, config.data.tumor_fraction)
        return augment.augment_batch(keys, batch, config.augment, config.data.normalization)

    return prepare


def pmapped_train_step(config: ml_collections.ConfigDict, prepare: bool = True, devices=None):
    """`train_step` for `config` (loss, detection head, moving average, seed), pmap-ed.

    Args:
        config: run config.
        prepare: start from what `config.data.pipeline`'s source yields
            (`batch_preparation`); False: from ready model batches.
        devices: the devices to run on (default: all).
    """
    step = functools.partial(
        train_step,
        loss_fn=losses.get_loss(config.loss),
        prepare=batch_preparation(config, devices and len(devices)) if prepare else None,
        seed=config.seed,
        detection_weight=config.detection_loss_weight if config.model.detection_head else 0.0,
        ema_decay=config.ema_decay,
    )
    return parallel.pmap_step(step, devices)


def training_patients(earlier: list, this_run) -> list:
    """The patients a checkpoint has seen, recorded in its meta as `train_patients`.

    The list travels with every checkpoint so that evaluation on any folder scores only
    patients the model never saw (evaluate.patients_to_evaluate). A fine-tuned model has
    also seen the patients its starting point trained on.

    Args:
        earlier: patients seen before this run (a resumed run's or a fine-tuning start
            point's list; [] for a fresh run).
        this_run: this run's training patient ids.

    Returns:
        The sorted union.
    """
    return sorted(set(earlier) | set(this_run))


def check_patients_left_to_validate(source, train_patients: list, split: str) -> None:
    """Fails before training when the final evaluation would have no unseen patient.

    A fine-tuning start point may have trained on this split's validation patients
    (the shipped model fine-tuned on another fold, say): its in-loop validation is then
    optimistic, and when no patient of `data.dir` is left unseen the final evaluation
    (evaluate.patients_to_evaluate) would refuse only after the whole run.

    Raises:
        errors.DataError: eval.split=val and every patient of `data.dir` is in `train_patients`.
    """
    seen_val = sorted(set(source.val_ids) & set(train_patients))
    if seen_val:
        logging.warning(
            "%d of the %d validation patients were in the start point's training set, so "
            "validation during training is optimistic: %s",
            len(seen_val),
            len(source.val_ids),
            ", ".join(seen_val),
        )
    evaluate.patients_to_evaluate(source, train_patients, split)  # its refusal, before training


def _mean_metrics(history: list[dict]) -> dict:
    stacked = jax.device_get(history)
    return {k: float(np.mean([h[k] for h in stacked])) for k in stacked[0]}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains with periodic validation and checkpoints, then writes the final evaluation.

    Resumes from the newest checkpoint in `workdir`. The final evaluation restores the
    best checkpoint exactly as `--mode=eval` does and writes `workdir/eval/`. `config`
    is resolved and accepted by `config_schema.validate(config, "train")` (launch.py
    does both).

    Returns:
        The final evaluation's metrics (the content of eval/metrics.json); None when
        pre-empted (SIGTERM: the step in flight is checkpointed).

    Raises:
        errors.CheckpointError: another run is training in `workdir`, or its
            checkpoints do not fit this config.
    """
    # The lock comes first: a second run started alongside must stop before it writes
    # anything (the synthetic data, prepared data, a summary file).
    with workdir_lock(workdir):
        source = sources.open_source(config, workdir, tfds=config.data.pipeline == "tfdata")
        return _train_and_evaluate(config, workdir, source)


def batches(source, config: ml_collections.ConfigDict, seed: int) -> Iterator:
    """What the train step takes each step, from `config.data.pipeline`'s source.

    Args:
        source: the opened data source (with its TFDS for "tfdata").
        config: run config.
        seed: the tf.data order's seed (a resumed run continues with a fresh but
            reproducible order); the device source's draws follow the step number.

    Returns:
        An endless iterator of device batches: "tfdata" the next uint8 batch, laid out
        [local_devices, b, ...]; "device" the same resident training split every step.
    """
    if config.data.pipeline == "device":
        slices = arrays.load(
            source.data_dir,
            source.slices,
            source.train_ids,
            config.data.image_size,
            sources.prepared_root(config),
        )
        return itertools.repeat(device_source.put(device_source.training_arrays(slices, config)))
    from resunet_jax import input_pipeline  # TensorFlow

    train_ds = input_pipeline.create_train_dataset(
        source.builder,
        source.train_ids,
        config,
        per_process_batch=config.batch_size // jax.process_count(),
        seed=seed,
    )
    return parallel.prefetch_to_device(input_pipeline.as_numpy(train_ds))


def _train_and_evaluate(config, workdir, source):
    """train_and_evaluate once the data are checked and the workdir is this run's."""
    model = models.create_model(config.model)
    rng = jax.random.key(config.seed)
    state = create_train_state(rng, config, model)
    checkpointer = checkpointing.Checkpointer(workdir, keep=config.keep_checkpoints)
    meta = {"config": config_schema.config_json(config)}
    restored = checkpointer.restore_latest(jax.eval_shape(lambda: state))
    earlier_patients = []
    if restored:
        state, meta = restored
        # A step's validation belongs to that step only, not to the ones saved after it.
        meta = dict(meta, config=config_schema.config_json(config))
        meta.pop("val_metrics", None)
        logging.info("Resuming from step %d", int(state.step))
        earlier_patients = meta["train_patients"]
    elif config.init_checkpoint:
        state, init_meta = init_from_checkpoint(state, config.init_checkpoint)
        earlier_patients = init_meta["train_patients"]
    meta["train_patients"] = training_patients(earlier_patients, source.train_ids)
    check_patients_left_to_validate(source, meta["train_patients"], config.eval.split)
    start_step = int(state.step)

    global_batch = config.batch_size
    train_iter = batches(source, config, seed=config.seed + start_step)
    evaluator = evaluate.Evaluator(source, config, source.val_ids)
    step_fn = pmapped_train_step(config)
    writer = summaries.SummaryWriter(f"{workdir}/tensorboard")

    logging.info(
        "Training %d -> %d steps, global batch %d over %d devices, %d train / %d val patients",
        start_step,
        config.num_train_steps,
        global_batch,
        jax.device_count(),
        len(source.train_ids),
        len(source.val_ids),
    )
    # Pre-emption (SIGTERM): finish the step in flight, checkpoint it, exit cleanly.
    preempted = threading.Event()
    previous_handler = signal.signal(signal.SIGTERM, lambda *_: preempted.set())
    try:
        completed = _train_loop(
            config,
            state,
            start_step,
            meta,
            step_fn,
            train_iter,
            evaluator,
            checkpointer,
            writer,
            preempted,
        )
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        try:
            writer.flush()
        except Exception as e:  # a full disk: the error in flight, if any, is the news
            logging.warning("TensorBoard summaries in %s/tensorboard not written: %s", workdir, e)
        checkpointer.close()
    if not completed:
        return None
    return evaluate.evaluate_checkpoint(config, workdir, source=source)


def _train_loop(
    config,
    state,
    start_step,
    meta,
    step_fn,
    train_iter,
    evaluator,
    checkpointer,
    writer,
    preempted,
) -> bool:
    """Runs steps start_step+1 .. num_train_steps; False if pre-empted (checkpoint saved)."""
    global_batch = config.batch_size
    lr_fn = create_learning_rate_fn(config)
    is_chief = jax.process_index() == 0
    history, t_last, step_last = [], time.perf_counter(), start_step
    for step in range(start_step + 1, config.num_train_steps + 1):
        state, step_metrics = step_fn(state, next(train_iter))
        history.append(step_metrics)
        is_last = step == config.num_train_steps
        is_preempted = preempted.is_set()
        is_checkpoint = step % config.checkpoint_every_steps == 0 or is_last or is_preempted
        # Metrics are checked before every save, so a checkpoint never holds NaNs.
        if step % config.log_every_steps == 0 or is_checkpoint:
            summary = _mean_metrics(history)
            history = []
            if not np.isfinite(summary["loss"]):
                raise errors.TrainingDivergedError(
                    f"non-finite training loss {summary['loss']} at step {step}; the last "
                    "good checkpoint is kept (lower optimizer.learning_rate?)"
                )
            elapsed = time.perf_counter() - t_last
            images_per_s = (step - step_last) * global_batch / elapsed
            eta = (config.num_train_steps - step) * elapsed / (step - step_last)
            t_last, step_last = time.perf_counter(), step
            logging.info(
                "step %d/%d  loss %.4f  dice %.3f  %.1f images/s  ETA %s",
                step,
                config.num_train_steps,
                summary["loss"],
                summary["dice"],
                images_per_s,
                time.strftime("%H:%M:%S", time.gmtime(eta)),
            )
            if is_chief:
                for k, v in summary.items():
                    writer.scalar(f"train/{k}", v, step)
                writer.scalar("train/images_per_s", images_per_s, step)
                writer.scalar("train/learning_rate", float(lr_fn(step)), step)
        val_metrics = None
        if (step % config.eval_every_steps == 0 or is_last) and not is_preempted:
            ema = backends.from_variables(state.ema, config)
            val_metrics, _ = evaluator.run(ema)
            logging.info(
                "step %d validation: dice_per_volume_mean %.4f  dice_tumor_slices_mean %.4f",
                step,
                val_metrics["dice_per_volume_mean"] or 0.0,
                val_metrics["dice_tumor_slices_mean"] or 0.0,
            )
            if is_chief:
                for k, v in val_metrics.items():
                    if isinstance(v, float):
                        writer.scalar(f"val/{k}", v, step)
                grid = evaluator.results_grid(ema, val_metrics["detection_threshold"])
                writer.image("val/results_grid", grid, step)
        # A validated step is always saved, with its metrics: the best checkpoint is
        # the kept step that scored highest, so it needs no save of its own.
        if is_checkpoint or val_metrics is not None:
            checkpointer.save(state, dict(meta, step=step), val_metrics)
            if val_metrics is not None and checkpointer.best_step() == step:
                logging.info("step %d is the best checkpoint so far", step)
        if is_preempted and not is_last:
            logging.warning(
                "SIGTERM: saved a checkpoint of step %d; run the same command to resume", step
            )
            return False
    return True
