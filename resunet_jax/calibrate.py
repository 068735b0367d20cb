"""`--mode=calibrate`: a model's or an ensemble's decision rules chosen on out-of-fold
predictions, and the review flag.

nnU-Net chooses an ensemble's post-processing on the pooled cross-validation
predictions; here each member of a k-fold ensemble has its own validation fold (the
patients of `data.dir` it did not train on), and one model has its validation patients.
Each member predicts its own fold (with `eval.flip_tta`, as eval and predict will run
it); on the pooled out-of-fold patients the calibration chooses

- the detection threshold, the pixel threshold and whether to keep the 3D largest
  component: the combination with the best mean per-volume Dice (`choose`);
- the review rule: a patient is flagged when its uncertainty (the mean pixel s.d. over
  its predicted lesion, across the members' views: each member's flips out-of-fold)
  exceeds the quantile that flags `calibrate.review_rate` of the patients.

and writes them to `calibration.json` in the model's folder (`backends.read_calibration`
reads it for eval and predict), with how they were chosen and a cross-validated estimate
of what they give (each fold's rules chosen on the other folds, `cross_validated`). The
same figures go to `WORKDIR/calibrate/metrics.json`, and every out-of-fold patient to
`WORKDIR/calibrate/per_patient.csv`.

An out-of-fold prediction is one member's (each patient was seen in training by every
other member): the ensemble's own probabilities are means over members, so its
calibration is the members' rules, not one fitted to the mean.
"""

import csv
import json
import os

import jax
import numpy as np
from absl import logging

from resunet_jax import backends, config_schema, errors, evaluate, postprocess, progress
from resunet_jax.data import sources
from resunet_jax.workdir import atomic_write, check_writable, keep_earlier

DETECTION_THRESHOLDS = tuple(np.round(np.arange(0.3, 0.96, 0.05), 2).tolist())
PIXEL_THRESHOLDS = (0.3, 0.4, 0.5, 0.6)
POSTPROCESS = ("none", "largest_component")
REVIEW_DICE = 0.7  # the results the review flag should catch: per-volume Dice below this


def patient_table(probabilities, tumor, std, truth) -> dict:
    """One patient's Dice and uncertainty under every rule of the grid.

    Args:
        probabilities: [Z, H, W] float pixel tumour probabilities (each slice's size).
        tumor: [Z] slice tumour probabilities.
        std: [Z, H, W] float pixel s.d. across the views.
        truth: [Z, H, W] bool reference masks.

    Returns:
        {"dice", "uncertainty"}: [D, T, P] arrays over DETECTION_THRESHOLDS x
        PIXEL_THRESHOLDS x POSTPROCESS (uncertainty NaN where the mask is empty; Dice
        NaN for a patient without tumour); "tumor" [Z], "true_tumor" [Z] bool.
    """
    shape = (len(DETECTION_THRESHOLDS), len(PIXEL_THRESHOLDS), len(POSTPROCESS))
    dice, uncertainty = np.full(shape, np.nan), np.full(shape, np.nan)
    true_area = int(truth.sum())
    for j, t in enumerate(PIXEL_THRESHOLDS):
        for i, d in enumerate(DETECTION_THRESHOLDS):
            mask = postprocess.decide(probabilities, tumor, d, t)
            for k, name in enumerate(POSTPROCESS):
                if name == "largest_component":
                    mask = postprocess.largest_component_3d(mask)
                area = int(mask.sum())
                if true_area:
                    dice[i, j, k] = 2 * int((mask & truth).sum()) / (area + true_area)
                if area:
                    uncertainty[i, j, k] = float(std[mask].mean())
    return {
        "dice": dice,
        "uncertainty": uncertainty,
        "tumor": np.asarray(tumor),
        "true_tumor": truth.reshape(len(truth), -1).any(axis=1),
    }


def choose(tables: list[dict], review_rate: float) -> dict:
    """The rules with the best mean per-volume Dice over `tables` (`patient_table`s), and
    the review threshold that flags `review_rate` of them under those rules.

    Ties go to the rule nearest the defaults (pixel 0.5, no post-processing, the highest
    detection threshold), so a flat optimum does not move the rules.

    Returns:
        {"detection_threshold", "pixel_threshold", "postprocess", "review":
        {"uncertainty_threshold", "rate"}}.
    """
    dice = np.stack([t["dice"] for t in tables])  # [patients, D, T, P]
    scored = ~np.isnan(dice[:, 0, 0, 0])
    if not scored.any():
        raise errors.DataError("no out-of-fold patient with tumour to calibrate on")
    mean = dice[scored].mean(axis=0)
    d, t, p = np.meshgrid(
        DETECTION_THRESHOLDS, PIXEL_THRESHOLDS, range(len(POSTPROCESS)), indexing="ij"
    )
    # Best Dice first, then the nearest to the defaults.
    order = np.lexsort((-d.ravel(), p.ravel(), np.abs(t.ravel() - 0.5), -mean.ravel().round(6)))
    i, j, k = np.unravel_index(order[0], mean.shape)
    cut = _review_threshold(tables, (i, j, k), review_rate)
    return {
        "detection_threshold": DETECTION_THRESHOLDS[i],
        "pixel_threshold": PIXEL_THRESHOLDS[j],
        "postprocess": POSTPROCESS[k],
        "review": {"uncertainty_threshold": round(cut, 6), "rate": review_rate},
    }


def _review_threshold(tables: list[dict], rule: tuple, review_rate: float) -> float:
    """The uncertainty above which `review_rate` of `tables`' patients lie under the rule
    at grid index `rule` (patients without a predicted lesion have none)."""
    uncertainty = np.array([t["uncertainty"][rule] for t in tables])
    known = uncertainty[~np.isnan(uncertainty)]
    return float(np.quantile(known, 1 - review_rate)) if len(known) else float("inf")


def flagged(uncertainty, threshold: float) -> np.ndarray:
    """`postprocess.review` of each of [N] uncertainties: [N] bool."""
    return np.array([postprocess.review(u, threshold)[0] is True for u in uncertainty], bool)


def apply(tables: list[dict], rules: dict) -> dict:
    """What `rules` give on `tables`: per-patient "dice", "uncertainty" and "review"
    flag [patients], and per slice "called" (tumour by the gate) and "true_tumor"
    [slices]; results of several apply calls pool by concatenation (`pool`)."""
    i = DETECTION_THRESHOLDS.index(rules["detection_threshold"])
    j = PIXEL_THRESHOLDS.index(rules["pixel_threshold"])
    k = POSTPROCESS.index(rules["postprocess"])
    dice = np.array([t["dice"][i, j, k] for t in tables])
    uncertainty = np.array([t["uncertainty"][i, j, k] for t in tables])
    tumor = np.concatenate([t["tumor"] for t in tables])
    truth = np.concatenate([t["true_tumor"] for t in tables])
    return {
        "dice": dice,
        "uncertainty": uncertainty,
        "review": flagged(uncertainty, rules["review"]["uncertainty_threshold"]),
        "called": postprocess.tumour_slices(tumor, rules["detection_threshold"]),
        "true_tumor": truth,
    }


def pool(results: list[dict]) -> dict:
    """Several `apply` results as one."""
    return {k: np.concatenate([r[k] for r in results]) for k in results[0]}


def summary(result: dict) -> dict:
    """Pooled figures of `apply`'s result: Dice, detection, and the review flag's rate,
    its recall of the patients under REVIEW_DICE and the unflagged patients' Dice."""
    dice, review = result["dice"], result["review"]
    called, truth = result["called"], result["true_tumor"]
    scored = ~np.isnan(dice)
    low = scored & (dice < REVIEW_DICE)
    kept = scored & ~review

    def mean(x):
        return float(np.mean(x)) if len(x) else None

    return {
        "num_patients": int(len(dice)),
        "dice_per_volume_mean": mean(dice[scored]),
        "dice_per_volume_median": float(np.median(dice[scored])) if scored.any() else None,
        "detection_sensitivity": float(called[truth].mean()) if truth.any() else None,
        "detection_specificity": float((~called[~truth]).mean()) if (~truth).any() else None,
        "review_rate": float(review.mean()),
        f"patients_under_{REVIEW_DICE}": int(low.sum()),
        f"review_recall_under_{REVIEW_DICE}": float(review[low].mean()) if low.any() else None,
        "dice_unflagged_mean": mean(dice[kept]),
        "dice_flagged_mean": mean(dice[scored & review]),
    }


def cross_validated(tables_by_fold: list[list[dict]], review_rate: float) -> dict:
    """Each fold's patients under rules chosen on the other folds (`choose`), pooled:
    an estimate of the calibration on patients it did not choose on (`summary`)."""
    results = []
    for k, tables in enumerate(tables_by_fold):
        others = [t for f, fold in enumerate(tables_by_fold) if f != k for t in fold]
        results.append(apply(tables, choose(others, review_rate)))
    return summary(pool(results))


def calibrate(config, workdir: str) -> dict:
    """Chooses the rules (module docstring) and writes calibration.json beside the model.

    `config.checkpoint` is one model (calibrated on its validation patients) or several
    (a folder of runs, comma-separated: the members of a k-fold ensemble, each on its own
    fold); the calibration is written into that folder (a comma-separated list has
    none: it is written to WORKDIR/calibrate/ only).

    Returns:
        The calibration (as written).
    """
    if jax.process_index() == 0:
        check_writable(workdir)
    config = config.copy_and_resolve_references()
    config.eval.calibration = False  # the members' own rules, not an earlier calibration
    paths = backends.model_paths(config.checkpoint or workdir, config.inference.backend)
    source, tables_by_fold, own_rules, rows = None, [], [], []
    for fold, path in enumerate(progress.track(paths, "calibrate", unit="models")):
        model = backends.restore(path, config.inference.backend, config)
        fold_config = config_schema.checkpoint_config(config, model.meta)
        source = source or sources.open_source(fold_config, workdir, split=False)
        ids, _ = evaluate.patients_to_evaluate(source, model.meta["train_patients"], "val")
        evaluator = evaluate.Evaluator(source, fold_config, ids)
        tables = []
        for pid in ids:
            tables.append(_patient(evaluator, model, pid))
            rows.append({"patient_id": pid, "fold": fold, "checkpoint": os.path.abspath(path)})
        tables_by_fold.append(tables)
        own_rules.append(model.threshold)
    tables = [t for fold in tables_by_fold for t in fold]
    target = config.checkpoint or workdir
    rate = config.calibrate.review_rate
    chosen = choose(tables, rate)
    # Today's rule for comparison: each member gates at its own detection threshold (an
    # ensemble at their mean), pixel 0.5, no post-processing, and the same review rate.
    default = pool(
        [
            apply(fold, choose_fixed(fold, threshold, rate))
            for fold, threshold in zip(tables_by_fold, own_rules, strict=True)
        ]
    )
    result = apply(tables, chosen)
    calibration = {
        **chosen,
        "flip_tta": bool(config.eval.flip_tta),
        "chosen_on": {
            "patients": len(tables),
            # Relative to the calibrated folder, so that it can be moved or shipped.
            "models": [os.path.relpath(p, target) for p in paths],
            "data_dir": os.path.basename(os.path.normpath(source.data_dir)),
            "how": "each model predicts the patients of data_dir it did not train on; the "
            "detection threshold, pixel threshold and post-processing with the best mean "
            "per-volume Dice over them all; the review threshold the "
            f"{1 - rate:.2f} quantile of their uncertainties (calibrate.py)",
        },
        "out_of_fold": summary(result),
        "cross_validated": cross_validated(tables_by_fold, rate)
        if len(tables_by_fold) > 1
        else None,
        "own_rules": summary(default),
    }
    for row, dice, unc, flag in zip(
        rows, result["dice"], result["uncertainty"], result["review"], strict=True
    ):
        row.update(dice=_num(dice), uncertainty=_num(unc), review=bool(flag))
    if jax.process_index() == 0:
        out = os.path.join(workdir, "calibrate")
        keep_earlier(out, "metrics.json")
        os.makedirs(out, exist_ok=True)
        with atomic_write(os.path.join(out, "metrics.json")) as f:
            json.dump(calibration, f, indent=2)
        with atomic_write(os.path.join(out, "per_patient.csv"), newline="") as f:
            writer = csv.DictWriter(f, list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        if "," not in target and os.path.isdir(target):
            with atomic_write(os.path.join(target, backends.CALIBRATION_NAME)) as f:
                json.dump(calibration, f, indent=2)
            logging.info("Wrote %s", os.path.join(target, backends.CALIBRATION_NAME))
    logging.info("Calibration: %s", json.dumps(calibration))
    return calibration


def choose_fixed(tables, detection_threshold: float, review_rate: float) -> dict:
    """Today's rules (pixel 0.5, no post-processing) at a model's own detection threshold
    (rounded to the grid), the review threshold at the same rate on `tables`: what
    "own_rules" in calibration.json reports for comparison."""
    d = min(DETECTION_THRESHOLDS, key=lambda x: abs(x - detection_threshold))
    i, j, k = DETECTION_THRESHOLDS.index(d), PIXEL_THRESHOLDS.index(0.5), 0
    cut = _review_threshold(tables, (i, j, k), review_rate)
    return {
        "detection_threshold": d,
        "pixel_threshold": 0.5,
        "postprocess": "none",
        "review": {"uncertainty_threshold": cut, "rate": review_rate},
    }


def _num(x):
    return None if np.isnan(x) else round(float(x), 6)


def _patient(evaluator, model, pid) -> dict:
    """`patient_table` of one patient: its slices predicted by `model`, at their size."""
    slices = evaluator.slices
    rows = np.flatnonzero(slices["patient_id"] == pid)
    probs, tumor, std = model.probabilities(evaluator.inputs(rows))
    sizes = slices["orig_height"][rows], slices["orig_width"][rows]
    probabilities = postprocess.probabilities_at_original_size(probs, *sizes)
    std = postprocess.probabilities_at_original_size(std, *sizes)
    truth = slices["original_mask"][rows] > 0
    return patient_table(probabilities, tumor, std, truth)
