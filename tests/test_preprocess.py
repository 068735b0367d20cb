import jax
import jax.numpy as jnp
import numpy as np
import pytest

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


def test_normalize_methods_on_numpy_and_jax():
    image = np.random.default_rng(1).integers(0, 256, (2, 8, 8, 3)).astype(np.uint8)
    np.testing.assert_allclose(preprocess.normalize(image), image / 255.0, rtol=1e-6)
    per_slice = preprocess.normalize(image, "slice")
    np.testing.assert_allclose(per_slice.mean(axis=(1, 2)), 0.0, atol=1e-5)
    np.testing.assert_allclose(per_slice.std(axis=(1, 2)), 1.0, atol=1e-2)
    stats = np.array([[[0.5, 0.2, 0.1], [0.25, 0.5, 1.0]]] * 2, np.float32)
    volume = preprocess.normalize(image, "volume", stats)
    np.testing.assert_allclose(volume[..., 1], (image[..., 1] / 255.0 - 0.2) / 0.5, rtol=1e-5)
    on_device = jax.jit(lambda x: preprocess.normalize(x, "volume", stats))(jnp.asarray(image))
    np.testing.assert_allclose(on_device, volume, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="statistics"):
        preprocess.normalize(image, "volume")


def test_volume_stats_are_the_non_zero_pixels_mean_and_std():
    image = np.zeros((2, 4, 4, 3), np.uint8)
    image[0, 0, :2] = [51, 102, 153]
    image[1, 1, :2] = [102, 102, 0]
    stats = preprocess.volume_stats(preprocess.slice_moments(image).sum(axis=0))
    np.testing.assert_allclose(stats[0], [0.3, 0.4, 0.3], rtol=1e-5)
    np.testing.assert_allclose(stats[1], [0.1, 0.0, 0.3], atol=1e-3)
    np.testing.assert_array_equal(preprocess.volume_stats(np.zeros((3, 3))), [[0, 0, 0], [1, 1, 1]])


def test_drop_sequences_copies_the_flair_into_missing_ones():
    image = np.arange(2 * 2 * 2 * 6).reshape(2, 2, 2, 6)  # two context slices
    missing = np.array([[True, False], [True, True]])
    out = preprocess.drop_sequences(image, missing)
    np.testing.assert_array_equal(out[0, ..., 0], image[0, ..., 1])
    np.testing.assert_array_equal(out[0, ..., 3], image[0, ..., 4])
    np.testing.assert_array_equal(out[0, ..., 2], image[0, ..., 2])
    np.testing.assert_array_equal(out[1, ..., 5], image[1, ..., 4])
    stats = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    np.testing.assert_array_equal(
        preprocess.drop_sequences(stats[None], [False, True])[0], [[1, 2, 2], [4, 5, 5]]
    )
