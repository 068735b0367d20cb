"""--mode=calibrate: the rules chosen on known out-of-fold predictions, eval and predict
reading them, and the review flag."""

import csv
import json
import os
import shutil

import numpy as np
import pytest
from test_predict import _export_tiny

from configs import tiny
from resunet_jax import backends, calibrate, errors, evaluate, postprocess, predict


def _known_patient(seed, uncertainty=0.1):
    """A patient whose best rules are known: its lesion has probability 0.45 (found at
    pixel threshold 0.4, lost at 0.5), a stray blob of 0.45 away from it on the same slice
    (removed by the largest component), tumour slices scored 0.45 and tumour-free
    slices 0.35 with probability-0.45 pixels (gated out from a detection threshold of 0.4;
    the highest on the grid that keeps the tumour slices is 0.45)."""
    rng = np.random.default_rng(seed)
    z, size = 6, 32
    probs = np.full((z, size, size), 0.05, np.float32)
    truth = np.zeros((z, size, size), bool)
    truth[2:4, 8:16, 8:16] = True
    probs[truth] = 0.45
    probs[2, 26:29, 26:29] = 0.45  # the stray blob
    probs[0, 0:4, 0:4] = 0.45  # a tumour-free slice's false positive
    tumor = np.where(truth.any(axis=(1, 2)), 0.45, 0.35)
    std = np.full((z, size, size), uncertainty, np.float32) * rng.uniform(0.9, 1.1)
    return calibrate.patient_table(probs, tumor, std, truth)


def test_calibration_chooses_the_known_rules():
    tables = [_known_patient(k, uncertainty=0.01 * (k + 1)) for k in range(10)]
    chosen = calibrate.choose(tables, review_rate=0.2)
    assert chosen["pixel_threshold"] == 0.4
    assert chosen["detection_threshold"] == 0.45
    assert chosen["postprocess"] == "largest_component"
    result = calibrate.apply(tables, chosen)
    np.testing.assert_allclose(result["dice"], 1.0)
    # The 2 most uncertain of 10 are flagged.
    assert result["review"].tolist() == [False] * 8 + [True] * 2
    figures = calibrate.summary(result)
    assert figures["review_rate"] == 0.2 and figures["dice_unflagged_mean"] == 1.0
    assert figures["detection_sensitivity"] == 1.0 and figures["detection_specificity"] == 1.0
    # At today's rules (pixel 0.5) the lesion is lost.
    today = calibrate.apply(tables, calibrate.choose_fixed(tables, 0.5, 0.2))
    np.testing.assert_allclose(today["dice"], 0.0)


def test_review_rule_flags_known_uncertainties():
    assert postprocess.review(0.3, 0.2)[0] is True
    assert "0.3000 above the review threshold 0.2000" in postprocess.review(0.3, 0.2)[1]
    assert postprocess.review(0.1, 0.2) == (False, "")
    assert postprocess.review(None, 0.2) == (False, "no lesion predicted")
    assert postprocess.review(0.3, None) == ("", "")  # no calibrated rule
    dice = np.array([0.9, 0.5, 0.95, 0.6, np.nan])
    unc = np.array([0.01, 0.2, 0.02, 0.3, 0.5])
    result = {
        "dice": dice,
        "uncertainty": unc,
        "review": calibrate.flagged(unc, 0.1),
        "called": np.array([True, False]),
        "true_tumor": np.array([True, False]),
    }
    figures = calibrate.summary(result)
    assert figures["patients_under_0.7"] == 2 and figures["review_recall_under_0.7"] == 1.0
    assert figures["dice_unflagged_mean"] == pytest.approx(0.925)
    assert figures["review_rate"] == pytest.approx(3 / 5)


def _config(tiny_data, tmp_path, checkpoint):
    config = tiny.get_config()
    config.checkpoint = checkpoint
    config.data.dir = tiny_data
    config.data.prepared_dir = str(tmp_path / "prepared")
    config.eval.flip_tta = True
    return config


def test_calibrate_writes_rules_that_eval_and_predict_use(tiny_data, folds, tmp_path):
    runs, ids = folds
    runs = shutil.copytree(runs, tmp_path / "ensemble")
    config = _config(tiny_data, tmp_path, str(runs))
    written = calibrate.calibrate(config, str(tmp_path / "work"))
    with open(runs / backends.CALIBRATION_NAME) as f:
        calibration = json.load(f)
    assert calibration == json.loads(json.dumps(written))
    assert calibration["chosen_on"]["patients"] == len(ids) and calibration["flip_tta"] is True
    assert calibration["detection_threshold"] in calibrate.DETECTION_THRESHOLDS
    assert calibration["cross_validated"]["num_patients"] == len(ids)
    with open(tmp_path / "work" / "calibrate" / "per_patient.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["patient_id"] for r in rows) == sorted(ids)

    # The ensemble restored from the folder takes the calibrated rules...
    model = backends.restore(str(runs), "jax", config)
    assert model.threshold == calibration["detection_threshold"]
    assert model.pixel_threshold == calibration["pixel_threshold"]
    # ...not without flips (its thresholds fit flipped probabilities), nor when told not to.
    config.eval.flip_tta = False
    assert backends.restore(str(runs), "jax", config).calibration is None
    config.eval.flip_tta, config.eval.calibration = True, False
    assert backends.restore(str(runs), "jax", config).calibration is None

    # A review threshold below every uncertainty flags every patient with a lesion, in
    # predict's patients.csv and eval's per_patient.csv.
    calibration["review"]["uncertainty_threshold"] = -1.0
    calibration["pixel_threshold"], calibration["detection_threshold"] = 0.3, 0.3
    with open(runs / backends.CALIBRATION_NAME, "w") as f:
        json.dump(calibration, f)
    config.eval.calibration = True
    config.predict.input = os.path.join(tiny_data, sorted(os.listdir(tiny_data))[0])
    predict.predict(config, str(tmp_path / "predict_work"))
    with open(tmp_path / "predict_work" / "predict" / "patients.csv") as f:
        (patient,) = list(csv.DictReader(f))
    assert patient["tumor"] == "True" and patient["review"] == "True"
    assert "above the review threshold" in patient["review_reason"]
    with open(tmp_path / "predict_work" / "predict" / "predictions.csv") as f:
        slices = list(csv.DictReader(f))
    assert {r["review"] for r in slices if r["tumor"] == "True"} == {"True"}

    single = _export_tiny(tmp_path / "single", 0, [i for i in ids if i != ids[0]], threshold=0.5)
    shutil.copy(runs / backends.CALIBRATION_NAME, single)
    config.checkpoint = single
    summary = evaluate.evaluate_checkpoint(config, str(tmp_path / "eval_work"))
    assert summary["calibrated"] and summary["pixel_threshold"] == 0.3
    with open(tmp_path / "eval_work" / "eval" / "per_patient.csv") as f:
        (row,) = list(csv.DictReader(f))
    assert row["review"] == ("True" if float(row["pred_area"]) else "False")


def test_a_broken_calibration_is_one_clear_error(folds, tmp_path):
    runs, _ = folds
    runs = shutil.copytree(runs, tmp_path / "ensemble")
    (runs / backends.CALIBRATION_NAME).write_text('{"detection_threshold": 0.5}')
    config = tiny.get_config()
    with pytest.raises(errors.CheckpointError, match="calibration.json: not a calibration"):
        backends.restore(str(runs), "jax", config)
