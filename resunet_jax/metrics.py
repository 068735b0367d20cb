"""Segmentation and detection metrics.

`slice_counts` reduces each slice to a few counts (in the training step, or on the host
in evaluation); the host aggregates those counts per patient (`summarize`). Dice per
volume follows Buda et al. 2019: 2|P∩G| / (|P|+|G|) over all slices of a patient, leaving
out patients without tumour.
"""

import numpy as np
from scipy import stats

from resunet_jax import postprocess


def slice_counts(pred_masks, true_masks):
    """Per-slice overlap counts.

    Written with the arrays' own methods, so jax arrays are counted by jax (inside the
    training step) and numpy arrays by numpy (evaluation's host side: converting its
    masks to jax arrays cost more than the counting).

    Args:
        pred_masks: [B, H, W, 1] (or [B, H, W]) predicted masks, bool or {0, 1}.
        true_masks: same shape, ground truth.

    Returns:
        Dict of [B] float32 arrays: `intersection` |P∩G|, `pred_area` |P|, `true_area` |G|.
    """
    pred, true = _flat_bool(pred_masks), _flat_bool(true_masks)

    def count(flat):  # numpy sums bools twice as fast into int32 as into its default int64
        return flat.sum(axis=1, dtype=np.int32).astype(np.float32)

    return {"intersection": count(pred & true), "pred_area": count(pred), "true_area": count(true)}


def _flat_bool(masks):
    """[B, ...] masks -> [B, pixels] bool; bool masks are not copied (an evaluation's
    stack of masks is hundreds of MB)."""
    flat = masks.reshape(masks.shape[0], -1)
    return flat if flat.dtype == bool else flat > 0


def dice(intersection, pred_area, true_area, empty: float = 1.0):
    """Dice 2|P∩G|/(|P|+|G|), elementwise; `empty` where both P and G are empty."""
    intersection, total = np.asarray(intersection), np.asarray(pred_area) + np.asarray(true_area)
    safe_total = np.where(total > 0, total, 1.0)
    return np.where(total > 0, 2.0 * intersection / safe_total, empty)


def iou(intersection, pred_area, true_area, empty: float = 1.0):
    """Intersection over union |P∩G|/|P∪G|, elementwise; `empty` where both are empty."""
    union = np.asarray(pred_area) + np.asarray(true_area) - np.asarray(intersection)
    return np.where(union > 0, np.asarray(intersection) / np.where(union > 0, union, 1.0), empty)


def per_patient(patient_ids, counts) -> dict[str, dict[str, float]]:
    """Sums slice counts over each patient's slices.

    Args:
        patient_ids: [N] patient id of each slice.
        counts: dict of [N] arrays as returned by `slice_counts` (plus optional
            `pred_tumor` [N] bool, the slice-level tumour decision).

    Returns:
        {patient_id: {"num_slices", "intersection", "pred_area", "true_area",
        "dice", "iou", ...}} in sorted patient order; dice/iou are NaN when the
        patient's ground truth is empty.
    """
    patient_ids = np.asarray(patient_ids)
    rows = {}
    for pid in sorted(set(patient_ids.tolist())):
        sel = patient_ids == pid
        row = {"num_slices": int(sel.sum())}
        row.update({k: float(np.sum(np.asarray(v)[sel])) for k, v in counts.items()})
        has_tumor = row["true_area"] > 0
        row["dice"] = float(dice(row["intersection"], row["pred_area"], row["true_area"]))
        row["iou"] = float(iou(row["intersection"], row["pred_area"], row["true_area"]))
        if not has_tumor:
            row["dice"] = row["iou"] = float("nan")
        rows[pid] = row
    return rows


def gate(counts: dict, pred_tumor) -> dict:
    """Empties the predicted mask of slices the detector calls tumour-free.

    Args:
        counts: dict of [N] arrays from `slice_counts`, and any other sums over the
            predicted mask's pixels (evaluate's "std_sum").
        pred_tumor: [N] bool slice-level tumour decision.

    Returns:
        `counts` with every sum but true_area zeroed where `pred_tumor` is False.
    """
    keep = np.asarray(pred_tumor, bool)
    return {k: v if k == "true_area" else np.where(keep, v, 0.0) for k, v in counts.items()}


def roc_auc(scores, labels):
    """Area under the ROC curve (Mann-Whitney U with tie-averaged ranks); None if one class."""
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels, bool)
    num_pos, num_neg = int(labels.sum()), int((~labels).sum())
    if not num_pos or not num_neg:
        return None
    ranks = stats.rankdata(scores)
    return float((ranks[labels].sum() - num_pos * (num_pos + 1) / 2) / (num_pos * num_neg))


def select_threshold(tumor_prob, true_tumor) -> float:
    """The detection threshold with the best slice accuracy (ties: the one nearest 0.5).

    Args:
        tumor_prob: [N] slice tumour probabilities on validation patients.
        true_tumor: [N] bool ground truth.
    """
    candidates = np.round(np.arange(0.05, 0.96, 0.05), 2)
    prob, truth = np.asarray(tumor_prob), np.asarray(true_tumor, bool)
    accuracy = np.array([np.mean(postprocess.tumour_slices(prob, t) == truth) for t in candidates])
    best = np.flatnonzero(accuracy == accuracy.max())
    return float(candidates[best[np.argmin(np.abs(candidates[best] - 0.5))]])


def summarize(patient_ids, counts, tumor_prob, threshold: float = 0.5) -> tuple[dict, dict]:
    """Evaluation summary over all slices of a split.

    Args:
        patient_ids: [N] patient id of each slice.
        counts: dict of [N] arrays from `slice_counts`, before the detection gate.
        tumor_prob: [N] slice tumour probabilities.
        threshold: slices with tumor_prob < threshold are called tumour-free and their
            masks emptied.

    Returns:
        (metrics, patients): `metrics` holds the metrics.json keys listed in README.md
        plus AUC and per-patient detection; `patients` is `per_patient(...)`.
    """
    tumor_prob = np.asarray(tumor_prob, np.float64)
    pred_tumor = postprocess.tumour_slices(tumor_prob, threshold)
    counts = gate(counts, pred_tumor)
    true_tumor = np.asarray(counts["true_area"]) > 0
    patients = per_patient(patient_ids, dict(counts, pred_tumor=pred_tumor))
    volume_dice = np.array([r["dice"] for r in patients.values() if r["true_area"] > 0])
    slice_dice = dice(counts["intersection"], counts["pred_area"], counts["true_area"])
    tp = int(np.sum(pred_tumor & true_tumor))
    tn = int(np.sum(~pred_tumor & ~true_tumor))
    volume_true = np.array([r["true_area"] > 0 for r in patients.values()])
    volume_pred = np.array([r["pred_tumor"] > 0 for r in patients.values()])
    metrics = {
        "num_patients": len(patients),
        "num_slices": int(true_tumor.size),
        "dice_per_volume_mean": _mean(volume_dice),
        "dice_per_volume_median": float(np.median(volume_dice)) if volume_dice.size else None,
        "dice_tumor_slices_mean": _mean(slice_dice[true_tumor]),
        "iou_per_volume_mean": _mean([r["iou"] for r in patients.values() if r["true_area"] > 0]),
        "detection_threshold": float(threshold),
        "detection_accuracy": (tp + tn) / max(true_tumor.size, 1),
        "detection_sensitivity": _ratio(tp, int(true_tumor.sum())),
        "detection_specificity": _ratio(tn, int((~true_tumor).sum())),
        "detection_auc": roc_auc(tumor_prob, true_tumor),
        # A volume counts as detected when its predicted mask overlaps its tumour.
        "volumes_detected": sum(
            1 for r in patients.values() if r["true_area"] > 0 and r["intersection"] > 0
        ),
        "volumes_with_tumor": int(volume_dice.size),
        # Patient-level detection: a patient is called positive if any slice is.
        "patient_detection_sensitivity": _ratio(
            int(np.sum(volume_pred & volume_true)), int(volume_true.sum())
        ),
        "patient_detection_specificity": _ratio(
            int(np.sum(~volume_pred & ~volume_true)), int((~volume_true).sum())
        ),
    }
    return metrics, patients


def _mean(values):
    values = np.asarray(values, np.float64)
    return float(values.mean()) if values.size else None


def _ratio(numerator: int, denominator: int):
    return numerator / denominator if denominator else None
