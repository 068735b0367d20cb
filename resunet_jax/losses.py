"""Segmentation losses on logits; each reduces the global batch to one float32 scalar.

Region losses (Tversky, Dice) pool all pixels of the batch, as the seed Keras model
did: a batch without any tumour then contributes only through its false positives.
`slice_soft_dice` instead averages each slice's Dice, so that small lesions count.

Data parallelism: with `axis_name`, every sum runs over the whole global batch, so
each device gets the loss of the global batch, while its gradient is only its own
share (see `global_sum`); the train step sums gradients over devices. A step on N
devices therefore equals a step on one device with the same global batch, also for
the region losses, which do not decompose into a mean of per-device losses.
"""

import jax
import jax.numpy as jnp
import optax
from jax import lax


def global_sum(x, axis_name: str | None):
    """Sum of `x` over devices; the gradient flows to this device's `x` only.

    Value: psum(x). Gradient: that of the local x. Summing the per-device gradients
    then gives the gradient of the global loss, without differentiating a collective.
    """
    if axis_name is None:
        return x
    return x + lax.stop_gradient(lax.psum(x, axis_name) - x)


def _soft_counts(logits, masks, axis_name):
    """Soft TP, FN, FP over the global batch: logits, masks [B, H, W, 1] -> 3 scalars."""
    probs = jax.nn.sigmoid(logits.astype(jnp.float32)).ravel()
    masks = masks.astype(jnp.float32).ravel()
    true_pos = global_sum(jnp.sum(probs * masks), axis_name)
    false_neg = global_sum(jnp.sum((1.0 - probs) * masks), axis_name)
    false_pos = global_sum(jnp.sum(probs * (1.0 - masks)), axis_name)
    return true_pos, false_neg, false_pos


def focal_tversky(
    logits,
    masks,
    axis_name: str | None = None,
    alpha: float = 0.7,
    gamma: float = 0.75,
    smooth: float = 1.0,
):
    """Focal Tversky loss (Abraham & Khan 2019) with the seed's defaults.

    Args:
        logits: [B, H, W, 1] tumour logits.
        masks: [B, H, W, 1] ground truth in {0, 1}.
        axis_name: pmap axis of the data-parallel devices, or None.
        alpha: weight of false negatives (1 - alpha weighs false positives).
        gamma: focal exponent applied to (1 - Tversky index).
        smooth: additive smoothing, keeps empty batches finite.

    Returns:
        Scalar (1 - TI) ** gamma.
    """
    tp, fn, fp = _soft_counts(logits, masks, axis_name)
    tversky = (tp + smooth) / (tp + alpha * fn + (1.0 - alpha) * fp + smooth)
    return jnp.power(1.0 - tversky, gamma)


def soft_dice(logits, masks, axis_name: str | None = None, smooth: float = 1.0):
    """Soft Dice loss 1 - (2 TP + s) / (2 TP + FN + FP + s); shapes as `focal_tversky`."""
    tp, fn, fp = _soft_counts(logits, masks, axis_name)
    return 1.0 - (2.0 * tp + smooth) / (2.0 * tp + fn + fp + smooth)


def slice_soft_dice(logits, masks, axis_name: str | None = None, smooth: float = 1.0):
    """Soft Dice loss per slice, averaged over the global batch (MONAI's `batch=False`).

    The pooled `soft_dice` is dominated by the batch's largest tumours: a missed 50-pixel
    lesion next to a 3000-pixel tumour barely moves it. Here every slice's Dice counts
    alike, so small lesions weigh as much as large ones; a slice without tumour scores
    1 with no false positives and 1 / (1 + FP) with them.

    Args:
        logits: [B, H, W, 1] tumour logits.
        masks: [B, H, W, 1] ground truth in {0, 1}.
        axis_name: pmap axis of the data-parallel devices, or None.
        smooth: additive smoothing of each slice's Dice.

    Returns:
        Scalar 1 - mean over slices of (2 TP + s) / (2 TP + FN + FP + s).
    """
    probs = jax.nn.sigmoid(logits.astype(jnp.float32)).reshape(logits.shape[0], -1)
    masks = masks.astype(jnp.float32).reshape(masks.shape[0], -1)
    true_pos = jnp.sum(probs * masks, axis=1)
    # 2 TP + FN + FP = sum(probs) + sum(masks).
    dice = (2.0 * true_pos + smooth) / (jnp.sum(probs, 1) + jnp.sum(masks, 1) + smooth)
    num_slices = global_sum(jnp.float32(dice.shape[0]), axis_name)
    return 1.0 - global_sum(jnp.sum(dice), axis_name) / num_slices


def binary_cross_entropy(logits, masks, axis_name: str | None = None):
    """Mean pixel-wise sigmoid cross-entropy; shapes as `focal_tversky`."""
    pixel_losses = optax.sigmoid_binary_cross_entropy(
        logits.astype(jnp.float32), masks.astype(jnp.float32)
    )
    num_pixels = global_sum(jnp.float32(pixel_losses.size), axis_name)
    return global_sum(jnp.sum(pixel_losses), axis_name) / num_pixels


def dice_bce(logits, masks, axis_name: str | None = None):
    """Soft Dice + BCE: the region term handles imbalance, BCE keeps pixel gradients sharp."""
    return soft_dice(logits, masks, axis_name) + binary_cross_entropy(logits, masks, axis_name)


def slice_dice_bce(logits, masks, axis_name: str | None = None):
    """Per-slice soft Dice + BCE: `dice_bce` with small lesions weighed like large ones."""
    return slice_soft_dice(logits, masks, axis_name) + binary_cross_entropy(
        logits, masks, axis_name
    )


LOSSES = {
    "focal_tversky": focal_tversky,
    "dice": soft_dice,
    "bce": binary_cross_entropy,
    "dice_bce": dice_bce,
    "slice_dice_bce": slice_dice_bce,
}


def get_loss(name: str):
    """Returns the loss function named `name` (a key of LOSSES)."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose one of {sorted(LOSSES)}")
    return LOSSES[name]
