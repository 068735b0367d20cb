import numpy as np
from scipy import ndimage

from resunet_jax import postprocess


def test_keeps_the_largest_3d_component_across_slices():
    volume = np.zeros((4, 8, 8), bool)
    volume[0:3, 2:4, 2:4] = True  # 12 voxels spanning 3 slices
    volume[1, 6, 6] = True  # a 1-voxel false positive on a lesion slice
    volume[3, 0:2, 6:8] = True  # 4 voxels alone on slice 3
    kept = postprocess.largest_component_3d(volume)
    expected = np.zeros_like(volume)
    expected[0:3, 2:4, 2:4] = True
    np.testing.assert_array_equal(kept, expected)
    # Diagonal neighbours across slices are connected (26-connectivity).
    diagonal = np.zeros((2, 3, 3), bool)
    diagonal[0, 0, 0] = diagonal[1, 1, 1] = True
    np.testing.assert_array_equal(postprocess.largest_component_3d(diagonal), diagonal)
    assert not postprocess.largest_component_3d(np.zeros((2, 3, 3), bool)).any()


def test_largest_component_labels_within_the_box_as_over_the_whole_volume():
    rng = np.random.default_rng(0)
    for trial in range(20):
        volume = np.zeros((6, 20, 24), bool)
        z, y, x = rng.integers(0, 3), rng.integers(0, 10), rng.integers(0, 12)
        volume[z : z + 4, y : y + 9, x : x + 11] = rng.random((4, 9, 11)) < 0.15 + trial / 40
        labels, num = ndimage.label(volume, structure=np.ones((3, 3, 3), bool))
        expected = volume if num <= 1 else labels == np.argmax(np.bincount(labels.ravel())[1:]) + 1
        np.testing.assert_array_equal(postprocess.largest_component_3d(volume), expected)


def test_bounding_box():
    mask = np.zeros((3, 5, 6), bool)
    assert postprocess.bounding_box(mask) is None
    mask[1, 2, 4] = mask[2, 3, 1] = True
    assert postprocess.bounding_box(mask) == (slice(1, 3), slice(2, 4), slice(1, 5))


def test_per_patient_uses_slice_order_not_input_order():
    # Patient a's slices 1 and 3 are given first, slice 2 (the bridge) last.
    ids = np.array(["a", "a", "b", "a"])
    index = np.array([1, 3, 1, 2])
    masks = np.zeros((4, 4, 4), bool)
    masks[0, 0, 0] = True  # a/1
    masks[1, 0, 0] = True  # a/3
    masks[3, 0, 0] = True  # a/2 connects a/1 and a/3
    masks[1, 3, 3] = True  # a/3 small separate blob
    masks[2, 1, 1] = True  # b/1
    out = postprocess.largest_component_per_patient(ids, index, masks)
    assert out[0, 0, 0] and out[1, 0, 0] and out[3, 0, 0] and not out[1, 3, 3]
    assert out[2, 1, 1]  # patients are processed separately


def test_masks_at_original_size_resize_threshold_and_pad():
    probs = np.zeros((2, 2, 2), np.float32)
    probs[0, 0, 0] = 1.0  # top-left quarter of a 4 x 4 slice
    probs[1] = 0.7  # all tumour, on a 3 x 5 slice
    out = postprocess.masks_at_original_size(probs, [4, 3], [4, 5])
    assert out.shape == (2, 4, 5) and out.dtype == bool
    expected = np.zeros((2, 4, 5), bool)
    expected[0, :2, :2] = True  # bilinear: 1, 0.75 and 0.5625 >= 0.5; the rest <= 0.25
    expected[1, :3, :5] = True  # below and right of each slice: padding
    np.testing.assert_array_equal(out, expected)


def test_decide_thresholds_pixels_on_the_slices_past_the_gate():
    pixel = np.array([[[0.5, 0.49]], [[0.9, 0.1]], [[0.6, 0.7]]], np.float32)  # [3, 1, 2]
    tumor = np.array([0.3, 0.29, 0.8])
    np.testing.assert_array_equal(postprocess.tumour_slices(tumor, 0.3), [True, False, True])
    masks = postprocess.decide(pixel, tumor, 0.3)
    np.testing.assert_array_equal(masks, [[[True, False]], [[False, False]], [[True, True]]])
