import types

import jax
import numpy as np
import pytest

from configs import resunet, tiny
from resunet_jax import backends, config_schema, errors, evaluate, inference, models, train
from resunet_jax.data import lgg


def test_masks_are_judged_at_the_slices_original_size(tiny_data, tmp_path):
    config = tiny.get_config()
    config.data.image_size = 64  # the model sees 64 px; the slices are 32 px
    config.data.prepared_dir = str(tmp_path)
    slices = lgg.discover(tiny_data)
    ids = lgg.patient_ids(slices)[:2]
    source = types.SimpleNamespace(data_dir=tiny_data, slices=slices)
    state = train.create_train_state(jax.random.key(0), config, models.create_model(config.model))
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    cols = evaluate.Evaluator(source, config, ids).predict(
        backends.from_variables(variables, config)
    )

    assert cols["pred_mask"].shape == cols["true_mask"].shape == (12, 32, 32)
    truth = {(s.patient_id, s.index): lgg.read_slice(s)[1] > 0 for s in slices}
    keys = zip(cols["patient_id"], cols["slice_index"], strict=True)
    for key, true in zip(keys, cols["true_mask"], strict=True):
        np.testing.assert_array_equal(true, truth[key])  # the mask as read, not resized
    pred, true = cols["pred_mask"], cols["true_mask"]
    np.testing.assert_array_equal(cols["true_area"], true.sum((1, 2)))
    np.testing.assert_array_equal(cols["pred_area"], pred.sum((1, 2)))
    np.testing.assert_array_equal(cols["intersection"], (pred & true).sum((1, 2)))
    assert cols["true_area"].sum() > 0


def _source(ids, fold_of):
    """A data source over `ids` as open_source splits it (5 folds, fold 0, seed 0)."""
    train_ids, val_ids = lgg.split_patients(ids, 5, 0, seed=0)
    return types.SimpleNamespace(
        data_dir=fold_of, patient_ids=ids, train_ids=train_ids, val_ids=val_ids
    )


def test_evaluation_scores_only_patients_the_checkpoint_never_saw():
    shared = [f"P{i:02d}" for i in range(20)]
    trained_on = _source(shared, "shared").train_ids  # 16 patients
    bigger = shared + [f"Q{i:02d}" for i in range(10)]  # the same folder with 10 more

    # The k-fold split of the bigger folder puts training patients into fold 0 ...
    assert set(_source(bigger, "big").val_ids) & set(trained_on)
    # ... so "val" means the patients the checkpoint never saw: its 4 + the 10 new.
    ids, seen = evaluate.patients_to_evaluate(_source(bigger, "big"), trained_on, "val")
    assert ids == sorted(set(bigger) - set(trained_on)) and len(ids) == 14
    assert seen == []
    # On the folder it was trained on, that is exactly its validation fold.
    ids, seen = evaluate.patients_to_evaluate(_source(shared, "shared"), trained_on, "val")
    assert ids == _source(shared, "shared").val_ids and seen == []
    # "all" scores everyone and says who was seen in training.
    ids, seen = evaluate.patients_to_evaluate(_source(bigger, "big"), trained_on, "all")
    assert ids == bigger and seen == trained_on
    # Trained on every patient of the folder: one error naming it, nothing scored.
    message = "shared: the checkpoint was trained on every patient"
    with pytest.raises(errors.DataError, match=message):
        evaluate.patients_to_evaluate(_source(shared, "shared"), shared, "val")


def test_checkpoint_config_takes_every_model_field(caplog):
    config = resunet.get_config()
    assert {f"model.{k}" for k in config.model} <= set(config_schema.MODEL_FIELDS)
    saved = resunet.get_config().to_dict()
    saved["model"]["features"] = [32, 64]
    with caplog.at_level("WARNING"):
        restored = config_schema.checkpoint_config(config, {"config": saved})
    assert tuple(restored.model.features) == (32, 64)
    # One warning: for the field that differs.
    assert [r.getMessage() for r in caplog.records if "checkpoint's" in r.getMessage()] == [
        "Using the checkpoint's model.features=[32, 64] (the config had [32, 64, 128])"
    ]


def test_evaluation_predicts_what_the_predictor_predicts(tiny_data, tmp_path):
    config = tiny.get_config()
    config.data.image_size = 48  # resized in and out
    config.data.normalization = "volume"
    config.data.context_slices = 1
    config.data.prepared_dir = str(tmp_path)
    config.model.detection_head = True
    slices = lgg.discover(tiny_data)
    ids = lgg.patient_ids(slices)[:2]
    model = models.create_model(config.model)
    state = train.create_train_state(jax.random.key(0), config, model)
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    source = types.SimpleNamespace(data_dir=tiny_data, slices=slices)
    evaluator = evaluate.Evaluator(source, config, ids)
    jax_model = backends.from_variables(variables, config)
    cols = evaluator.predict(jax_model)

    predictor = inference.Predictor(jax_model, config, threshold=0.5)
    for pid in ids:
        rows = np.flatnonzero(cols["patient_id"] == pid)
        images = [lgg.read_slice(s)[0] for s in slices if s.patient_id == pid]
        np.testing.assert_array_equal(predictor.preprocess(images), evaluator.inputs(rows))
        result = predictor.predict(images)
        np.testing.assert_allclose(result.tumor_probabilities, cols["tumor_prob"][rows], atol=1e-5)
