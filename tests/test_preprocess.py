import jax
import numpy as np

from resunet_jax import preprocess


def test_resize_images_is_jax_antialiased_bilinear():
    images = np.random.default_rng(0).integers(0, 256, (3, 40, 30, 3), dtype=np.uint8)
    for size in (16, 64):
        want = jax.image.resize(images.astype(np.float32), (3, size, size, 3), "linear")
        want = np.clip(np.round(np.asarray(want)), 0, 255)
        got = preprocess.resize_images(images, size)
        assert got.shape == (3, size, size, 3) and got.dtype == np.uint8
        # Float round-off moves a value sitting on .5 by one grey level, no more.
        assert np.abs(got.astype(int) - want).max() <= 1
        assert np.mean(got != want) < 5e-3


def test_resize_masks_keeps_pixels_at_least_half_covered():
    mask = np.zeros((1, 4, 4), np.uint8)
    mask[0, :2, :2] = 1  # fills output pixel (0, 0)
    mask[0, 2, 2] = 1  # a quarter of output pixel (1, 1): dropped
    mask[0, 2:, 0] = 1  # half of output pixel (1, 0): kept
    out = preprocess.resize_masks(mask, 2)
    assert out.shape == (1, 2, 2, 1) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[0, ..., 0], [[1, 0], [1, 0]])
    # Enlarging keeps a mask's pixels as blocks.
    np.testing.assert_array_equal(preprocess.resize_masks(mask, 8)[0, ::2, ::2, 0], mask[0])
