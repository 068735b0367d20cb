"""uint8 slices -> model input: the one definition every path uses.

Both batch sources, the augmentation inside the train step, evaluation and prediction
bring resized uint8 slices to the model through `model_input` (with `neighbours` for the
2.5-D context and `volume_statistics` for "volume" normalisation), so that what the
model reads is the same code wherever it comes from. Written for numpy and jax.numpy
arrays alike (under jit in the train step).

2.5-D input: each slice with its neighbours along the volume's axis, as channels. A
tumour's extent along the axis tells a lesion margin from a vessel or artefact that a
single slice cannot.
"""

import jax.numpy as jnp
import numpy as np


def neighbours(patients, positions, k: int) -> np.ndarray:
    """Which slices make up each slice's input: itself and k neighbours per side.

    Neighbours are the adjacent slices of the same patient in slice order; beyond the
    first or last slice the end slice repeats, so every slice gets 2k + 1.

    Args:
        patients: [N] the slices' patient keys, in any order.
        positions: [N] the slices' positions along the axis (slice index).
        k: neighbours per side (`data.context_slices`).

    Returns:
        [N, 2k + 1] int64 rows into the N slices, offsets -k..k (column k is the slice).
    """
    patients, positions = np.asarray(patients), np.asarray(positions)
    rows = np.empty([len(patients), 2 * k + 1], np.int64)
    for patient in np.unique(patients):
        members = np.flatnonzero(patients == patient)
        members = members[np.argsort(positions[members], kind="stable")]
        at = np.arange(len(members))
        for offset in range(-k, k + 1):
            rows[members, offset + k] = members[np.clip(at + offset, 0, len(members) - 1)]
    return rows


def stack_context(images, rows):
    """Gathers each slice's context into channels (numpy or jax.numpy arrays).

    Args:
        images: [N, S, S, 3] the slices.
        rows: [..., 2k + 1] `neighbours`.

    Returns:
        [..., S, S, 3(2k + 1)]: slice -k's three channels first, the slice's own in the
        middle (channels 3k..3k+2).
    """
    stack = images[rows]  # [..., 2k+1, S, S, 3]
    stack = stack.swapaxes(-4, -3).swapaxes(-3, -2)  # [..., S, S, 2k+1, 3]
    return stack.reshape(*stack.shape[:-2], -1)


def _xp(x):
    return np if isinstance(x, np.ndarray) else jnp


def normalize(image, method: str = "scale", stats=None):
    """Intensities (uint8, or float in [0, 255]) [..., H, W, 3n] -> float32 model input.

    "scale": x / 255. "slice": each channel of each slice standardised to zero mean,
    unit variance. "volume": each channel standardised by the mean and standard
    deviation of x over its patient's non-zero pixels (`volume_statistics`), so a lesion
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
    raise ValueError(f"unknown normalization {method!r}; use scale, slice or volume")


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


def volume_statistics(images: np.ndarray, patients) -> np.ndarray:
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


# `eval.missing_sequences` (config_schema.MISSING_SEQUENCES) -> which of (pre-contrast,
# post-contrast) are missing.
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


def model_input(image, stats=None, missing=None, normalization: str = "scale", transform=None):
    """Slices with their context -> the model's float32 input.

    In this order: the missing sequences filled by the FLAIR (`drop_sequences`, image and
    volume statistics alike), `transform` (the training augmentation), normalisation.

    Args:
        image: [..., S, S, 3n] uint8: n slices' pre-contrast, FLAIR, post-contrast (the
            slice and its 2.5-D context, `neighbours`).
        stats: "volume" normalisation: [..., 2, 3] the slices' volume statistics
            (`volume_statistics`); else None.
        missing: [2] or [..., 2] bool, pre- and post-contrast missing; None = neither.
        normalization: `data.normalization`.
        transform: float32 [..., S, S, 3n] in [0, 255] -> the same; None = identity.

    Returns:
        [..., S, S, 3n] float32 (numpy for numpy input, else a jax array).
    """
    if missing is not None:
        image = drop_sequences(image, missing)
        if stats is not None:  # the FLAIR's mean and std for the missing sequences
            stats = drop_sequences(stats[..., None, :, :], missing)[..., 0, :, :]
    if transform is not None:
        image = transform(image.astype(_xp(image).float32))
    return normalize(image, normalization, stats)
