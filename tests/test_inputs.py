import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resunet_jax import inputs


def test_context_rows_are_the_same_patients_neighbours_in_slice_order():
    patients = ["b", "a", "a", "b", "a"]
    positions = [2, 10, 2, 1, 3]  # a: rows 2, 4, 1 in order; b: rows 3, 0
    rows = inputs.neighbours(patients, positions, 1)
    np.testing.assert_array_equal(rows, [[3, 0, 0], [4, 1, 1], [2, 2, 4], [3, 3, 0], [2, 4, 1]])
    # Beyond either end the end slice repeats.
    np.testing.assert_array_equal(inputs.neighbours(patients, positions, 2)[4], [2, 2, 4, 1, 1])
    np.testing.assert_array_equal(
        inputs.neighbours(patients, positions, 0), [[0], [1], [2], [3], [4]]
    )


def test_stack_context_puts_each_slice_in_the_middle_the_same_in_numpy_and_jax():
    images = np.random.default_rng(0).integers(0, 256, (4, 5, 5, 3), np.uint8)
    rows = np.array([[0, 1, 2], [3, 3, 1]])
    stacked = inputs.stack_context(images, rows)
    assert stacked.shape == (2, 5, 5, 9)
    np.testing.assert_array_equal(stacked[1, ..., 0:3], images[3])
    np.testing.assert_array_equal(stacked[1, ..., 3:6], images[3])
    np.testing.assert_array_equal(stacked[1, ..., 6:9], images[1])
    as_jax = jax.jit(inputs.stack_context)(jnp.asarray(images), jnp.asarray(rows))
    np.testing.assert_array_equal(np.asarray(as_jax), stacked)
    np.testing.assert_array_equal(inputs.stack_context(images, rows[0]), stacked[0])


def test_normalize_methods_on_numpy_and_jax():
    image = np.random.default_rng(1).integers(0, 256, (2, 8, 8, 3)).astype(np.uint8)
    np.testing.assert_allclose(inputs.normalize(image), image / 255.0, rtol=1e-6)
    per_slice = inputs.normalize(image, "slice")
    np.testing.assert_allclose(per_slice.mean(axis=(1, 2)), 0.0, atol=1e-5)
    np.testing.assert_allclose(per_slice.std(axis=(1, 2)), 1.0, atol=1e-2)
    stats = np.array([[[0.5, 0.2, 0.1], [0.25, 0.5, 1.0]]] * 2, np.float32)
    volume = inputs.normalize(image, "volume", stats)
    np.testing.assert_allclose(volume[..., 1], (image[..., 1] / 255.0 - 0.2) / 0.5, rtol=1e-5)
    on_device = jax.jit(lambda x: inputs.normalize(x, "volume", stats))(jnp.asarray(image))
    np.testing.assert_allclose(on_device, volume, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="statistics"):
        inputs.normalize(image, "volume")


def test_volume_stats_are_the_non_zero_pixels_mean_and_std():
    image = np.zeros((2, 4, 4, 3), np.uint8)
    image[0, 0, :2] = [51, 102, 153]
    image[1, 1, :2] = [102, 102, 0]
    stats = inputs.volume_stats(inputs.slice_moments(image).sum(axis=0))
    np.testing.assert_allclose(stats[0], [0.3, 0.4, 0.3], rtol=1e-5)
    np.testing.assert_allclose(stats[1], [0.1, 0.0, 0.3], atol=1e-3)
    np.testing.assert_array_equal(inputs.volume_stats(np.zeros((3, 3))), [[0, 0, 0], [1, 1, 1]])


def test_drop_sequences_copies_the_flair_into_missing_ones():
    image = np.arange(2 * 2 * 2 * 6).reshape(2, 2, 2, 6)  # two context slices
    missing = np.array([[True, False], [True, True]])
    out = inputs.drop_sequences(image, missing)
    np.testing.assert_array_equal(out[0, ..., 0], image[0, ..., 1])
    np.testing.assert_array_equal(out[0, ..., 3], image[0, ..., 4])
    np.testing.assert_array_equal(out[0, ..., 2], image[0, ..., 2])
    np.testing.assert_array_equal(out[1, ..., 5], image[1, ..., 4])
    stats = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    np.testing.assert_array_equal(
        inputs.drop_sequences(stats[None], [False, True])[0], [[1, 2, 2], [4, 5, 5]]
    )


def test_model_input_fills_missing_sequences_then_transforms_then_normalizes():
    image = np.random.default_rng(2).integers(1, 256, (2, 4, 4, 6)).astype(np.uint8)
    stats = np.array([[[0.2, 0.4, 0.6], [0.1, 0.2, 0.3]]] * 2, np.float32)
    missing = np.array([False, True])  # post-contrast missing
    seen = []

    def transform(x):
        seen.append(x)
        return x / 2

    got = inputs.model_input(image, stats, missing, "volume", transform)
    # The transform sees float32 [0, 255] with the FLAIR copied into the post-contrast.
    assert seen[0].dtype == np.float32
    np.testing.assert_array_equal(seen[0][..., 2], image[..., 1])
    np.testing.assert_array_equal(seen[0][..., 5], image[..., 4])
    # ... and the post-contrast is normalised with the FLAIR's statistics.
    filled = inputs.drop_sequences(image, missing) / 2
    want = inputs.normalize(filled, "volume", np.array([[[0.2, 0.4, 0.4], [0.1, 0.2, 0.2]]] * 2))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    # Without the options it is the normalisation alone, on numpy and under jit alike.
    np.testing.assert_array_equal(inputs.model_input(image), inputs.normalize(image))
    jitted = jax.jit(lambda x: inputs.model_input(x, stats, missing, "volume"))(jnp.asarray(image))
    want = inputs.model_input(image, stats, missing, "volume")
    np.testing.assert_allclose(jitted, want, rtol=1e-6, atol=1e-6)
