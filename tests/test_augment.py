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


DOMAIN_OFF = {"fov": 0.0, "blur": 0.0, "bias_field": 0.0, "window": 0.0, "skull_strip": 0.0}


def _head(size=64, seed=0):
    """A phantom head: a bright disc (skull ring, darker brain) on dim noise, a lesion."""
    rng = np.random.default_rng(seed)
    c = (size - 1) / 2
    yy, xx = np.mgrid[:size, :size]
    r = np.hypot(yy - c, xx - c)
    image = rng.integers(0, 6, (size, size, 3)).astype(np.float64)
    image[r < 0.42 * size] = 200.0  # scalp and skull
    image[r < 0.34 * size] = 110.0  # brain
    image[np.hypot(yy - c, xx - c - 4) < 4] = 20.0  # a dark ventricle (a hole to fill)
    image += rng.normal(0, 4, image.shape) * (r < 0.42 * size)[..., None]
    mask = (np.hypot(yy - c + 6, xx - c) < 5)[..., None].astype(np.uint8)
    return np.clip(image, 0, 255).astype(np.uint8), mask, r


def test_domain_keys_off_are_bit_identical_to_before():
    image, mask = _example(32)
    base = tiny.get_config().augment
    base.missing_sequences = 0.3
    with_keys = ml_collections.ConfigDict({**base.to_dict(), **DOMAIN_OFF})
    without = ml_collections.ConfigDict(
        {k: v for k, v in base.to_dict().items() if k not in DOMAIN_OFF}
    )
    keys = jax.random.split(jax.random.key(5), 8)
    batch = {"image": np.stack([image] * 8), "mask": np.stack([mask] * 8)}
    a = jax.jit(lambda k: augment.augment_batch(k, batch, with_keys))(keys)
    b = jax.jit(lambda k: augment.augment_batch(k, batch, without))(keys)
    for name in ("image", "mask"):
        np.testing.assert_array_equal(a[name], b[name])
    # Turning the domain keys on leaves the other draws as they were.
    on = ml_collections.ConfigDict({**base.to_dict(), **DOMAIN_OFF, "window": 0.1, "blur": 0.5})
    for key in keys[:3]:
        old, new = augment.draw(key, without), augment.draw(key, on)
        for name in old:
            np.testing.assert_array_equal(old[name], new[name])


def test_skull_strip_zeroes_the_outside_and_keeps_the_brain():
    image, mask, r = _head()
    config = _aug(skull_strip=1.0)
    for seed in range(4):
        out = np.asarray(augment.augment(jax.random.key(seed), image, mask, config)["image"])
        kept = np.any(out > 0, axis=-1)
        assert not kept[r > 0.42 * 64].any()  # background
        assert kept[r < 0.2 * 64].all()  # the brain's centre, ventricle included
        # Eroded by 2-5 px at 64 px: the outer scalp goes, the brain stays.
        assert not kept[r > 0.42 * 64 - 2].any()
        assert kept[r < 0.42 * 64 - 5 - 1.5].all()
        np.testing.assert_allclose(out[kept], image[kept] / 255.0, rtol=1e-6)
        out_mask = np.asarray(augment.augment(jax.random.key(seed), image, mask, config)["mask"])
        np.testing.assert_array_equal(out_mask, mask)  # the lesion is inside the brain
    # Probability 0.5: about half the slices are stripped.
    keys = jax.random.split(jax.random.key(9), 200)
    stripped = jax.vmap(lambda k: augment.draw(k, _aug(skull_strip=0.5))["strip"])(keys)
    assert 0.35 < float(np.mean(stripped)) < 0.65


def test_erode_and_head_mask():
    mask = np.zeros((20, 20), bool)
    mask[2:18, 4:16] = True
    for radius in (0, 1, 3):
        got = np.asarray(augment.erode(jnp.asarray(mask), radius, 5))
        want = np.zeros_like(mask)
        want[2 + radius : 18 - radius, 4 + radius : 16 - radius] = True
        np.testing.assert_array_equal(got, want)
    ring = np.zeros((20, 20), np.float32)
    ring[3:17, 3:17] = 100.0
    ring[7:13, 7:13] = 0.0  # a dark hole inside the head
    want = np.zeros((20, 20), bool)
    want[3:17, 3:17] = True  # the hole filled
    np.testing.assert_array_equal(np.asarray(augment.head_mask(jnp.asarray(ring))), want)


def test_fov_zooms_out_and_shifts_image_and_mask_together():
    image, mask, _ = _head()
    config = _aug(fov=0.7)
    keys = jax.random.split(jax.random.key(1), 200)
    draws = jax.vmap(lambda k: augment.draw(k, config))(keys)
    assert 0.7 <= float(draws["zoom"].min()) < 0.75 and float(draws["zoom"].max()) <= 1.0
    assert np.all(np.abs(draws["shift"]) <= (1 - draws["zoom"][:, None]) / 2 + 0.05 + 1e-6)
    heads, shifted = [], []
    for key in keys[:6]:
        out = augment.augment(key, image, mask, config)
        heads.append(float(np.mean(np.asarray(out["image"])[..., 1] > 0.3)))
        # The mask moves with the image: the lesion stays on the (brain-grey) lesion spot.
        m = np.asarray(out["mask"])[..., 0].astype(bool)
        assert m.any() and 0.3 < float(np.asarray(out["image"])[..., 1][m].mean()) < 0.55
        shifted.append(np.argwhere(m).mean(0))
    assert max(heads) < np.mean(image[..., 1] > 76)  # the head is smaller in frame
    assert np.ptp(np.array(shifted), axis=0).max() > 1.0  # and moves


def test_bias_field_is_smooth_positive_and_bounded():
    keys = jax.random.split(jax.random.key(2), 16)
    config = _aug(bias_field=0.3)
    for key in keys:
        field = np.asarray(augment.bias_field(augment.draw(key, config)["bias"], 64))[..., 0]
        assert field.min() > 0 and np.all(np.abs(np.log(field)) <= 0.3 + 1e-5)
        # Smooth: neighbouring pixels differ by a small fraction of the field's spread.
        step = max(np.abs(np.diff(field, axis=0)).max(), np.abs(np.diff(field, axis=1)).max())
        assert step <= 0.1 * (np.ptp(field) + 1e-6) + 1e-6
    image, mask, _ = _head()
    out = np.asarray(augment.augment(keys[0], image, mask, config)["image"]) * 255.0
    ratio = out[image > 50] / image[image > 50]
    assert ratio.std() > 0.01  # a field, not a constant gain
    # Off the field is 1.
    np.testing.assert_allclose(augment.bias_field(jnp.zeros(9), 16), 1.0)


def test_blur_removes_high_frequencies_and_keeps_the_mean():
    image, mask = _example(128)  # sigma is in px at 128 px
    config = _aug(blur=1.0)
    blurred = [
        np.asarray(augment.augment(jax.random.key(s), image, mask, config)["image"])
        for s in range(6)
    ]

    def high(x):  # energy of the top half of the spatial frequencies
        f = np.abs(np.fft.fft2(x - x.mean((0, 1)), axes=(0, 1))) ** 2
        k = np.fft.fftfreq(x.shape[0])
        return f[np.hypot(*np.meshgrid(k, k, indexing="ij")) > 0.25].sum()

    plain = image / 255.0
    sigmas = [augment.draw(jax.random.key(s), config)["sigma"] for s in range(6)]
    for out, sigma in zip(blurred, sigmas, strict=True):
        assert high(out) <= high(plain) * (0.9 if float(np.min(sigma)) > 0.5 else 1.0 + 1e-5)
        np.testing.assert_allclose(out.mean(), plain.mean(), atol=0.03)
    # sigma 0 is the identity.
    np.testing.assert_allclose(augment.gaussian_blur(plain, jnp.zeros(2)), plain, atol=1e-6)


def test_window_remaps_each_sequence_within_its_range():
    image, mask = _example()
    config = _aug(window=0.2)
    key = jax.random.key(4)
    lo, hi = np.asarray(augment.draw(key, config)["window"]).T
    assert np.all(np.abs(lo) <= 0.2 * 255 + 1e-4) and np.all(np.abs(hi - 255) <= 0.2 * 255 + 1e-4)
    out = np.asarray(augment.augment(key, image, mask, config)["image"]) * 255.0
    want = np.clip(255.0 * (image - lo) / (hi - lo), 0, 255)
    np.testing.assert_allclose(out, want, atol=1e-3)


def test_domain_augmentation_is_a_pure_function_of_the_key():
    image, mask, _ = _head()
    from configs import domain_aug

    config = domain_aug.get_config().augment
    batch = {"image": np.stack([image] * 4), "mask": np.stack([mask] * 4)}
    run = jax.jit(lambda k: augment.augment_batch(k, batch, config))
    keys = jax.random.split(jax.random.key(8), 4)
    a, b = run(keys), run(keys)
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["mask"], b["mask"])
    assert not np.allclose(a["image"][0], a["image"][1])
    assert set(np.unique(a["mask"])) <= {0, 1}
    assert float(a["image"].min()) >= 0.0 and float(a["image"].max()) <= 1.0
