"""Slices to model inputs: resizing, normalisation, missing sequences. No TensorFlow.

One definition for every path that feeds the model: the training batch sources (before
caching), the augmentation inside the train step (`normalize`, `drop_sequences` under
jit), evaluation, prediction and export. Resizing is numpy (a separable linear operator
per axis), so tf.data can call it too; the rest is written for both numpy and jnp arrays.
"""

import functools

import jax.numpy as jnp
import numpy as np


@functools.cache
def _linear_weights(in_size: int, out_size: int) -> np.ndarray:
    """[out, in] weights of an antialiased bilinear resize along one axis.

    The operator of `jax.image.resize(..., "linear", antialias=True)` (and of TF's
    `tf.image.resize(antialias=True)`): a triangle kernel, widened by the shrink factor
    when shrinking, so every input pixel contributes and small lesions do not alias.
    """
    scale = out_size / in_size
    kernel_scale = max(1.0 / scale, 1.0)
    sample = (np.arange(out_size) + 0.5) / scale - 0.5
    x = np.abs(sample[:, None] - np.arange(in_size)[None, :]) / kernel_scale
    weights = np.maximum(0.0, 1.0 - x)
    total = weights.sum(axis=1, keepdims=True)
    return weights / np.where(total > 0, total, 1.0)


@functools.cache
def _area_weights(in_size: int, out_size: int) -> np.ndarray:
    """[out, in] weights of an area (box) resize: each output pixel averages the input
    it covers, by overlap."""
    edges = np.arange(out_size + 1) * (in_size / out_size)
    lo = np.maximum(edges[:-1, None], np.arange(in_size)[None, :])
    hi = np.minimum(edges[1:, None], np.arange(in_size)[None, :] + 1)
    return np.maximum(hi - lo, 0.0) * (out_size / in_size)


def _resize(x: np.ndarray, size: int, weights_fn) -> np.ndarray:
    """[N, H, W, C] -> [N, size, size, C] float32 with per-axis weight matrices."""
    rows = weights_fn(x.shape[1], size).astype(np.float32)
    cols = weights_fn(x.shape[2], size).astype(np.float32)
    x = np.asarray(x, np.float32)
    return np.einsum("sh,nhwc,tw->nstc", rows, x, cols, optimize=True)


def resize_images(images: np.ndarray, size: int) -> np.ndarray:
    """Resizes slices to the model's input side (antialiased bilinear).

    Args:
        images: [N, H, W, C] uint8.
        size: output side S.

    Returns:
        [N, S, S, C] uint8, rounded.
    """
    out = _resize(images, size, _linear_weights)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def resize_masks(masks: np.ndarray, size: int) -> np.ndarray:
    """Resizes tumour masks: the tumour's share of each output pixel, thresholded at half.

    Area resizing keeps small lesions in proportion when shrinking.

    Args:
        masks: [N, H, W] or [N, H, W, 1], values in {0, 1}.
        size: output side S.

    Returns:
        [N, S, S, 1] uint8 in {0, 1}.
    """
    masks = np.asarray(masks)
    if masks.ndim == 3:
        masks = masks[..., None]
    return (_resize(masks > 0, size, _area_weights) >= 0.5).astype(np.uint8)


NORMALIZATIONS = ("scale", "slice", "volume")  # config.data.normalization


def _xp(x):
    return np if isinstance(x, np.ndarray) else jnp


def normalize(image, method: str = "scale", stats=None):
    """Intensities (uint8, or float in [0, 255]) [..., H, W, 3n] -> float32 model input.

    "scale": x / 255. "slice": each channel of each slice standardised to zero mean,
    unit variance. "volume": each channel standardised by the mean and standard
    deviation of x over its patient's non-zero pixels (`volume_stats`), so a lesion
    is as bright as it is relative to that patient's scan, whatever the scanner's gain.

    Args:
        image: [..., H, W, 3n]: n slices' three channels (2.5-D context, n > 1).
        method: `data.normalization`.
        stats: "volume" only: [..., 2, 3] per-channel (mean, std) of x = value / 255
            over the image's volume.

    Returns:
        [..., H, W, 3n] float32 (a numpy array for numpy input, else a jax array).
    """
    xp = _xp(image)
    image = image.astype(xp.float32) / 255.0
    if method == "scale":
        return image
    if method == "slice":
        mean = image.mean(axis=(-3, -2), keepdims=True)
        var = image.var(axis=(-3, -2), keepdims=True)
        return (image - mean) / xp.sqrt(var + 1e-4)
    if method == "volume":
        if stats is None:
            raise ValueError("data.normalization='volume' needs the volume's statistics")
        # Context slices repeat the three channels: so do their statistics.
        stats = xp.concatenate([xp.asarray(stats, xp.float32)] * (image.shape[-1] // 3), -1)
        return (image - stats[..., 0:1, None, :]) / stats[..., 1:2, None, :]
    raise ValueError(f"unknown normalization {method!r}; use one of {NORMALIZATIONS}")


def slice_moments(image: np.ndarray) -> np.ndarray:
    """Moments of a slice's non-zero pixels, summed over slices into `volume_stats`.

    Counted are the pixels with any channel non-zero. The LGG slices are not
    skull-stripped and their background is dim noise, exactly 0 in only a few per cent
    of the pixels, so this is most of the field of view, background included; a fixed
    intensity level would make the statistics change with the image's gain, which this
    normalisation is there to remove.

    Args:
        image: [..., H, W, 3] uint8 (or float in [0, 255]).

    Returns:
        [..., 3, 3] float64: rows (pixel count, sum of x, sum of x²), columns the
        channels, x = value / 255.
    """
    x = np.asarray(image, np.float64) / 255.0
    nonzero = np.any(x > 0, axis=-1, keepdims=True)
    count = np.sum(nonzero, axis=(-3, -2)) * np.ones_like(x[..., 0, 0, :])
    total = np.sum(x * nonzero, axis=(-3, -2))
    squares = np.sum(x * x * nonzero, axis=(-3, -2))
    return np.stack([count, total, squares], axis=-2)


def volume_stats(moments) -> np.ndarray:
    """Per-channel mean and standard deviation of a volume's non-zero pixels.

    Args:
        moments: [3, 3] `slice_moments` summed over the volume's slices.

    Returns:
        [2, 3] float32 (mean, std) of x = value / 255; a volume without non-zero
        pixels gets (0, 1).
    """
    count, total, squares = np.asarray(moments, np.float64)
    if count[0] == 0:
        return np.array([[0.0] * 3, [1.0] * 3], np.float32)
    mean = total / count
    var = np.maximum(squares / count - mean**2, 0.0)
    # A floor far under any real volume's spread (dim LGG FLAIR volumes have std ~0.02):
    # a larger one would make dim volumes' inputs depend on their gain again.
    return np.stack([mean, np.sqrt(var + 1e-8)]).astype(np.float32)


def patient_volume_stats(images: np.ndarray, patients) -> np.ndarray:
    """Each slice's patient's `volume_stats`.

    Args:
        images: [N, H, W, 3] the slices of one or more patients.
        patients: [N] each slice's patient.

    Returns:
        [N, 2, 3] float32.
    """
    patients = np.asarray(patients)
    moments = slice_moments(images)
    stats = np.empty([len(patients), 2, 3], np.float32)
    for patient in np.unique(patients):
        rows = patients == patient
        stats[rows] = volume_stats(moments[rows].sum(axis=0))
    return stats


# `eval.missing_sequences` -> which of (pre-contrast, post-contrast) are missing.
MISSING_SEQUENCES = {
    "": (False, False),
    "pre": (True, False),
    "post": (False, True),
    "both": (True, True),
}


def drop_sequences(image, missing):
    """Fills missing sequences with the FLAIR, as the LGG data do where one was not acquired.

    Args:
        image: [..., S, S, 3n] (n slices of pre-contrast, FLAIR, post-contrast); volume
            statistics [..., 2, 3] go in as [..., 1, 2, 3] (the FLAIR's mean and std
            are then copied).
        missing: [..., 2] bool (the leading dimensions of `image`'s): pre-contrast and
            post-contrast missing.

    Returns:
        `image` with each missing sequence's channels replaced by the FLAIR's.
    """
    xp = _xp(image)
    missing = xp.asarray(missing)
    slices = image.reshape(*image.shape[:-1], image.shape[-1] // 3, 3)
    flair = slices[..., 1]
    pre = xp.where(missing[..., None, None, :1], flair, slices[..., 0])
    post = xp.where(missing[..., None, None, 1:], flair, slices[..., 2])
    return xp.stack([pre, flair, post], -1).reshape(image.shape)
