"""From model outputs to masks: the decision (`decide`), back to each slice's own size,
3D post-processing."""

import jax
import numpy as np
from scipy import ndimage

PIXEL_THRESHOLD = 0.5  # a pixel is tumour at this probability or above


def tumour_slices(tumor_prob, threshold: float) -> np.ndarray:
    """The slice gate: which slices the model calls tumour.

    Args:
        tumor_prob: [N] slice tumour probabilities.
        threshold: the model's detection threshold (chosen on its validation patients).

    Returns:
        [N] bool; a slice called tumour-free gets an empty mask.
    """
    return np.asarray(tumor_prob) >= threshold


def decide(
    pixel_prob, tumor_prob, threshold: float, pixel_threshold: float = PIXEL_THRESHOLD
) -> np.ndarray:
    """The predicted masks: pixels at `pixel_threshold` or above on slices past the gate.

    Args:
        pixel_prob: [N, H, W] pixel tumour probabilities.
        tumor_prob: [N] slice tumour probabilities.
        threshold: the detection threshold (`tumour_slices`).

    Returns:
        [N, H, W] bool.
    """
    return (np.asarray(pixel_prob) >= pixel_threshold) & tumour_slices(tumor_prob, threshold)[
        :, None, None
    ]


def probabilities_at_original_size(prob_maps, heights, widths):
    """Resizes probability maps to their slices' original sizes (bilinear).

    The model sees slices resized to S x S; a prediction is judged (and written) at the
    slice's own resolution, as published results on the LGG data are, so that small
    lesions are scored against the radiologist's mask and not a resized copy of it.

    Args:
        prob_maps: [N, S, S] pixel tumour probabilities at the model's resolution.
        heights: [N] original slice heights.
        widths: [N] original slice widths.

    Returns:
        [N, max(heights), max(widths)] float32, each slice's map in its top-left h x w
        corner and 0 beyond it (so that slices of different sizes stack).
    """
    heights, widths = np.asarray(heights), np.asarray(widths)
    out = np.zeros((len(heights), heights.max(), widths.max()), np.float32)
    if not np.any(prob_maps):  # zeros stay zeros (the s.d. of a single view)
        return out
    sizes = np.stack([heights, widths], axis=1)
    # One resize call per distinct size (one per batch for the LGG data).
    for h, w in np.unique(sizes, axis=0):
        rows = np.flatnonzero((sizes == (h, w)).all(axis=1))
        # Plain bilinear, half-pixel centres: tf.image.resize's default, which this was.
        probs = jax.image.resize(
            np.asarray(prob_maps, np.float32)[rows], (len(rows), h, w), "linear", antialias=False
        )
        out[rows, :h, :w] = np.asarray(probs)
    return out


def masks_at_original_size(prob_maps, heights, widths, pixel_threshold: float = PIXEL_THRESHOLD):
    """`probabilities_at_original_size` thresholded: [N, max(heights), max(widths)] bool,
    probability >= `pixel_threshold` (before the slice gate), False beyond each slice's
    h x w."""
    return probabilities_at_original_size(prob_maps, heights, widths) >= pixel_threshold


def largest_component_3d(volume):
    """Keeps the largest 26-connected component of a patient's stacked masks.

    A glioma is one connected lesion, so smaller separate blobs are false positives.

    Args:
        volume: [Z, H, W] bool predicted masks in slice order.

    Returns:
        [Z, H, W] bool, only the largest component (all False if `volume` is empty).
    """
    volume = np.asarray(volume, bool)
    out = np.zeros(volume.shape, bool)
    box = bounding_box(volume)
    if box is None:
        return out
    # Labelled within the lesions' bounding box: a prediction is mostly empty, and
    # labelling the whole volume cost ten times as much.
    labels, num = ndimage.label(volume[box], structure=np.ones((3, 3, 3), bool))
    sizes = np.bincount(labels.ravel())[1:]
    out[box] = labels == (np.argmax(sizes) + 1) if num > 1 else labels > 0
    return out


def bounding_box(mask) -> tuple[slice, ...] | None:
    """The smallest box holding every True of `mask` (any shape), as slices; None if
    `mask` is all False."""
    mask = np.asarray(mask, bool)
    box = []
    for axis in range(mask.ndim):
        hits = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        if not hits.size:
            return None
        box.append(slice(hits[0], hits[-1] + 1))
    return tuple(box)


def largest_component_per_patient(patient_ids, slice_index, pred_masks):
    """Applies `largest_component_3d` to each patient's slices.

    Args:
        patient_ids: [N] patient of each slice (any order).
        slice_index: [N] slice number within its patient.
        pred_masks: [N, H, W] bool predicted masks.

    Returns:
        [N, H, W] bool post-processed masks, in the input order.
    """
    out = np.zeros_like(pred_masks, dtype=bool)
    patient_ids = np.asarray(patient_ids)
    for pid in np.unique(patient_ids):
        rows = np.flatnonzero(patient_ids == pid)
        rows = rows[np.argsort(np.asarray(slice_index)[rows])]
        out[rows] = largest_component_3d(pred_masks[rows])
    return out


def review(uncertainty, threshold: float | None) -> tuple:
    """The review flag of a result (patient, volume or slice) and its reason.

    Args:
        uncertainty: its uncertainty (the mean pixel s.d. over its predicted lesion), None
            or NaN where the prediction is empty.
        threshold: the calibrated review threshold (`calibrate.py`); None: no rule.

    Returns:
        (flag, reason): ("", "") without a rule; (False, "no lesion predicted") for an
        empty prediction; (True, why) above the threshold; else (False, "").
    """
    if threshold is None:
        return "", ""
    if uncertainty is None or np.isnan(uncertainty):
        return False, "no lesion predicted"
    if uncertainty > threshold:
        return True, f"uncertainty {uncertainty:.4f} above the review threshold {threshold:.4f}"
    return False, ""
