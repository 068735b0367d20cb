"""3D post-processing of a patient's predicted masks (Buda et al. 2019)."""

import numpy as np
from scipy import ndimage


def largest_component_3d(volume):
    """Keeps the largest 26-connected component of a patient's stacked masks.

    A glioma is one connected lesion, so smaller separate blobs are false positives.

    Args:
        volume: [Z, H, W] bool predicted masks in slice order.

    Returns:
        [Z, H, W] bool, only the largest component (all False if `volume` is empty).
    """
    labels, num = ndimage.label(volume, structure=np.ones((3, 3, 3), bool))
    if num <= 1:
        return volume.astype(bool)
    sizes = np.bincount(labels.ravel())[1:]
    return labels == (np.argmax(sizes) + 1)


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
