import csv
import functools
import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import tiny
from resunet_jax import checkpointing, device_source, errors, losses, models, parallel, train
from resunet_jax.data import arrays, lgg, sources

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _state_and_batch(global_batch=4, size=16, optimizer="adam", learning_rate=0.01):
    config = tiny.get_config()
    config.data.image_size = size
    config.optimizer.name = optimizer
    config.optimizer.warmup_steps = 0
    config.optimizer.learning_rate = learning_rate
    state = train.create_train_state(jax.random.key(0), config, models.create_model(config.model))
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.uniform(0, 1, (global_batch, size, size, 3)).astype(np.float32),
        "mask": (rng.uniform(size=(global_batch, size, size, 1)) > 0.8).astype(np.uint8),
    }
    return state, batch


def _step(ema_decay=0.0):
    """The pmap-ed step on ready model batches (no sampling or augmentation)."""
    config = tiny.get_config()
    config.ema_decay = ema_decay
    return train.pmapped_train_step(config, prepare=False)


def test_step_on_two_devices_equals_step_on_one_device(loss="focal_tversky"):
    # focal Tversky is the hardest case: a region loss that is not a mean over devices
    # (test_losses_metrics checks every loss's value and gradient over devices).
    # SGD, not Adam: Adam would blow up round-off in the ~0 gradients of the conv biases
    # that BatchNorm cancels, hiding what this test compares.
    state, batch = _state_and_batch(optimizer="sgd", learning_rate=0.05)
    results = []
    for n in (1, 2):
        step = parallel.pmap_step(
            functools.partial(train.train_step, loss_fn=losses.get_loss(loss)),
            devices=jax.local_devices()[:n],
        )
        s = state
        for _ in range(3):
            s, m = step(s, parallel.split_for_devices(batch, n))
        results.append((jax.device_get(s), jax.device_get(m)))
    (one, m1), (two, m2) = results
    assert int(two.step) == 3
    np.testing.assert_allclose(m2["loss"], [m1["loss"][0]] * 2, rtol=1e-5)
    moved = [
        np.abs(a - b).max()
        for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(state.params), strict=True)
    ]
    assert max(moved) > 1e-2  # the steps changed the parameters
    for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(two.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    # BatchNorm running statistics are those of the global batch on both.
    for a, b in zip(
        jax.tree.leaves(one.batch_stats), jax.tree.leaves(two.batch_stats), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6)


def test_loss_falls_when_training_on_one_batch():
    state, batch = _state_and_batch()
    batch["mask"] = (batch["image"][..., :1] > 0.7).astype(np.uint8)  # learnable
    step = _step()
    batch = parallel.split_for_devices(batch)
    losses_seen = []
    for _ in range(15):
        state, m = step(state, batch)
        losses_seen.append(float(m["loss"][0]))
    assert losses_seen[-1] < 0.85 * losses_seen[0]


def test_deep_supervision_loss_scores_each_head_against_the_pooled_mask():
    rng = np.random.default_rng(0)
    masks = (rng.uniform(size=(2, 8, 8, 1)) > 0.7).astype(np.uint8)
    aux = [rng.normal(size=(2, 4, 4, 1)).astype(np.float32), np.zeros((2, 2, 2, 1), np.float32)]
    loss_fn = losses.get_loss("dice_bce")
    pooled = [masks.reshape(2, 8 // s, s, 8 // s, s, 1).mean((2, 4)) for s in (2, 4)]
    expected = (0.3 + 0.5 * loss_fn(aux[0], pooled[0]) + 0.25 * loss_fn(aux[1], pooled[1])) / 1.75
    got = train.deep_supervision_loss(0.3, aux, masks, loss_fn, None)
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_train_step_trains_the_deep_supervision_heads():
    config = tiny.get_config()
    config.data.image_size = 16
    config.model.deep_supervision = 1
    config.optimizer.warmup_steps = 0
    state = train.create_train_state(jax.random.key(0), config, models.create_model(config.model))
    _, batch = _state_and_batch()
    new, _ = _step()(state, parallel.split_for_devices(batch))
    before = jax.device_get(state.params["aux_head1"]["kernel"])
    assert not np.allclose(jax.device_get(new.params["aux_head1"]["kernel"]), before)


def test_moving_average_of_the_weights_and_its_checkpoint(tmp_path):
    state, batch = _state_and_batch()
    batch = parallel.split_for_devices(batch)
    init = jax.device_get(state.params)
    one = jax.device_get(_step(0.9)(state, batch)[0])
    # Step 0: the decay is capped at (1 + 0) / (10 + 0) = 0.1.
    for e, p, p0 in zip(*map(jax.tree.leaves, (one.ema["params"], one.params, init)), strict=True):
        np.testing.assert_allclose(e, 0.1 * p0 + 0.9 * p, rtol=1e-5, atol=1e-7)
    assert not np.allclose(one.ema["params"]["head"]["kernel"], one.params["head"]["kernel"])
    raw = jax.device_get(_step()(state, batch)[0])
    expected = {"params": raw.params, "batch_stats": raw.batch_stats}
    for e, p in zip(jax.tree.leaves(raw.ema), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(e, p)  # decay 0: the raw weights

    # Training checkpoints keep both: the average as the model, the raw weights to resume.
    saver = checkpointing.Checkpointer(str(tmp_path), keep=1)
    assert saver.restore_latest(jax.eval_shape(lambda: state)) is None
    assert not list(tmp_path.iterdir())  # no folders before the first save
    saver.save(one, {"step": 1})
    resumed, _ = saver.restore_latest(jax.eval_shape(lambda: state))
    saver.close()
    variables, _ = checkpointing.restore_model(str(tmp_path / "checkpoints"))
    for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(one), strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(one.ema), strict=True):
        np.testing.assert_array_equal(a, b)


def test_fine_tuning_starts_from_the_exported_weights_with_a_fresh_optimizer(tmp_path):
    trained, batch = _state_and_batch()
    trained = jax.device_get(_step(0.5)(trained, parallel.split_for_devices(batch))[0])
    meta = {"step": 1, "train_patients": ["P1", "P2"]}
    checkpointing.export_model(str(tmp_path / "model"), trained.ema, meta)
    config = tiny.get_config()
    config.data.image_size = 32  # fully convolutional: another input size is fine
    model = models.create_model(config.model)
    fresh = train.create_train_state(jax.random.key(1), config, model)

    tuned, tuned_from = train.init_from_checkpoint(fresh, str(tmp_path / "model"))
    assert tuned_from["train_patients"] == ["P1", "P2"]  # the fine-tuned run inherits them
    for a, b in zip(
        jax.tree.leaves(tuned.params), jax.tree.leaves(trained.ema["params"]), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(tuned.ema), jax.tree.leaves(trained.ema), strict=True):
        np.testing.assert_array_equal(a, b)
    assert int(tuned.step) == 0
    for a, b in zip(
        jax.tree.leaves(tuned.opt_state), jax.tree.leaves(fresh.opt_state), strict=True
    ):
        np.testing.assert_array_equal(a, b)  # Adam moments start at zero

    config.model.bottleneck_features = 32  # another architecture: one error naming the shapes
    other = train.create_train_state(jax.random.key(1), config, models.create_model(config.model))
    with pytest.raises(errors.CheckpointError, match="different model config"):
        train.init_from_checkpoint(other, str(tmp_path / "model"))


def test_training_patients_add_up_over_fine_tuning():
    assert train.training_patients([], ["P2", "P1"]) == ["P1", "P2"]  # fresh run
    assert train.training_patients(["P3", "P1"], ["P1", "P2"]) == ["P1", "P2", "P3"]


def test_fine_tuning_that_leaves_no_patient_to_validate_fails_before_training():
    ids = ["P1", "P2", "P3", "P4"]
    source = sources.Source("/data/lgg", [], None, ids, ids[:3], ids[3:], False)
    train.check_patients_left_to_validate(source, ["P1", "P2", "P3"], "val")  # P4 never seen
    with pytest.raises(errors.DataError, match="/data/lgg: .* none left to validate on"):
        train.check_patients_left_to_validate(source, ids, "val")
    train.check_patients_left_to_validate(source, ids, "all")  # a measure of fit, asked for


def _launch(workdir, *flags):
    cmd = [
        sys.executable,
        "launch.py",
        "--config=configs/tiny.py",
        f"--workdir={workdir}",
        f"--config.data.prepared_dir={workdir}/prepared",
        *flags,
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stderr


def test_launch_trains_evaluates_and_resumes(tmp_path):
    workdir = str(tmp_path / "run")
    log = _launch(workdir)
    assert "SYNTHETIC" in log
    assert os.path.isdir(os.path.join(workdir, "checkpoints", "6"))
    # Both steps were validated; the final evaluation restored the better one.
    saver = checkpointing.Checkpointer(workdir, keep=3)
    best = saver.best_step()
    saver.close()
    assert best in (3, 6)
    assert any(f.startswith("events") for f in os.listdir(os.path.join(workdir, "tensorboard")))
    with open(os.path.join(workdir, "eval", "metrics.json")) as f:
        trained = json.load(f)
    for key in (
        "num_patients",
        "num_slices",
        "dice_per_volume_mean",
        "dice_per_volume_median",
        "dice_tumor_slices_mean",
        "detection_accuracy",
        "detection_sensitivity",
        "detection_specificity",
        "volumes_detected",
        "volumes_with_tumor",
        "checkpoint_step",
    ):
        assert key in trained
    assert trained["num_patients"] == 2 and trained["num_slices"] == 12
    assert trained["checkpoint_step"] == best
    # Checkpoints list their training patients; the evaluation scored none of them.
    _, meta = checkpointing.restore_model(workdir)
    assert len(meta["train_patients"]) == 4 and trained["patients_seen_in_training"] == 0
    assert os.path.exists(os.path.join(workdir, "eval", "per_patient.csv"))
    assert os.path.exists(os.path.join(workdir, "eval", "per_patient_dice.png"))
    assert os.path.exists(os.path.join(workdir, "eval", "results_grid.png"))
    # The report page: a row and a preview (reference and prediction) per patient.
    with open(os.path.join(workdir, "eval", "per_patient.csv")) as f:
        previews = [r["preview_file"] for r in csv.DictReader(f)]
    assert len(previews) == 2 and all(os.path.isfile(p) for p in previews)
    with open(os.path.join(workdir, "eval", "index.html")) as f:
        page = f.read()
    assert page.count('<tbody class="patient') == 2
    assert all(f'src="{os.path.basename(p)}"' in page for p in previews)

    # --mode=eval restores the same checkpoint and reproduces the final evaluation; the
    # training's report is kept beside the new one, not overwritten.
    log = _launch(workdir, "--mode=eval")
    assert re.search(r"eval: (\d+)/\1 batches of \d+ slices \(100%\)", log)  # progress lines
    with open(os.path.join(workdir, "eval", "metrics.json")) as f:
        assert json.load(f) == trained
    (kept,) = re.findall(r"Kept the earlier eval in (\S+)", log)
    assert os.path.dirname(kept) == workdir and os.path.basename(kept).startswith("eval_")
    assert sorted(os.listdir(kept)) == sorted(os.listdir(os.path.join(workdir, "eval")))
    with open(os.path.join(kept, "metrics.json")) as f:
        assert json.load(f) == trained

    # Asking for more steps resumes from the last checkpoint.
    log = _launch(workdir, "--config.num_train_steps=9")
    assert "Resuming from step 6" in log
    assert os.path.isdir(os.path.join(workdir, "checkpoints", "9"))


def test_device_source_on_two_devices_equals_one_device(tiny_data, tmp_path):
    # The whole step: sampling from the resident split, augmentation, training. Each
    # example draws by its index in the global batch, so the devices split one batch.
    config = tiny.get_config()
    config.data.pipeline = "device"
    config.optimizer.name = "sgd"  # as in the test above: Adam magnifies round-off
    config.optimizer.learning_rate = 0.05
    config.optimizer.warmup_steps = 0
    slices = lgg.discover(tiny_data)
    ids = lgg.patient_ids(slices)[:4]
    resident = device_source.training_arrays(
        arrays.load(tiny_data, slices, ids, 32, str(tmp_path)), config
    )
    assert len(resident["tumor"]) + len(resident["clean"]) == len(resident["image"]) == 24
    state = train.create_train_state(jax.random.key(0), config, models.create_model(config.model))
    results = []
    for n in (1, 2):
        step = train.pmapped_train_step(config, devices=jax.local_devices()[:n])
        data = {k: np.broadcast_to(v, (n, *v.shape)) for k, v in resident.items()}
        s = state
        for _ in range(3):
            s, m = step(s, data)
        results.append((jax.device_get(s), jax.device_get(m)))
    (one, m1), (two, m2) = results
    assert int(two.step) == 3
    np.testing.assert_allclose(m2["loss"], [m1["loss"][0]] * 2, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(two.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_device_source_draws_tumour_slices_at_the_set_fraction(tiny_data, tmp_path):
    config = tiny.get_config()
    slices = lgg.discover(tiny_data)
    loaded = arrays.load(tiny_data, slices, lgg.patient_ids(slices), 32, str(tmp_path))
    keys = jax.random.split(jax.random.key(0), 400)
    for fraction in (0.0, 0.5, 1.0):
        config.data.tumor_fraction = fraction
        resident = device_source.training_arrays(loaded, config)
        batch = jax.jit(lambda k, d, f=fraction: device_source.sample(k, d, f))(keys, resident)
        assert batch["image"].shape == (400, 32, 32, 3) and batch["image"].dtype == np.uint8
        share = float(np.mean(np.asarray(batch["mask"]).any(axis=(1, 2, 3))))
        assert abs(share - fraction) < 0.08
        # Every drawn slice is one of the resident slices, with its own mask.
        for i in range(0, 400, 97):
            row = np.flatnonzero((loaded["image"] == batch["image"][i]).all(axis=(1, 2, 3)))
            np.testing.assert_array_equal(loaded["mask"][row[0]], batch["mask"][i])
