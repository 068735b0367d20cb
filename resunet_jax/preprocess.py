"""Resizing slices and masks to the model's input side, in numpy. No TensorFlow.

Every path that feeds the model resizes with these (the batch sources before caching,
evaluation, prediction): a separable linear operator per axis, so tf.data can call it
too. What happens to a resized slice next is `inputs.model_input`.
"""

import functools

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
