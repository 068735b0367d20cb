import itertools
import os
import types

import jax
import numpy as np
import pytest
import tifffile

from configs import tiny
from resunet_jax import evaluate, input_pipeline
from resunet_jax import inputs as model_inputs
from resunet_jax.data import lgg, tfds_lgg


def _config(image_size=32):
    config = tiny.get_config()
    config.data.image_size = image_size
    return config


def _builder(tiny_data, tmp_path):
    return tfds_lgg.prepare(tiny_data, str(tmp_path / "prep"), lgg.discover(tiny_data))


def test_train_batches_are_laid_out_per_device(tiny_data, tmp_path):
    builder = _builder(tiny_data, tmp_path)
    ids = lgg.patient_ids(lgg.discover(tiny_data))
    ds = input_pipeline.create_train_dataset(builder, ids[:4], _config(), 8, seed=0)
    batch = next(input_pipeline.as_numpy(ds))
    devices = jax.local_device_count()
    assert batch["image"].shape == (devices, 8 // devices, 32, 32, 3)
    assert batch["image"].dtype == np.uint8  # augmented and normalised in the train step
    assert batch["mask"].shape == (devices, 8 // devices, 32, 32, 1)
    assert set(np.unique(batch["mask"])) <= {0, 1}
    again = next(
        input_pipeline.as_numpy(
            input_pipeline.create_train_dataset(builder, ids[:4], _config(), 8, seed=0)
        )
    )
    np.testing.assert_array_equal(batch["image"], again["image"])  # seeded = reproducible


@pytest.mark.parametrize("fraction", [0.0, 1.0])
def test_tumour_fraction_sets_the_share_of_tumour_slices(tiny_data, tmp_path, fraction):
    builder = _builder(tiny_data, tmp_path)
    ids = lgg.patient_ids(lgg.discover(tiny_data))
    config = _config()
    config.data.tumor_fraction = fraction
    ds = input_pipeline.create_train_dataset(builder, ids[:4], config, 8, seed=0)
    for batch in itertools.islice(input_pipeline.as_numpy(ds), 3):
        has_tumor = batch["mask"].reshape(8, -1).any(axis=1)
        assert has_tumor.all() if fraction else not has_tumor.any()


def _eval_inputs(data_dir, ids, config, tmp_path):
    """Evaluation's model inputs of `ids` [N, S, S, C] and its slices, in slice order."""
    config.data.prepared_dir = str(tmp_path / "prep")
    source = types.SimpleNamespace(data_dir=data_dir, slices=lgg.discover(data_dir))
    evaluator = evaluate.Evaluator(source, config, ids)
    return evaluator.inputs(np.arange(len(evaluator.slices["image"]))), evaluator.slices


def test_volume_normalisation_standardises_each_patient_whatever_its_gain(tiny_data, tmp_path):
    # Two copies of one patient, the second scanned at twice the gain (same zeros).
    source = lgg.discover(tiny_data)
    patient = source[0].patient_id
    for name, factor in (("TCGA_AA_0001_20000101", 1), ("TCGA_BB_0002_20000101", 2)):
        os.makedirs(tmp_path / "data" / name)
        for s in (s for s in source if s.patient_id == patient):
            image, mask = lgg.read_slice(s)
            tifffile.imwrite(
                tmp_path / "data" / name / f"{name}_{s.index}.tif", image // 2 * factor
            )
            tifffile.imwrite(tmp_path / "data" / name / f"{name}_{s.index}_mask.tif", mask * 255)
    data = str(tmp_path / "data")
    builder = tfds_lgg.prepare(data, str(tmp_path / "prep"), lgg.discover(data))
    config = _config()
    config.data.normalization = "volume"
    ids = ["TCGA_AA_0001_20000101", "TCGA_BB_0002_20000101"]
    inputs, slices = _eval_inputs(data, ids, config, tmp_path)
    images = {}
    for p in ids:
        image = inputs[slices["patient_id"] == p]
        brain = slices["image"][slices["patient_id"] == p].max(-1) > 0
        np.testing.assert_allclose(image[brain].mean(0), 0.0, atol=1e-4)
        np.testing.assert_allclose(image[brain].std(0), 1.0, atol=2e-3)
        images[p] = image
    # Resizing rounds to uint8, so the copies differ by up to a grey level.
    np.testing.assert_allclose(images[ids[0]], images[ids[1]], atol=0.1)
    assert np.abs(images[ids[0]] - images[ids[1]]).mean() < 0.01
    # Training batches carry each slice's statistics to the step, which normalises with
    # them: the drawn slices come out as the evaluation's normalised slices.
    batch = next(
        input_pipeline.as_numpy(input_pipeline.create_train_dataset(builder, ids, config, 8, 0))
    )
    train_images = model_inputs.normalize(
        batch["image"].reshape(8, 32, 32, 3), "volume", batch["norm"].reshape(8, 2, 3)
    )
    every_slice = np.concatenate(list(images.values())).reshape(-1, 32 * 32, 3)
    for x in train_images.reshape(8, -1, 3):  # each drawn slice is a normalised slice
        assert np.abs(every_slice - x).max(axis=(1, 2)).min() < 1e-5


def test_context_slices_add_the_neighbours_channels_around_the_slice(tiny_data, tmp_path):
    builder = _builder(tiny_data, tmp_path)
    ids = lgg.patient_ids(lgg.discover(tiny_data))
    flat, context = _config(), _config()
    context.data.context_slices = 1
    # Training draws the same slices: the middle channels are the 2-D pipeline's image.
    batches = [
        next(
            input_pipeline.as_numpy(input_pipeline.create_train_dataset(builder, ids[:4], c, 8, 0))
        )
        for c in (flat, context)
    ]
    assert batches[1]["image"].shape[-1] == 9
    np.testing.assert_array_equal(batches[1]["image"][..., 3:6], batches[0]["image"])
    np.testing.assert_array_equal(batches[1]["mask"], batches[0]["mask"])
    # Evaluation: channels 0-2 hold the previous slice of the same patient, 6-8 the next.
    inputs, slices = _eval_inputs(tiny_data, ids[:2], context, tmp_path)
    for p in ids[:2]:
        mine = slices["patient_id"] == p
        x = inputs[mine]
        np.testing.assert_allclose(x[..., 3:6], slices["image"][mine] / 255.0, atol=1e-6)
        np.testing.assert_array_equal(x[1:, ..., 0:3], x[:-1, ..., 3:6])
        np.testing.assert_array_equal(x[:-1, ..., 6:9], x[1:, ..., 3:6])
        np.testing.assert_array_equal(x[0, ..., 0:3], x[0, ..., 3:6])  # the ends repeat
        np.testing.assert_array_equal(x[-1, ..., 6:9], x[-1, ..., 3:6])


def test_eval_can_score_as_if_sequences_were_missing(tiny_data, tmp_path):
    ids = lgg.patient_ids(lgg.discover(tiny_data))[:1]
    config = _config()

    def images(missing):
        config.eval.missing_sequences = missing
        return _eval_inputs(tiny_data, ids, config, tmp_path)[0]

    full, pre, both = images(""), images("pre"), images("both")
    assert not np.array_equal(full[..., 0], full[..., 1])
    np.testing.assert_array_equal(pre[..., 0], full[..., 1])
    np.testing.assert_array_equal(pre[..., 1:], full[..., 1:])
    np.testing.assert_array_equal(both, np.repeat(full[..., 1:2], 3, -1))
