"""Crashes, pre-emption, damaged checkpoints, numerical faults, bad data, internal errors,
determinism."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import tifffile

from configs import tiny
from resunet_jax import checkpointing, errors, train
from resunet_jax.data import arrays, sources, synthetic, tfds_lgg
from resunet_jax.workdir import LOCK_FILE

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _command(workdir, *flags):
    return [
        sys.executable,
        "launch.py",
        "--config=configs/tiny.py",
        f"--workdir={workdir}",
        f"--config.data.prepared_dir={workdir}/prepared",
        *flags,
    ]


def _launch(workdir, *flags, expect_rc=0):
    proc = subprocess.run(
        _command(workdir, *flags), cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == expect_rc, proc.stderr[-3000:]
    return proc.stderr


def _steps(workdir):
    folder = os.path.join(workdir, "checkpoints")
    return (
        sorted(int(n) for n in os.listdir(folder) if n.isdigit()) if os.path.isdir(folder) else []
    )


def _start_in_background(workdir):
    """Starts a long tiny run in the background; returns it and its log's path."""
    flags = [
        "--config.num_train_steps=100000",
        "--config.checkpoint_every_steps=5",
        "--config.eval_every_steps=100000",
        "--config.log_every_steps=1",
    ]
    log_path = os.path.join(os.path.dirname(workdir), "log.txt")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(_command(workdir, *flags), cwd=REPO, stderr=log, stdout=log)
    return proc, log_path


def _wait_for_a_checkpoint(workdir):
    deadline = time.time() + 300
    while not _steps(workdir) and time.time() < deadline:
        time.sleep(0.5)
    assert _steps(workdir), "no checkpoint appeared"


def _read(path):
    with open(path) as f:
        return f.read()


def test_a_second_run_in_the_workdir_is_refused_and_sigterm_saves_the_step(tmp_path):
    workdir = str(tmp_path / "run")
    proc, log_path = _start_in_background(workdir)
    # The lock is the first thing a run takes: a second start in the fresh workdir, while
    # the first is still writing its synthetic data, is refused before it writes.
    lock = os.path.join(workdir, LOCK_FILE)
    while not (os.path.exists(lock) and os.path.getsize(lock)):
        assert proc.poll() is None
        time.sleep(0.05)
    log = _launch(workdir, expect_rc=1)
    errors = [line for line in log.splitlines() if line.startswith("E")]
    assert f"{workdir} is in use by another training run (pid {proc.pid} on " in errors[0]
    assert len(errors) == 1 and proc.poll() is None and "Traceback" not in log
    _wait_for_a_checkpoint(workdir)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0
    saved = int(re.search(r"SIGTERM: saved a checkpoint of step (\d+)", _read(log_path)).group(1))
    assert _steps(workdir)[-1] == saved
    log = _launch(workdir, f"--config.num_train_steps={saved + 1}")
    assert f"Resuming from step {saved}" in log


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished tiny run (checkpoints at steps 3 and 6), copied by tests that change it."""
    workdir = str(tmp_path_factory.mktemp("trained") / "run")
    _launch(workdir)
    return workdir


def test_killed_save_and_damaged_latest_step_fall_back(trained, copy_run):
    workdir = copy_run(trained)
    leftover = os.path.join(workdir, "checkpoints", "9.orbax-checkpoint-tmp-1234")
    shutil.copytree(os.path.join(workdir, "checkpoints", "6"), leftover)
    for folder, _, files in os.walk(os.path.join(workdir, "checkpoints", "6", "model")):
        for name in files:
            with open(os.path.join(folder, name), "r+b") as f:
                f.truncate(max(os.path.getsize(f.name) // 3, 1))
    log = _launch(workdir, "--config.num_train_steps=8")
    assert re.search(r"Checkpoint step 6 in \S+ is unreadable", log)
    assert "Resuming from step 3" in log
    # The replay validates step 6 again and saves it beside the damaged one it set aside.
    assert _steps(workdir) == [3, 6, 8] and not os.path.exists(leftover)
    assert os.path.isdir(os.path.join(workdir, "checkpoints", "6.damaged"))
    with open(os.path.join(workdir, "eval", "metrics.json")) as f:
        assert json.load(f)["checkpoint_step"] in (3, 6, 8)


def test_incompatible_checkpoint_names_the_mismatched_shapes(trained, copy_run):
    workdir = copy_run(trained)
    log = _launch(
        workdir, "--config.model.bottleneck_features=8", "--config.num_train_steps=9", expect_rc=1
    )
    assert "different model config" in log
    assert "bottleneck/bn_in/scale: checkpoint (16,) vs model (8,)" in log
    log = _launch(workdir, "--config.optimizer.name=sgd", "--config.num_train_steps=9", expect_rc=1)
    assert "does not fit this config's optimizer state" in log
    assert "Traceback" not in log
    assert _steps(workdir) == [3, 6]


def test_non_finite_loss_stops_with_the_step_and_keeps_good_checkpoints(trained, copy_run):
    workdir = copy_run(trained)
    log = _launch(
        workdir,
        "--config.optimizer.learning_rate=1e30",
        "--config.num_train_steps=30",
        "--config.log_every_steps=1",
        expect_rc=1,
    )
    assert re.search(r"non-finite training loss \S+ at step \d+", log)
    assert "Traceback" not in log
    for step in _steps(workdir):
        variables, _ = checkpointing.restore_model(os.path.join(workdir, "checkpoints", str(step)))
        assert all(np.isfinite(x).all() for x in jax.tree.leaves(variables))


def _bad_dataset(root, fault):
    synthetic.write_synthetic_dataset(root, num_patients=6, slices_per_patient=3, size=16)
    p = os.path.join(root, "TCGA_SY_A002_20000101", "TCGA_SY_A002_20000101_2")
    if fault == "truncated":
        with open(p + ".tif", "r+b") as f:
            f.truncate(100)
    elif fault == "no_mask":
        os.remove(p + "_mask.tif")
    elif fault == "no_image":
        os.remove(p + ".tif")
    elif fault == "shape":
        tifffile.imwrite(p + "_mask.tif", np.zeros((8, 8), np.uint8))
    elif fault == "values":
        tifffile.imwrite(p + "_mask.tif", np.full((16, 16), 7, np.uint8))
    elif fault == "dtype":
        tifffile.imwrite(p + ".tif", np.zeros((16, 16, 3), np.float32), photometric="rgb")
    elif fault == "channels":
        tifffile.imwrite(p + ".tif", np.zeros((16, 16), np.uint8))
    return p


@pytest.mark.parametrize(
    "fault, message",
    [
        ("truncated", r"_2\.tif: unreadable TIFF"),
        ("no_mask", r"_2\.tif: image has no mask"),
        ("no_image", r"_2_mask\.tif: mask has no image"),
        ("shape", r"_2_mask\.tif: mask shape \(8, 8\) does not match its image \(16, 16\)"),
        ("values", r"_2_mask\.tif: mask values must be 0/255"),
        ("dtype", r"_2\.tif: expected an H x W x 3 uint8 image, got shape \(16, 16, 3\) float32"),
        ("channels", r"_2\.tif: expected an H x W x 3 uint8 image, got shape \(16, 16\)"),
    ],
)
def test_bad_data_is_reported_before_training_naming_the_file(tmp_path, fault, message):
    _bad_dataset(str(tmp_path / "data"), fault)
    config = tiny.get_config()
    config.data.dir = str(tmp_path / "data")
    config.data.prepared_dir = str(tmp_path / "prepared")
    with pytest.raises(errors.DataError, match=message):  # the tfdata source prepares
        sources.open_source(config, str(tmp_path / "work"), tfds=True)
    assert not os.path.exists(tmp_path / "work")

    def device_source_reads():  # the device source and evaluation read the arrays
        source = sources.open_source(config, str(tmp_path / "work"), split=False)
        arrays.load(source.data_dir, source.slices, source.patient_ids, 32, str(tmp_path / "p"))

    with pytest.raises(errors.DataError, match=message):
        device_source_reads()


def test_empty_folder_and_too_few_patients_are_reported(tmp_path):
    config = tiny.get_config()
    config.data.prepared_dir = str(tmp_path / "prepared")
    (tmp_path / "empty").mkdir()
    synthetic.write_synthetic_dataset(
        tmp_path / "few", num_patients=2, slices_per_patient=2, size=16
    )
    for name, message in (
        ("empty", "empty: no patient folders"),
        ("few", "2 patients are too few for data.num_folds=3"),
    ):
        config.data.dir = str(tmp_path / name)
        with pytest.raises(errors.DataError, match=message):
            sources.open_source(config, str(tmp_path / "work"))
    # Without a split (evaluating a checkpoint that lists its training patients) two do.
    source = sources.open_source(config, str(tmp_path / "work"), split=False)
    assert len(source.patient_ids) == 2 and not source.train_ids


def test_bad_data_through_launch_is_one_line_and_keeps_the_workdir(trained, tmp_path, copy_run):
    workdir = copy_run(trained)
    before = sorted(os.listdir(workdir))
    for data_dir, message in (
        (tmp_path / "missing", "missing: data folder does not exist"),
        (tmp_path / "bad", "1 unusable file"),
    ):
        if data_dir.name == "bad":
            _bad_dataset(str(data_dir), "values")
        log = _launch(workdir, f"--config.data.dir={data_dir}", expect_rc=1)
        errors = [line for line in log.splitlines() if line.startswith("E")]
        assert message in errors[0] and "Traceback" not in log
    assert sorted(os.listdir(workdir)) == before
    assert _steps(workdir) == [3, 6]


# Runs launch.py's main with a function of the run replaced by one that raises `error`.
_RAISING_RUN = """
import sys
from absl import app
import launch
from resunet_jax import errors
from resunet_jax.data import sources

def fail(*args, **kwargs):
    raise {error}("raised inside the run")

sources.open_source = fail
app.run(launch.main, argv=sys.argv)
"""


@pytest.mark.parametrize("error", ["ValueError", "errors.DataError"])
def test_only_project_errors_become_one_line(tmp_path, error):
    """A ValueError from inside JAX or a library is a bug to see, not a user's mistake."""
    command = [
        sys.executable,
        "-c",
        _RAISING_RUN.format(error=error),
        "--config=configs/tiny.py",
        f"--workdir={tmp_path}/run",
        f"--config.data.prepared_dir={tmp_path}/prepared",
    ]
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "raised inside the run" in proc.stderr
    assert ("Traceback" in proc.stderr) == (error == "ValueError"), proc.stderr[-3000:]


def test_same_seed_gives_bit_identical_parameters(tmp_path):
    params = []
    for name in ("a", "b"):
        config = tiny.get_config()
        config.data.prepared_dir = str(tmp_path / "prepared")
        config.eval_every_steps = 1000
        train.train_and_evaluate(config, str(tmp_path / name))
        variables, _ = checkpointing.restore_model(str(tmp_path / name / "checkpoints"))
        params.append(variables)
    for a, b in zip(jax.tree.leaves(params[0]), jax.tree.leaves(params[1]), strict=True):
        np.testing.assert_array_equal(a, b)


def test_checkpoints_and_prepared_data_load_without_pickle(trained, tmp_path, monkeypatch):
    import pickle

    def refuse(*args, **kwargs):
        raise AssertionError("pickle used")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    variables, meta = checkpointing.restore_model(os.path.join(trained, "checkpoints"))
    assert meta["step"] in (3, 6) and jax.tree.leaves(variables)  # the better validated
    config = tiny.get_config()
    config.data.prepared_dir = os.path.join(trained, "prepared")
    source = sources.open_source(config, trained, tfds=True)
    assert len(list(source.builder.as_dataset(split=tfds_lgg.SPLIT).take(2))) == 2
    slices = arrays.load(source.data_dir, source.slices, source.patient_ids[:1], 32, str(tmp_path))
    assert len(slices["image"]) == 6
