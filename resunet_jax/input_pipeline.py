"""Batch source "tfdata": training batches streamed from the prepared TFDS data.

Patients -> resize (`preprocess`) -> cache -> neighbouring slices as channels (2.5-D,
optional) -> repeat -> shuffle (or tumour-fraction sampling) -> per-process shard ->
batch -> uint8 `[local_devices, per_device_batch, H, W, C]`. Augmentation and
normalisation run on the devices, in the train step (`augment`); evaluation and
prediction read numpy arrays (`data/arrays.py`). With `data/tfds_lgg.py`, the only
modules that import TensorFlow.
"""

import jax
import numpy as np
import tensorflow as tf
from absl import logging

from resunet_jax import inputs, preprocess
from resunet_jax.data import tfds_lgg


def _select_patients(dataset: tf.data.Dataset, patient_ids) -> tf.data.Dataset:
    wanted = tf.constant(sorted(patient_ids))
    return dataset.filter(lambda ex: tf.reduce_any(tf.equal(ex["patient_id"], wanted)))


def add_context_and_stats(ds: tf.data.Dataset, k: int, volume_stats: bool) -> tf.data.Dataset:
    """Each "image" [S, S, 3] with its 2.5-D context, [S, S, 3(2k + 1)], and for "volume"
    normalisation its patient's statistics as "norm" [2, 3], both by `inputs`' functions.

    One pass over `ds` (cached, in a fixed order, with "patient_id" and "slice_index")
    reads every slice; each element then takes its neighbours (`inputs.neighbours`,
    `inputs.stack_context`) and statistics (`inputs.volume_statistics`) by its position
    in that order.

    Args:
        ds: resized examples, the same order on every pass.
        k: `data.context_slices`.
        volume_stats: whether to add "norm".

    Returns:
        `ds` unchanged when neither is asked for.
    """
    if not k and not volume_stats:
        return ds
    images, patients, positions = [], [], []
    keys = ds.map(lambda ex: (ex["image"], ex["patient_id"], ex["slice_index"]))
    for image, patient, position in keys.as_numpy_iterator():
        images.append(image)
        patients.append(patient)
        positions.append(position)
    if not images:
        return ds
    images = np.stack(images)
    rows = inputs.neighbours(patients, positions, k)
    stats = tf.constant(inputs.volume_statistics(images, patients) if volume_stats else 0.0)

    def add(i, ex):
        if k:
            image = tf.numpy_function(
                lambda i: inputs.stack_context(images, rows[i]), [i], tf.uint8, stateful=False
            )
            ex = dict(ex, image=tf.ensure_shape(image, [*images.shape[1:3], 3 * (2 * k + 1)]))
        if volume_stats:
            ex = dict(ex, norm=stats[i])
        return ex

    return ds.enumerate().map(add, tf.data.AUTOTUNE)


def _resize_for_training(example, image_size: int):
    """`preprocess.resize_images` / `resize_masks` on one example, in the tf.data graph."""

    def resize(image, mask):
        return (
            preprocess.resize_images(image[None], image_size)[0],
            preprocess.resize_masks(mask[None], image_size)[0],
        )

    image, mask = tf.numpy_function(
        resize, [example["image"], example["mask"]], [tf.uint8, tf.uint8], stateful=False
    )
    image.set_shape([image_size, image_size, 3])
    mask.set_shape([image_size, image_size, 1])
    return dict(example, image=image, mask=mask)


def create_train_dataset(
    builder, patient_ids, config, per_process_batch: int, seed: int
) -> tf.data.Dataset:
    """Endless, shuffled training batches of this process, as uint8 for the train step.

    Augmentation and normalisation happen on the devices, inside the train step
    (`train.batch_preparation`); this stream only decodes, resizes, caches, shuffles,
    samples and batches. With `data.tumor_fraction` set, slices with and without
    tumour are drawn at that rate; None keeps their natural proportion.

    Args:
        builder: prepared `LggBuilder`.
        patient_ids: training patients.
        config: the run config (uses data.*).
        per_process_batch: batch size of this process (global batch / process count).
        seed: shuffling seed; the stream is a pure function of it.

    Returns:
        Dataset of {"image": uint8 [D, b, S, S, 3n], "mask": uint8 [D, b, S, S, 1] in
        {0, 1}, and for "volume" normalisation "norm": float32 [D, b, 2, 3]},
        D = local devices, b = per_process_batch / D, n = 2 data.context_slices + 1.
    """
    devices = jax.local_device_count()
    if per_process_batch % devices:
        raise ValueError(
            f"batch_size per process ({per_process_batch}) must be divisible by the "
            f"{devices} local devices"
        )
    ds = _select_patients(
        builder.as_dataset(split=tfds_lgg.SPLIT, shuffle_files=False), patient_ids
    )
    keep = ("image", "mask", "patient_id", "slice_index")
    ds = ds.map(lambda ex: {k: ex[k] for k in keep})
    ds = ds.map(lambda ex: _resize_for_training(ex, config.data.image_size), tf.data.AUTOTUNE)
    ds = ds.cache()
    ds = add_context_and_stats(
        ds, config.data.context_slices, config.data.normalization == "volume"
    )
    ds = ds.map(lambda ex: {k: v for k, v in ex.items() if k not in ("patient_id", "slice_index")})
    fraction = config.data.tumor_fraction
    if fraction is not None:
        # Both kinds must exist, else sampling from an empty stream would never return.
        # This pass also fills the cache.
        def tally(counts, ex):
            return counts + tf.one_hot(tf.cast(tf.reduce_any(ex["mask"] > 0), tf.int32), 2)

        kinds = ds.reduce(tf.zeros([2]), tally).numpy()
        if not kinds.all():
            logging.warning(
                "Training slices are all %s: data.tumor_fraction ignored",
                "with tumour" if kinds[1] else "without tumour",
            )
            fraction = None
    if fraction is None:
        ds = ds.repeat().shuffle(config.data.shuffle_buffer, seed=seed)
    else:
        # Tumour slices are ~35% of the data; sampling them at a set rate shows the
        # model more lesion boundaries per step (Buda et al. weight by tumour area).
        def stream(has_tumor: bool, offset: int):
            part = ds.filter(lambda ex: tf.reduce_any(ex["mask"] > 0) == has_tumor)
            return part.repeat().shuffle(config.data.shuffle_buffer, seed=seed + offset)

        ds = tf.data.Dataset.sample_from_datasets(
            [stream(True, 1), stream(False, 2)], [fraction, 1.0 - fraction], seed=seed
        )
    # Every process walks the same seeded stream and keeps every P-th element, so the P
    # per-process batches of a step together hold exactly the global batch a single
    # process would draw: training is the same on 1 or many hosts.
    ds = ds.shard(jax.process_count(), jax.process_index())
    ds = ds.batch(per_process_batch, drop_remainder=True)
    per_device = per_process_batch // devices
    ds = ds.map(
        lambda batch: tf.nest.map_structure(
            lambda x: tf.reshape(x, [devices, per_device, *x.shape[1:]]), batch
        )
    )
    return ds.prefetch(tf.data.AUTOTUNE)


def as_numpy(ds: tf.data.Dataset):
    """Iterates a dataset as numpy trees (patient ids as str)."""
    for batch in ds.as_numpy_iterator():
        if "patient_id" in batch:
            batch["patient_id"] = np.array([p.decode() for p in batch["patient_id"]])
        yield batch
