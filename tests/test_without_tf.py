"""launch.py evaluates and predicts where TensorFlow cannot be imported, as it does with it."""

import csv
import json
import os

import jax
import pytest
import without_tf  # tests/without_tf.py

from configs import tiny
from resunet_jax import checkpointing, models, train
from resunet_jax.data import lgg


@pytest.fixture(scope="module")
def checkpoint(tiny_data, tmp_path_factory):
    """A tiny model trained on two of `tiny_data`'s patients (an initialised one, exported
    as a checkpoint: its eval and predict outputs are what is compared)."""
    config = tiny.get_config()
    state = train.create_train_state(jax.random.key(0), config, models.create_model(config.model))
    meta = {
        "step": 6,
        "config": checkpointing.config_json(config),
        "val_metrics": {"detection_threshold": 0.5},
        "train_patients": lgg.patient_ids(lgg.discover(tiny_data))[:2],
    }
    path = str(tmp_path_factory.mktemp("checkpoint"))
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    checkpointing.export_model(path, variables, meta)
    return path


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
                "patients": _read_csv(os.path.join(workdir, "eval", "per_patient.csv")),
                # Less the output paths, which name the workdir.
                "predictions": [
                    dict(row, mask_file=os.path.relpath(row["mask_file"], workdir))
                    for row in _read_csv(os.path.join(workdir, "predict", "predictions.csv"))
                ],
            }
        assert os.path.exists(os.path.join(workdir, "eval", "results_grid.png"))
    got, want = outputs[False], outputs[True]
    assert got["metrics"]["num_patients"] == 4 and got["metrics"]["num_slices"] == 24
    assert got == want
