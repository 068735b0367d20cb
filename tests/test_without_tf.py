"""launch.py trains (device batch source), evaluates and predicts where TensorFlow cannot
be imported, and evaluates and predicts as it does with it."""

import csv
import json
import os

import pytest
import without_tf  # tests/without_tf.py


@pytest.fixture(scope="module")
def checkpoint(tiny_data, tmp_path_factory):
    """A tiny model trained, resumed and evaluated with the device batch source where
    TensorFlow cannot be imported."""
    workdir = str(tmp_path_factory.mktemp("trained"))
    flags = [
        "--config=configs/tiny.py",
        f"--workdir={workdir}",
        f"--config.data.dir={tiny_data}",
        f"--config.data.prepared_dir={workdir}/prepared",
        "--config.data.pipeline=device",
    ]
    without_tf.launch(*flags)
    assert os.path.isdir(os.path.join(workdir, "checkpoints", "6"))
    assert any(f.startswith("events") for f in os.listdir(os.path.join(workdir, "tensorboard")))
    log = without_tf.launch(*flags, "--config.num_train_steps=9").stderr
    assert "Resuming from step 6" in log
    with open(os.path.join(workdir, "eval", "metrics.json")) as f:
        assert json.load(f)["checkpoint_step"] in (3, 6, 9)
    return workdir


def _read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_eval_and_predict_without_tensorflow_write_what_they_write_with_it(
    tiny_data, checkpoint, tmp_path_factory
):
    outputs = {}
    for tensorflow in (True, False):
        workdir = str(tmp_path_factory.mktemp("tf" if tensorflow else "no_tf"))
        common = [
            "--config=configs/tiny.py",
            f"--workdir={workdir}",
            f"--config.checkpoint={checkpoint}",
            f"--config.data.dir={tiny_data}",
            f"--config.data.prepared_dir={workdir}/prepared",
        ]
        without_tf.launch(*common, "--mode=eval", tensorflow=tensorflow)
        without_tf.launch(
            *common, "--mode=predict", f"--config.predict.input={tiny_data}", tensorflow=tensorflow
        )
        with open(os.path.join(workdir, "eval", "metrics.json")) as f:
            outputs[tensorflow] = {
                "metrics": json.load(f),
                # Less the output paths, which name the workdir.
                "patients": [
                    dict(row, preview_file=os.path.relpath(row["preview_file"], workdir))
                    for row in _read_csv(os.path.join(workdir, "eval", "per_patient.csv"))
                ],
                "predictions": [
                    dict(row, mask_file=os.path.relpath(row["mask_file"], workdir))
                    for row in _read_csv(os.path.join(workdir, "predict", "predictions.csv"))
                ],
            }
        assert os.path.exists(os.path.join(workdir, "eval", "results_grid.png"))
    got, want = outputs[False], outputs[True]
    # The validation patients: those the checkpoint did not train on.
    assert got["metrics"]["num_patients"] == 2 and got["metrics"]["num_slices"] == 12
    assert got == want
