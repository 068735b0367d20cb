import types

import jax
import numpy as np

from configs import tiny
from resunet_jax import evaluate, models, train
from resunet_jax.data import lgg


def test_masks_are_judged_at_the_slices_original_size(tiny_data, tmp_path):
    config = tiny.get_config()
    config.data.image_size = 64  # the model sees 64 px; the slices are 32 px
    slices = lgg.discover(tiny_data)
    ids = lgg.patient_ids(slices)[:2]
    source = types.SimpleNamespace(builder=lgg.prepare(tiny_data, str(tmp_path), slices))
    state = train.create_train_state(jax.random.key(0), config, models.create_model(config.model))
    cols = evaluate.Evaluator(source, config, ids).predict(state.params, state.batch_stats)

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
