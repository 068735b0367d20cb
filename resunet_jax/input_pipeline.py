"""tf.data input pipelines over prepared LGG data (the only module besides data/ using TF).

Train: patients → cache (resized uint8) → repeat → shuffle (or tumour-weighted
sampling) → per-process shard → augment → normalise → batch →
`[local_devices, per_device_batch, H, W, C]`.
Eval: every slice of the chosen patients once (TFDS order, not slice order: consumers
group by patient id and slice index), cached after resizing, in batches the evaluator
pads to the device count.
"""

import math

import jax
import numpy as np
import tensorflow as tf
from absl import logging

from resunet_jax.data import lgg

# TF must never take GPU memory from JAX; the pipeline runs on the host CPU.
tf.config.set_visible_devices([], "GPU")


def _select_patients(dataset: tf.data.Dataset, patient_ids) -> tf.data.Dataset:
    wanted = tf.constant(sorted(patient_ids))
    return dataset.filter(lambda ex: tf.reduce_any(tf.equal(ex["patient_id"], wanted)))


def resize_example(example, image_size: int):
    """Resizes one decoded example to the model's input side.

    Args:
        example: {"image": [H, W, 3] uint8, "mask": [H, W, 1] uint8 in {0, 1}, ...}.
        image_size: output side S.

    Returns:
        The example with image [S, S, 3] uint8 and mask [S, S, 1] uint8 in {0, 1},
        plus `orig_height`/`orig_width` (int32) to map predictions back.
    """
    shape = tf.shape(example["image"])
    image = tf.image.resize(example["image"], (image_size, image_size), antialias=True)
    # Area-resize then threshold keeps small lesions in proportion when shrinking.
    mask = tf.image.resize(tf.cast(example["mask"], tf.float32), (image_size, image_size), "area")
    return dict(
        example,
        image=tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8),
        mask=tf.cast(mask >= 0.5, tf.uint8),
        orig_height=shape[0],
        orig_width=shape[1],
    )


def normalize(image, method: str = "scale"):
    """uint8 [..., H, W, 3] → float32 model input.

    "scale": x / 255. "slice": each channel of each slice standardised to zero mean,
    unit variance (removes scanner gain differences between patients).
    """
    image = tf.cast(image, tf.float32) / 255.0
    if method == "scale":
        return image
    if method == "slice":
        mean, var = tf.nn.moments(image, axes=[-3, -2], keepdims=True)
        return (image - mean) / tf.sqrt(var + 1e-4)
    raise ValueError(f"unknown data.normalization {method!r}; use 'scale' or 'slice'")


def _affine_transform(seed, image_size: int, rotate_degrees: float, scale: float):
    """Random rotation + isotropic scaling about the centre, as the 8 projective params
    mapping output to input coordinates (tf.raw_ops.ImageProjectiveTransformV3)."""
    seeds = tf.random.experimental.stateless_split(seed, 2)
    angle = tf.random.stateless_uniform([], seeds[0], -rotate_degrees, rotate_degrees) * (
        math.pi / 180.0
    )
    zoom = tf.random.stateless_uniform([], seeds[1], 1.0 - scale, 1.0 + scale)
    cos, sin = tf.cos(angle) / zoom, tf.sin(angle) / zoom
    c = (image_size - 1) / 2.0
    return tf.stack([cos, -sin, c - cos * c + sin * c, sin, cos, c - sin * c - cos * c, 0.0, 0.0])


def augment(example, seed, config):
    """Random flip, rotation, scaling and per-channel intensity gain.

    Geometric transforms apply to image (bilinear) and mask (nearest), so masks stay
    binary. `seed` is a [2] int tensor: augmentation is a pure function of it.
    """
    image, mask = example["image"], example["mask"]
    seeds = tf.random.experimental.stateless_split(seed, 3)
    if config.flip:
        flip = tf.random.stateless_uniform([], seeds[0]) < 0.5
        image = tf.where(flip, tf.reverse(image, [1]), image)
        mask = tf.where(flip, tf.reverse(mask, [1]), mask)
    if config.rotate_degrees or config.scale:
        size = image.shape[0]
        transform = _affine_transform(seeds[1], size, config.rotate_degrees, config.scale)[None]

        def warp(x, interpolation):
            return tf.raw_ops.ImageProjectiveTransformV3(
                images=x[None],
                transforms=transform,
                output_shape=[size, size],
                fill_value=0.0,
                interpolation=interpolation,
                fill_mode="CONSTANT",
            )[0]

        image = warp(image, "BILINEAR")
        mask = warp(mask, "NEAREST")
    if config.intensity:
        gain = tf.random.stateless_uniform(
            [1, 1, 3], seeds[2], 1.0 - config.intensity, 1.0 + config.intensity
        )
        image = tf.cast(tf.clip_by_value(tf.cast(image, tf.float32) * gain, 0, 255), tf.uint8)
    return dict(example, image=image, mask=mask)


def _as_model_input(example, normalization: str):
    return {"image": normalize(example["image"], normalization), "mask": example["mask"]}


def create_train_dataset(
    builder, patient_ids, config, per_process_batch: int, seed: int
) -> tf.data.Dataset:
    """Endless, shuffled, augmented training batches of this process.

    With `data.tumor_fraction` set, slices with and without tumour are drawn at that
    rate; None keeps their natural proportion.

    Args:
        builder: prepared `LggBuilder`.
        patient_ids: training patients.
        config: the run config (uses data.*, augment.*).
        per_process_batch: batch size of this process (global batch / process count).
        seed: shuffling and augmentation seed; the stream is a pure function of it.

    Returns:
        Dataset of {"image": float32 [D, b, S, S, 3], "mask": uint8 [D, b, S, S, 1]},
        D = local devices, b = per_process_batch / D.
    """
    devices = jax.local_device_count()
    if per_process_batch % devices:
        raise ValueError(
            f"batch_size per process ({per_process_batch}) must be divisible by the "
            f"{devices} local devices"
        )
    ds = _select_patients(builder.as_dataset(split=lgg.SPLIT, shuffle_files=False), patient_ids)
    ds = ds.map(lambda ex: resize_example(ex, config.data.image_size), tf.data.AUTOTUNE)
    ds = ds.map(lambda ex: {"image": ex["image"], "mask": ex["mask"]})
    ds = ds.cache()
    fraction = config.data.tumor_fraction
    if fraction is not None:
        # Both kinds must exist, else sampling from an empty stream would never return.
        # This pass also fills the cache.
        kinds = ds.reduce(
            tf.zeros(2, tf.int64),
            lambda n, ex: (
                n + tf.one_hot(tf.cast(tf.reduce_any(ex["mask"] > 0), tf.int32), 2, dtype=tf.int64)
            ),
        ).numpy()
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
    seeds = tf.data.Dataset.random(seed=seed).batch(2)
    ds = tf.data.Dataset.zip(ds, seeds)
    # Every process walks the same seeded stream and keeps every P-th element, so the P
    # per-process batches of a step together hold exactly the global batch a single
    # process would draw: training is the same on 1 or many hosts. Augmentation runs
    # after the shard, on this process's elements only.
    ds = ds.shard(jax.process_count(), jax.process_index())
    ds = ds.map(lambda ex, s: augment(ex, s, config.augment), tf.data.AUTOTUNE)
    ds = ds.map(lambda ex: _as_model_input(ex, config.data.normalization), tf.data.AUTOTUNE)
    ds = ds.batch(per_process_batch, drop_remainder=True)
    per_device = per_process_batch // devices
    ds = ds.map(
        lambda b: tf.nest.map_structure(
            lambda x: tf.reshape(x, [devices, per_device, *x.shape[1:]]), b
        )
    )
    return ds.prefetch(tf.data.AUTOTUNE)


def create_eval_dataset(builder, patient_ids, config, batch_size: int) -> tf.data.Dataset:
    """Every slice of `patient_ids` once, cached after resizing.

    Returns:
        Dataset of {"image": float32 [b, S, S, 3], "mask": uint8 [b, S, S, 1],
        "display": uint8 [b, S, S, 3] (the resized slice before normalisation),
        "patient_id": string [b], "slice_index": int32 [b], "orig_height"/"orig_width"},
        b <= batch_size (the last batch may be short).
    """
    ds = _select_patients(builder.as_dataset(split=lgg.SPLIT, shuffle_files=False), patient_ids)
    ds = ds.map(lambda ex: resize_example(ex, config.data.image_size), tf.data.AUTOTUNE)
    ds = ds.cache()
    ds = ds.map(
        lambda ex: dict(
            ex, image=normalize(ex["image"], config.data.normalization), display=ex["image"]
        ),
        tf.data.AUTOTUNE,
    )
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def as_numpy(ds: tf.data.Dataset):
    """Iterates a dataset as numpy trees (patient ids as str)."""
    for batch in ds.as_numpy_iterator():
        if "patient_id" in batch:
            batch["patient_id"] = np.array([p.decode() for p in batch["patient_id"]])
        yield batch
