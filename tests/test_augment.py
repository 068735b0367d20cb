import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from configs import tiny
from resunet_jax import augment, parallel

OFF = {
    "flip": False,
    "rotate_degrees": 0.0,
    "scale": 0.0,
    "intensity": 0.0,
    "gamma": 0.0,
    "missing_sequences": 0.0,
}


def _aug(**on):
    return ml_collections.ConfigDict({**OFF, **on})


def _example(size=16, seed=0):
    rng = np.random.default_rng(seed)
    image = rng.integers(1, 256, (size, size, 3), dtype=np.uint8)
    mask = np.zeros((size, size, 1), np.uint8)
    mask[2:7, 3:11] = 1  # off-centre, so that a mirror or rotation moves it
    return image, mask


def test_everything_off_is_the_normalised_input():
    image, mask = _example()
    out = augment.augment(jax.random.key(0), image, mask, _aug())
    np.testing.assert_allclose(out["image"], image / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(out["mask"], mask)


def test_a_flip_mirrors_image_and_mask_together():
    image, mask = _example()
    flips = []
    for seed in range(8):
        key = jax.random.key(seed)
        flip = float(augment.draw(key, _aug(flip=True))["flip"])
        out = augment.augment(key, image, mask, _aug(flip=True))
        want_image, want_mask = (image[:, ::-1], mask[:, ::-1]) if flip < 0 else (image, mask)
        np.testing.assert_allclose(out["image"] * 255.0, want_image, atol=1e-3)
        np.testing.assert_array_equal(out["mask"], want_mask)
        flips.append(flip)
    assert set(flips) == {-1.0, 1.0}  # both drawn


def test_a_quarter_turn_rotates_image_and_mask_alike():
    image, mask = _example()
    slices = jnp.concatenate([image, mask], -1).astype(jnp.float32)
    turned = np.asarray(augment.warp(slices, 1.0, math.pi / 2, 1.0))
    # Output (y, x) samples input (x, S - 1 - y): a quarter turn counter-clockwise.
    want = np.rot90(np.concatenate([image, mask], -1), k=1, axes=(0, 1))
    np.testing.assert_allclose(turned, want, atol=1e-3)
    assert not np.allclose(turned, np.concatenate([image, mask], -1))


def test_masks_stay_binary_and_draws_stay_in_range():
    image, mask = _example(32)
    config = tiny.get_config().augment
    config.missing_sequences = 0.5
    keys = jax.random.split(jax.random.key(3), 64)
    batch = {"image": np.stack([image] * 64), "mask": np.stack([mask] * 64)}
    out = jax.jit(lambda k, b: augment.augment_batch(k, b, config))(keys, batch)
    assert out["image"].shape == (64, 32, 32, 3) and out["image"].dtype == jnp.float32
    assert out["mask"].dtype == jnp.uint8 and set(np.unique(out["mask"])) <= {0, 1}
    assert float(out["image"].min()) >= 0.0 and float(out["image"].max()) <= 1.0
    draws = jax.vmap(lambda k: augment.draw(k, config))(keys)
    i, g = config.intensity, config.gamma
    assert np.all((draws["gain"] >= 1 - i) & (draws["gain"] <= 1 + i))
    assert np.all((draws["gamma"] >= math.exp(-g)) & (draws["gamma"] <= math.exp(g)))
    assert np.all((draws["zoom"] >= 1 - config.scale) & (draws["zoom"] <= 1 + config.scale))
    assert np.abs(np.degrees(draws["angle"])).max() <= config.rotate_degrees + 1e-4
    # Both halves of the draws' ranges are used; about half the slices lose a sequence.
    assert draws["gain"].min() < 1 < draws["gain"].max()
    assert 0.3 < np.mean(draws["missing"].any(axis=1)) < 0.7


def test_same_key_same_batch_other_key_other_batch():
    image, mask = _example(32)
    config = tiny.get_config().augment
    batch = {"image": np.stack([image] * 4), "mask": np.stack([mask] * 4)}
    run = jax.jit(lambda k: augment.augment_batch(k, batch, config)["image"])
    keys = jax.random.split(jax.random.key(1), 4)
    np.testing.assert_array_equal(run(keys), run(keys))
    other = run(jax.random.split(jax.random.key(2), 4))
    assert not np.allclose(run(keys), other)
    assert not np.allclose(run(keys)[0], run(keys)[1])  # each example its own draw


def test_missing_sequences_fill_pre_and_post_contrast_with_the_flair():
    image, mask = _example()
    config = _aug(missing_sequences=1.0)
    seen = set()
    for seed in range(12):
        key = jax.random.key(seed)
        pre, post = np.asarray(augment.draw(key, config)["missing"])
        out = np.asarray(augment.augment(key, image, mask, config)["image"]) * 255.0
        flair = image[..., 1]
        np.testing.assert_allclose(out[..., 0], flair if pre else image[..., 0], atol=1e-3)
        np.testing.assert_allclose(out[..., 2], flair if post else image[..., 2], atol=1e-3)
        assert pre or post  # probability 1: always one or both
        seen.add((bool(pre), bool(post)))
    assert seen == {(True, False), (False, True), (True, True)}


def test_example_keys_follow_the_global_index_on_any_device_count():
    key = jax.random.key(7)
    one = augment.example_keys(key, 4, None)
    per_device = parallel.pmap_step(
        lambda _, x: (None, augment.example_keys(key, 2, parallel.AXIS_NAME)),
        devices=jax.local_devices()[:2],
    )(None, np.zeros((2, 1)))[1]
    np.testing.assert_array_equal(
        jax.random.key_data(one), jax.random.key_data(per_device).reshape(4, -1)
    )
