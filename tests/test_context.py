import jax
import jax.numpy as jnp
import numpy as np

from resunet_jax import context


def test_context_rows_are_the_same_patients_neighbours_in_slice_order():
    patients = ["b", "a", "a", "b", "a"]
    positions = [2, 10, 2, 1, 3]  # a: rows 2, 4, 1 in order; b: rows 3, 0
    rows = context.context_rows(patients, positions, 1)
    np.testing.assert_array_equal(rows, [[3, 0, 0], [4, 1, 1], [2, 2, 4], [3, 3, 0], [2, 4, 1]])
    # Beyond either end the end slice repeats.
    np.testing.assert_array_equal(context.context_rows(patients, positions, 2)[4], [2, 2, 4, 1, 1])
    np.testing.assert_array_equal(
        context.context_rows(patients, positions, 0), [[0], [1], [2], [3], [4]]
    )


def test_stack_context_puts_each_slice_in_the_middle_the_same_in_numpy_and_jax():
    images = np.random.default_rng(0).integers(0, 256, (4, 5, 5, 3), np.uint8)
    rows = np.array([[0, 1, 2], [3, 3, 1]])
    stacked = context.stack_context(images, rows)
    assert stacked.shape == (2, 5, 5, 9)
    np.testing.assert_array_equal(stacked[1, ..., 0:3], images[3])
    np.testing.assert_array_equal(stacked[1, ..., 3:6], images[3])
    np.testing.assert_array_equal(stacked[1, ..., 6:9], images[1])
    as_jax = jax.jit(context.stack_context)(jnp.asarray(images), jnp.asarray(rows))
    np.testing.assert_array_equal(np.asarray(as_jax), stacked)
    np.testing.assert_array_equal(context.stack_context(images, rows[0]), stacked[0])
