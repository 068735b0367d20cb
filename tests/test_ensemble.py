"""Ensembles (several checkpoints predicting together), their uncertainty, and the
cross-validation report (--mode=cv)."""

import csv
import json
import os
import shutil

import numpy as np
import pytest
import tifffile
from test_predict import _export_tiny

from configs import tiny
from resunet_jax import (
    backends,
    checkpointing,
    config_schema,
    errors,
    evaluate,
    export,
    inference,
    predict,
)
from resunet_jax.data import lgg


@pytest.fixture(scope="module")
def members(tmp_path_factory):
    """Exported tiny models: "a" and "a_copy" identical, "b" another one."""
    root = tmp_path_factory.mktemp("members")
    paths = {"a": _export_tiny(root / "a", 0, ["p1", "p2"])}
    paths["a_copy"] = str(root / "a_copy")
    shutil.copytree(paths["a"], paths["a_copy"])
    paths["b"] = _export_tiny(root / "b", 1, ["p2", "p3"])
    return paths


def _images(n=4):
    """[n, 32, 32, 3] uint8 slices at the tiny models' input size (nothing resized)."""
    return np.random.default_rng(0).integers(0, 256, (n, 32, 32, 3), np.uint8)


def test_spread_is_the_mean_and_standard_deviation_over_the_views():
    views = np.array([[0.2, 0.8, 0.0], [0.4, 0.8, 1.0]], np.float32)
    mean, sd = backends.spread(views)
    np.testing.assert_allclose(mean, [0.3, 0.8, 0.5], atol=1e-7)
    np.testing.assert_allclose(sd, [0.1, 0.0, 0.5], atol=1e-7)
    np.testing.assert_array_equal(backends.spread(views[:1])[1], 0.0)  # one view: 0


def test_members_are_comma_separated_or_the_runs_of_a_folder(members, tmp_path):
    assert backends.model_paths(members["a"]) == [members["a"]]  # one exported model
    assert backends.model_paths(f"{members['a']}, {members['b']}") == [
        members["a"],
        members["b"],
    ]
    runs = tmp_path / "runs"
    (runs / "notes").mkdir(parents=True)  # not a model: skipped
    for name in ("fold_1", "fold_0"):
        shutil.copytree(members["a"], runs / name)
    os.makedirs(runs / "workdir" / "checkpoints")  # a training run's workdir
    assert backends.model_paths(str(runs)) == [
        str(runs / n) for n in ("fold_0", "fold_1", "workdir")
    ]


def test_an_ensemble_of_identical_members_is_that_member(members, tiny_data, tmp_path):
    alone = inference.Predictor.from_checkpoint(members["a"])
    both = inference.Predictor.from_checkpoint(f"{members['a']},{members['a_copy']}")
    assert isinstance(both.model, backends.Ensemble) and both.threshold == alone.threshold
    want, got = alone.predict(_images()), both.predict(_images())
    np.testing.assert_array_equal(got.probabilities, want.probabilities)
    np.testing.assert_array_equal(got.tumor_probabilities, want.tumor_probabilities)
    np.testing.assert_array_equal(got.masks, want.masks)
    assert want.masks.any()  # something to compare
    # No disagreement: one model, or members that agree.
    np.testing.assert_array_equal(want.uncertainty, 0.0)
    np.testing.assert_array_equal(got.uncertainty, 0.0)

    # Evaluation: the same figures; the report names the members.
    reports = {}
    for name, checkpoint in (("one", members["a"]), ("two", f"{members['a']},{members['a_copy']}")):
        config = tiny.get_config()
        config.checkpoint = checkpoint
        config.data.dir = tiny_data
        config.data.prepared_dir = str(tmp_path / "prepared")
        reports[name] = evaluate.evaluate_checkpoint(config, str(tmp_path / name))
    one, two = reports["one"], reports["two"]
    assert [m["checkpoint"] for m in two.pop("ensemble_members")] == [
        members["a"],
        members["a_copy"],
    ]
    assert two.pop("checkpoint") == f"{members['a']},{members['a_copy']}"
    one.pop("checkpoint")
    assert one == two and one["num_patients"] == 6
    with open(tmp_path / "two" / "eval" / "per_patient.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["uncertainty"] for r in rows} <= {"0.0", ""} and "0.0" in {
        r["uncertainty"] for r in rows
    }


def test_two_members_average_their_probabilities_and_disagree(members, tmp_path):
    ensemble = backends.restore(f"{members['a']},{members['b']}")
    meta = ensemble.meta
    assert meta["val_metrics"]["detection_threshold"] == pytest.approx(0.45)  # mean of theirs
    assert meta["train_patients"] == ["p1", "p2", "p3"]  # the union
    assert [m["step"] for m in meta["members"]] == [10, 11] and meta["step"] == 11
    assert isinstance(ensemble, backends.Ensemble)
    predictor = inference.Predictor.from_checkpoint(f"{members['a']},{members['b']}")
    assert predictor.threshold == pytest.approx(0.45)
    got = predictor.predict(_images())
    a, b = (inference.Predictor.from_checkpoint(members[k]).predict(_images()) for k in "ab")
    mean = (a.probabilities + b.probabilities) / 2
    np.testing.assert_allclose(got.probabilities, mean, atol=1e-6)
    np.testing.assert_allclose(
        got.tumor_probabilities, (a.tumor_probabilities + b.tumor_probabilities) / 2, atol=1e-6
    )
    np.testing.assert_allclose(
        got.uncertainty, np.abs(a.probabilities - b.probabilities) / 2, atol=1e-6
    )
    assert (got.uncertainty > 1e-3).any()
    np.testing.assert_array_equal(
        got.masks, (got.probabilities >= 0.5) & (got.tumor_probabilities >= 0.45)[:, None, None]
    )

    # With flip TTA the views are each member's slice and its mirror image: four.
    config = tiny.get_config()
    config.eval.flip_tta = True
    flipped = inference.Predictor.from_checkpoint(f"{members['a']},{members['b']}", config)
    views = []
    for k in "ab":
        alone = inference.Predictor.from_checkpoint(members[k])
        views += [
            alone.predict(_images()).probabilities,
            alone.predict(_images()[:, :, ::-1]).probabilities[:, :, ::-1],
        ]
    got = flipped.predict(_images())
    np.testing.assert_allclose(got.probabilities, np.mean(views, axis=0), atol=1e-6)
    np.testing.assert_allclose(got.uncertainty, np.std(views, axis=0), atol=1e-6)


def test_a_joined_member_routes_its_own_slices(members, tmp_path):
    """The no-contrast routing of a joined pair (the shipped model's) works inside an
    ensemble: a FLAIR-only slice gets its no-contrast network's probability."""
    variables, meta = checkpointing.join_no_contrast_expert(members["a"], members["b"])
    checkpointing.export_model(str(tmp_path / "joined"), variables, meta)
    other = _export_tiny(tmp_path / "other", 2)
    images = _images(2)
    images[1] = images[1, ..., 1:2]  # FLAIR only: routed to "b"
    got = inference.Predictor.from_checkpoint(f"{tmp_path / 'joined'},{other}").predict(images)
    alone = {
        k: inference.Predictor.from_checkpoint(p).predict(images).tumor_probabilities
        for k, p in (("a", members["a"]), ("b", members["b"]), ("other", other))
    }
    assert got.tumor_probabilities[0] == pytest.approx((alone["a"][0] + alone["other"][0]) / 2)
    assert got.tumor_probabilities[1] == pytest.approx((alone["b"][1] + alone["other"][1]) / 2)


def test_an_ensemble_on_onnx_runtime_predicts_as_on_jax(members, tmp_path):
    runs = tmp_path / "runs"
    for k in "ab":  # a folder of runs, each with its export/model.onnx
        shutil.copytree(members[k], runs / k)
        config = tiny.get_config()
        config.checkpoint = str(runs / k)
        export.export(config, str(runs / k))
    got = {}
    for backend in ("jax", "onnx"):
        config = tiny.get_config()
        config.eval.flip_tta = True
        predictor = inference.Predictor.from_checkpoint(str(runs), config, backend)
        assert [type(m.model) for m in predictor.model.members] == 2 * [
            backends.OnnxModel if backend == "onnx" else backends.JaxModel
        ]
        got[backend] = predictor.predict(_images())
    for field in ("probabilities", "tumor_probabilities", "uncertainty"):
        np.testing.assert_allclose(
            getattr(got["onnx"], field), getattr(got["jax"], field), atol=1e-4
        )


def test_members_reading_different_inputs_are_refused(members, tmp_path):
    volume = _export_tiny(tmp_path / "volume", 0, normalization="volume")
    with pytest.raises(
        errors.CheckpointError,
        match=rf"{members['a']} and {volume} read different inputs "
        r"\(data.normalization: 'scale' vs 'volume'\); the members of an ensemble must agree",
    ):
        backends.restore(f"{members['a']},{members['b']},{volume}")


def test_predict_writes_the_uncertainty_of_an_ensemble(members, tmp_path):
    os.makedirs(tmp_path / "in" / "patient")
    for i, image in enumerate(_images()):
        tifffile.imwrite(tmp_path / "in" / "patient" / f"s_{i}.tif", image)
    config = tiny.get_config()
    config.checkpoint = f"{members['a']},{members['b']}"
    config.predict.input = str(tmp_path / "in")
    config.predict.save_uncertainty = True
    rows = predict.predict(config, str(tmp_path / "work"))
    out = tmp_path / "work" / "predict" / "patient"
    maps = np.stack([tifffile.imread(out / f"s_{i}_pred_std.tif") for i in range(4)])
    assert maps.dtype == np.float32 and maps.shape == (4, 32, 32) and (maps > 0).any()
    masks = np.stack([tifffile.imread(out / f"s_{i}_pred_mask.tif") > 0 for i in range(4)])
    assert masks.any()
    for row, std, mask in zip(rows, maps, masks, strict=True):
        want = predict.lesion_uncertainty(std, mask)
        assert row["uncertainty"] == (None if want is None else pytest.approx(want, abs=1e-6))
    with open(tmp_path / "work" / "predict" / "patients.csv") as f:
        (patient,) = list(csv.DictReader(f))
    assert float(patient["uncertainty"]) == pytest.approx(maps[masks].mean(), abs=1e-4)


def test_cross_validation_scores_each_run_on_its_own_fold(tiny_data, folds, tmp_path):
    runs, ids = folds
    config = tiny.get_config()
    config.checkpoint = runs
    config.data.dir = tiny_data
    config.data.prepared_dir = str(tmp_path / "prepared")
    summary = evaluate.cross_validate(config, str(tmp_path / "work"))
    cv = tmp_path / "work" / "cv"
    with open(cv / "metrics.json") as f:
        assert json.load(f) == json.loads(json.dumps(summary))
    assert summary["num_folds"] == 3 and [f["fold"] for f in summary["folds"]] == [0, 1, 2]
    assert [f["num_patients"] for f in summary["folds"]] == [2, 2, 2]
    for metric in evaluate.CV_METRICS:
        values = [f[metric] for f in summary["folds"] if f[metric] is not None]
        if len(values) > 1:
            assert summary["mean"][metric] == pytest.approx(np.mean(values))
            assert summary["sd"][metric] == pytest.approx(np.std(values, ddof=1))
    with open(cv / "per_patient.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["patient_id"] for r in rows) == sorted(ids)  # each patient once
    for row in rows:
        _, val_ids = lgg.split_patients(ids, 3, int(row["fold"]), seed=0)
        assert row["patient_id"] in val_ids
    assert os.path.exists(cv / "per_patient_dice.png")
    dice = [float(r["dice"]) for r in rows if float(r["true_area"]) > 0]
    assert summary["pooled"]["dice_per_volume_mean"] == pytest.approx(np.mean(dice))

    # Runs that are not folds of one split, or a single run, are refused.
    config.checkpoint = f"{runs}/fold_0,{runs}/fold_0"
    with pytest.raises(errors.CheckpointError, match="both validate on patient"):
        evaluate.cross_validate(config, str(tmp_path / "work2"))
    config.checkpoint = f"{runs}/fold_0"
    with pytest.raises(errors.ConfigError, match="--mode=cv needs the runs of two folds"):
        evaluate.cross_validate(config, str(tmp_path / "work2"))
    config_schema.validate(config, "cv")
    config.eval.split = "all"
    with pytest.raises(errors.ConfigError, match="eval.split='all': --mode=cv scores"):
        config_schema.validate(config, "cv")
