import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resunet_jax import losses, metrics

# Logits of +-20 give probabilities of 1 and 0 to within 2e-9.
BIG = 20.0


def _batch():
    pred = np.zeros((1, 2, 2, 1), np.float32)
    pred[0, 0, :, 0] = 1  # predicts 2 pixels
    true = np.zeros((1, 2, 2, 1), np.float32)
    true[0, :, 0, 0] = 1  # truth: 2 pixels, 1 of them predicted
    return jnp.where(pred > 0, BIG, -BIG), jnp.asarray(true)


def test_focal_tversky_by_hand():
    logits, masks = _batch()
    # TP=1, FN=1, FP=1: TI = (1+1) / (1 + 0.7 + 0.3 + 1) = 2/3; loss = (1/3) ** 0.75
    np.testing.assert_allclose(losses.focal_tversky(logits, masks), (1 / 3) ** 0.75, rtol=1e-6)


def test_soft_dice_by_hand_and_empty_masks():
    logits, masks = _batch()
    # 1 - (2*1 + 1) / (2*1 + 1 + 1 + 1) = 1 - 3/5
    np.testing.assert_allclose(losses.soft_dice(logits, masks), 0.4, rtol=1e-6)
    empty = jnp.zeros_like(masks)
    np.testing.assert_allclose(losses.soft_dice(jnp.full_like(logits, -BIG), empty), 0.0, atol=1e-6)
    # An empty truth with 4 false-positive pixels: 1 - 1/(4+1)
    np.testing.assert_allclose(losses.soft_dice(jnp.full_like(logits, BIG), empty), 0.8, rtol=1e-6)


def test_slice_dice_weighs_a_missed_small_lesion_like_a_large_one():
    # Slice 0: a 60-pixel tumour, found. Slice 1: a 4-pixel lesion, missed.
    masks = np.zeros((2, 10, 10, 1), np.float32)
    masks[0, :6, :, 0] = 1
    masks[1, :2, :2, 0] = 1
    logits = jnp.where(jnp.asarray(masks) > 0, BIG, -BIG).at[1].set(-BIG)
    # Per slice: 1 - (121/121 + 1/5) / 2 = 0.4; pooled: 1 - 121 / (120 + 4 + 1) ~ 0.03.
    np.testing.assert_allclose(losses.slice_soft_dice(logits, masks), 0.4, rtol=1e-5)
    assert losses.soft_dice(logits, masks) < 0.05
    # An empty slice: 1 with no false positives, 1/(1+FP) with FP of them.
    empty = jnp.zeros((1, 2, 2, 1))
    np.testing.assert_allclose(
        losses.slice_soft_dice(jnp.full_like(empty, -BIG), empty), 0.0, atol=1e-6
    )
    np.testing.assert_allclose(
        losses.slice_soft_dice(jnp.full_like(empty, BIG), empty), 0.8, rtol=1e-6
    )
    np.testing.assert_allclose(
        losses.slice_dice_bce(logits, masks),
        losses.slice_soft_dice(logits, masks) + losses.binary_cross_entropy(logits, masks),
        rtol=1e-6,
    )


def test_bce_by_hand():
    logits = jnp.zeros((1, 1, 2, 1))
    masks = jnp.array([[[[0.0], [1.0]]]])
    np.testing.assert_allclose(losses.binary_cross_entropy(logits, masks), np.log(2), rtol=1e-6)
    expected = 1 - (1 + 1) / (1 + 0.5 + 0.5 + 1) + np.log(2)
    np.testing.assert_allclose(losses.dice_bce(logits, masks), expected, rtol=1e-6)


@pytest.mark.parametrize("name", sorted(losses.LOSSES))
def test_losses_over_devices_equal_the_global_batch_loss_and_gradient(name):
    loss_fn = losses.get_loss(name)
    logits = jax.random.normal(jax.random.key(0), (4, 8, 8, 1))
    masks = (jax.random.uniform(jax.random.key(1), (4, 8, 8, 1)) > 0.7).astype(jnp.float32)
    value, grad = jax.value_and_grad(loss_fn)(logits, masks)
    split = lambda x: x.reshape(2, 2, 8, 8, 1)  # noqa: E731
    values, grads = jax.pmap(jax.value_and_grad(lambda lg, m: loss_fn(lg, m, "d")), axis_name="d")(
        split(logits), split(masks)
    )
    np.testing.assert_allclose(values, [value, value], rtol=1e-5)
    np.testing.assert_allclose(grads.reshape(grad.shape), grad, rtol=1e-5, atol=1e-8)


def test_unknown_loss_names_the_choices():
    with pytest.raises(ValueError, match="dice_bce"):
        losses.get_loss("nope")


def test_slice_counts_dice_iou_by_hand():
    pred = np.zeros((3, 4, 4, 1), bool)
    true = np.zeros((3, 4, 4, 1), bool)
    pred[0, :2, :2] = True  # 4 px
    true[0, :2, :3] = True  # 6 px, 4 shared
    true[1, 0, 0] = True  # missed entirely
    counts = {k: np.asarray(v) for k, v in metrics.slice_counts(pred, true).items()}
    np.testing.assert_array_equal(counts["intersection"], [4, 0, 0])
    np.testing.assert_array_equal(counts["pred_area"], [4, 0, 0])
    np.testing.assert_array_equal(counts["true_area"], [6, 1, 0])
    d = metrics.dice(counts["intersection"], counts["pred_area"], counts["true_area"])
    np.testing.assert_allclose(d, [0.8, 0.0, 1.0])  # both empty -> 1
    i = metrics.iou(counts["intersection"], counts["pred_area"], counts["true_area"])
    np.testing.assert_allclose(i, [4 / 6, 0.0, 1.0])


def test_summarize_per_volume_dice_and_detection():
    # Patient a: slices (inter, pred, true) = (3,4,4), (0,2,0); volume dice = 6/10.
    # Patient b: no tumour anywhere, no prediction -> left out of the volume Dice.
    # Patient c: (0,0,5): missed.
    ids = np.array(["a", "a", "b", "c"])
    counts = {
        "intersection": np.array([3.0, 0, 0, 0]),
        "pred_area": np.array([4.0, 2, 0, 0]),
        "true_area": np.array([4.0, 0, 0, 5]),
    }
    summary, patients = metrics.summarize(ids, counts, (counts["pred_area"] > 0) * 0.9)
    assert patients["a"]["dice"] == pytest.approx(0.6)
    assert np.isnan(patients["b"]["dice"])
    assert summary["num_patients"] == 3 and summary["num_slices"] == 4
    assert summary["volumes_with_tumor"] == 2 and summary["volumes_detected"] == 1
    assert summary["dice_per_volume_mean"] == pytest.approx(0.3)
    assert summary["dice_per_volume_median"] == pytest.approx(0.3)
    # Tumour slices: a0 (dice 6/8) and c0 (0).
    assert summary["dice_tumor_slices_mean"] == pytest.approx(0.375)
    # Slices: a0 TP, a1 FP, b0 TN, c0 FN.
    assert summary["detection_accuracy"] == pytest.approx(0.5)
    assert summary["detection_sensitivity"] == pytest.approx(0.5)
    assert summary["detection_specificity"] == pytest.approx(0.5)


def test_gate_empties_masks_of_slices_called_tumour_free():
    ids = np.array(["a", "a", "a"])
    counts = {
        "intersection": np.array([3.0, 0, 0]),
        "pred_area": np.array([4.0, 5, 0]),
        "true_area": np.array([4.0, 0, 0]),
    }
    prob = np.array([0.9, 0.3, 0.1])
    ungated, _ = metrics.summarize(ids, counts, prob, threshold=0.2)
    gated, _ = metrics.summarize(ids, counts, prob, threshold=0.5)
    assert ungated["dice_per_volume_mean"] == pytest.approx(6 / 13)
    assert gated["dice_per_volume_mean"] == pytest.approx(6 / 8)  # slice 2's FP removed
    assert ungated["detection_accuracy"] == pytest.approx(2 / 3)
    assert gated["detection_accuracy"] == 1.0 and gated["detection_threshold"] == 0.5
    assert gated["detection_auc"] == 1.0
    assert gated["patient_detection_sensitivity"] == 1.0
    assert gated["patient_detection_specificity"] is None  # no tumour-free patient


def test_roc_auc_and_threshold_selection_by_hand():
    # Positives 0.8, 0.4; negatives 0.6, 0.1: 3 of 4 pairs ordered -> 0.75.
    assert metrics.roc_auc([0.8, 0.4, 0.6, 0.1], [1, 1, 0, 0]) == pytest.approx(0.75)
    assert metrics.roc_auc([0.5, 0.5], [1, 0]) == pytest.approx(0.5)
    assert metrics.roc_auc([0.5], [1]) is None
    # Separable at any threshold in (0.3, 0.7]: the one nearest 0.5 wins.
    assert metrics.select_threshold([0.9, 0.75, 0.3, 0.1], [1, 1, 0, 0]) == 0.5
    assert metrics.select_threshold([0.9, 0.2, 0.1, 0.05], [1, 1, 0, 0]) == pytest.approx(0.2)
